"""Every run setting, declared once: name, type, default, allowed values, help, and how it
shapes a run (tracking/schema.py's `shaping_settings` reads the flags with the policy's `computes`).

`RunSettings`' fields are the declaration. The `reuse-exp run` options, the lm-eval
model's arguments (`--model_args k=2,subset=middle`), MLproject's parameters and the
README's table derive from it; `python -m reuse_exp.cli.declared_files mlproject|readme` prints the last two, and
tests/test_settings.py fails when the checked-in files disagree with it.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from .errors import ConfigError, SettingError
from .knobs import FALSE, TRUE
from .engine import policies
from .engine.fast import DECODE_PATHS
from .engine.reuse import MODES, SCOPES, SUBSETS

# Who reads a setting: the model (an lm-eval model argument), the evaluation (lm-eval's
# task options) or the tracked run itself.
MODEL, TASK, RUN = "model", "task", "run"
DTYPES = ("auto", "bfloat16", "float16", "float32")
SCORINGS = ("continuation", "first_token")


# How a grid treats a setting. REUSE: read by policies only, it shapes a run only where its policy
# `computes` it; a grid varies those its policy declares as `axes`, passes the others at one value.
# OWN: the grid sets it. The rest are the same in every cell: PINNED to the run's default when not
# given (an omitted one matches what a run logs), or FREE (-P, or the run's).
REUSE, OWN, PINNED, FREE = "reuse", "own", "pinned", "free"


def setting(default, help: str, *, kind: str, role: str, choices: tuple = (), minimum: float | None = None,
            maximum: float | None = None, mlproject: bool = True, key: bool | tuple[str, ...] = False,
            grid: str = PINNED):
    """A field of RunSettings with what the CLI, MLproject, the lm-eval model and the grid need to know.

    `key`: the setting shapes the result (where it is a REUSE one: where its policy computes it),
    so it is part of the config key: True for its own value, or the names of the resolved params
    that carry it (`subset` shapes through the `layers` it picks, `dtype` through the dtype it
    resolved to). `grid`: REUSE, OWN, PINNED or FREE (above).
    """
    return field(default=default, metadata={"help": help, "kind": kind, "role": role, "choices": choices,
                                            "minimum": minimum, "maximum": maximum, "mlproject": mlproject,
                                            "key": key, "grid": grid})


@dataclass(frozen=True)
class RunSettings:
    """One configuration of a tracked run: what `reuse-exp run` and `mlflow run` take."""
    k: int = setting(1, "recompute the reused layers every k-th step of a block; 1 = no reuse",
                     kind="int", role=MODEL, minimum=1, key=True, grid=REUSE)
    subset: str | tuple[int, ...] = setting(
        "first", "`first`, `middle`, `last` (12 of 28 layers, scaled to the depth) or indices `8,9,10`",
        kind="subset", role=MODEL, key=("layers",), grid=REUSE)
    mode: str = setting("output", "`output`: the cached output stands in (the study's); "
                        "`delta`: the cached residual is added; `replay`: reuse steps skip the whole "
                        "forward and reuse the last logits (what output mode amounts to)",
                        kind="choice", role=MODEL, choices=MODES, key=True, grid=REUSE)
    scope: str = setting("block", "`block`: the block's step counter (the study's); "
                         "`refresh`: restarted at each full-block forward", kind="choice", role=MODEL, choices=SCOPES,
                         key=True, grid=REUSE)
    policy: str = setting("fixed", "`fixed`: reuse on the k clock (the study's); `adaptive`: per sample and group "
                          "of layers, reuse while the input's drift stays under `drift` (mode delta or replay); "
                          "`depth`: recompute from the first group that drifts (mode delta); or a registered "
                          "plug-in (engine/policies)", kind="policy", role=MODEL, key=True)
    drift: float = setting(0.1, "adaptive, depth: relative drift of a group's input at which it recomputes "
                           "(0 = never reuse)", kind="float", role=MODEL, minimum=0.0, key=True, grid=REUSE)
    max_reuse: int = setting(4, "adaptive, depth: most reuses in a row before a group recomputes", kind="int",
                             role=MODEL, minimum=1, key=True, grid=REUSE)
    task: str = setting("tiny_gsm", "bundled `tiny_gsm` (generative), `tiny_mc` (multiple choice), or an lm-eval "
                        "task: gsm8k, mmlu, minerva_math, ifeval, gpqa_*", kind="str", role=TASK, key=True,
                        grid=OWN)
    limit: int | float | None = setting(None, "samples per task (`none` = all; a fraction below 1 of them)",
                                        kind="limit", role=TASK, key=True)
    model: str = setting("bundled", "the bundled tiny model, a checkpoint directory, a hub id "
                         "(`Efficient-Large-Model/Fast_dLLM_v2_7B`), or `random:<shape>`", kind="str", role=MODEL,
                         key=("model_hash", "model_revision"))
    threshold: float = setting(0.9, "unmasking confidence (what the study's runs used)",
                               kind="float", role=MODEL, minimum=0.0, maximum=1.0, key=True)
    block_size: int = setting(32, "tokens per diffusion block", kind="int", role=MODEL, minimum=1, key=True)
    small_block_size: int = setting(8, "tokens per small block; divides block_size", kind="int", role=MODEL,
                                    minimum=1, key=True)
    max_new_tokens: int = setting(256, "cap on each request's `max_gen_toks`", kind="int", role=MODEL, minimum=1,
                                  key=True)
    use_block_cache: bool = setting(True, "small-block forwards over the block cache (the study's)",
                                    kind="bool", role=MODEL, key=True)
    decode_path: str = setting("auto", "`auto`: `fast` on a GPU, `eager` on CPU; `eager`: plain PyTorch; `fast`: "
                               "static shapes; on a GPU, CUDA graphs of batch-invariant fused kernels (a sample "
                               "decodes the same tokens alone as in a batch; eager's accuracy, not its every token)",
                               kind="choice", role=MODEL,
                               choices=DECODE_PATHS, key=("path",))
    scoring: str = setting("continuation", "loglikelihood tasks: `continuation` scores every answer token, left "
                           "to right; `first_token`: the public harness's first token only",
                           kind="choice", role=MODEL, choices=SCORINGS, key=True)
    num_fewshot: int = setting(0, "few-shot examples (the study's: 0)", kind="int", role=TASK, minimum=0, key=True)
    apply_chat_template: bool = setting(True, "lm-eval's chat template (the study's)", kind="bool", role=TASK,
                                        key=True)
    fewshot_as_multiturn: bool = setting(True, "few-shot examples as chat turns (the study's)",
                                         kind="bool", role=TASK, key=True)
    batch_size: int = setting(1, "requests decoded together (the study's: 1)", kind="int", role=MODEL, minimum=1,
                              key=True)
    seed: int = setting(1234, "seed of lm-eval's sampling and of random weights", kind="int", role=MODEL, key=True)
    dtype: str = setting("auto", "`auto` = bfloat16 on a GPU, float32 on CPU", kind="choice", role=MODEL,
                         choices=DTYPES, key=("resolved_dtype",))
    device: str = setting("auto", "`auto` (a GPU if there is one), `cpu`, `cuda` or `cuda:N`",
                          kind="str", role=MODEL, key=("device_type",))
    revision: str | None = setting(None, "hub revision of `model`", kind="optional", role=MODEL,
                                   key=("model_revision",), grid=FREE)
    tokenizer: str | None = setting(None, "tokenizer directory (default: the checkpoint's; "
                                    "`random:<shape>`: the bundled one)", kind="optional", role=MODEL, key=True,
                                    grid=FREE)
    include_path: tuple[str, ...] = setting((), "extra lm-eval task directory (repeatable)",
                                            kind="paths", role=TASK, mlproject=False, grid=FREE)
    experiment: str | None = setting(None, "MLflow experiment when not started by `mlflow run`",
                                     kind="optional", role=RUN, mlproject=False, grid=OWN)
    allow_dirty: bool = setting(False, "run from a tree with uncommitted changes (tagged dirty, diff logged)",
                                kind="bool", role=RUN, grid=OWN)
    processes: int | str = setting(1, "data-parallel ranks, each on its own GPU (`auto` = one per visible GPU); "
                                   "documents are sharded, one MLflow run", kind="processes", role=RUN,
                                   minimum=1)
    resume: str | None = setting(None, "MLflow run id of an interrupted run to finish (same commit; the settings "
                                 "not given are its)",
                                 kind="optional", role=RUN, grid=OWN)

    def __post_init__(self):
        if self.block_size % self.small_block_size:
            raise SettingError(f"small_block_size={self.small_block_size} must divide block_size={self.block_size}")

    @classmethod
    def parse(cls, values: dict) -> "RunSettings":
        """Settings from strings or values (command line, lm-eval model_args, a grid cell)."""
        specs = {s.name: s for s in SPECS}
        unknown = sorted(set(values) - set(specs))
        if unknown:
            raise SettingError(f"unknown setting {unknown[0]!r}; the settings are: {', '.join(specs)}")
        return cls(**{n: specs[n].parse(v) for n, v in values.items()})

    def replace(self, **changes) -> "RunSettings":
        return replace(self, **changes)

    def of_role(self, role: str) -> dict:
        return {s.name: getattr(self, s.name) for s in SPECS if s.role == role}

    def as_dict(self) -> dict:
        return asdict(self)

    def to_args(self) -> list[str]:
        """These settings as `reuse-exp run` options: what each launched rank is given."""
        args = []
        for s in SPECS:
            value = getattr(self, s.name)
            if s.kind == "paths":
                args += [a for path in value for a in (s.option, path)]
            else:
                args += [s.option, s.text(value)]
        return args


@dataclass(frozen=True)
class Spec:
    """One setting as a record: a field of RunSettings and its metadata."""
    name: str
    kind: str
    role: str
    default: object
    help: str
    choices: tuple
    minimum: float | None
    maximum: float | None
    mlproject: bool
    key: bool | tuple[str, ...]
    grid: str

    @property
    def key_params(self) -> tuple[str, ...]:   # the params that carry it into the config key
        return (self.name,) if self.key is True else tuple(self.key or ())

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def mlproject_type(self) -> str:
        return {"int": "int", "float": "float"}.get(self.kind, "string")

    def text(self, value=MISSING) -> str:
        """A value as MLflow and the command line write it."""
        return to_text(self.default if value is MISSING else value)

    def parse(self, value):
        """A typed value from a string (or an already typed value); SettingError names the fix."""
        if not isinstance(value, str):
            return self._check(value)
        text = value.strip()
        try:
            parsed = PARSERS[self.kind](self, text)
        except ValueError as e:
            raise SettingError(f"{self.name}={value}: {e}") from None
        return self._check(parsed)

    def _check(self, value):
        if self.kind == "processes" and value == "auto":
            return value
        if self.kind == "limit" and value is not None:   # a typed limit obeys the rules a written one does
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SettingError(f"{self.name}={value}: give a number of samples, a fraction below 1, or none")
            try:
                return _limit(float(value))
            except ValueError as e:
                raise SettingError(f"{self.name}={value}: {e}") from None
        if self.kind in ("int", "float", "processes") and value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SettingError(f"{self.name}={value}: give a number")
            if self.kind in ("int", "processes"):
                if value != int(value):
                    raise SettingError(f"{self.name}={value}: give a whole number")
                value = int(value)
            if self.minimum is not None and value < self.minimum:
                raise SettingError(f"{self.name}={value}: must be >= {_num(self.minimum)}")
            if self.maximum is not None and value > self.maximum:
                raise SettingError(f"{self.name}={value}: must be <= {_num(self.maximum)}")
        if self.choices and value not in self.choices:
            raise SettingError(f"{self.name}={value}: use one of {', '.join(self.choices)}")
        if self.kind == "policy":
            try:
                policy_class(value)
            except ConfigError as e:
                raise SettingError(f"{self.name}={value}: {e}") from None
        return value


def _num(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)


def _number(text: str, fix: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(fix) from None


def _parse_int(spec: Spec, text: str):
    x = _number(text, "give a whole number")
    return int(x) if x.is_integer() else x  # a fraction is refused by _check, with the bound in the message


def _parse_bool(spec: Spec, text: str) -> bool:
    if text.lower() in TRUE:
        return True
    if text.lower() in FALSE:
        return False
    raise ValueError("give true or false")


def _parse_limit(spec: Spec, text: str) -> int | float | None:
    if text.lower() in ("", "none", "all"):
        return None
    return _limit(_number(text, "give a number of samples, a fraction below 1, or none"))


def _limit(x: float) -> int | float:
    if x <= 0:
        raise ValueError("the limit must be positive (or none for the whole task)")
    if x < 1:
        return x
    if x != int(x):
        raise ValueError("a limit of 1 or more must be a whole number of samples")
    return int(x)


def _folders(text: str) -> tuple[str, ...]:
    """Comma-separated folders, each of which must exist: a missing one would be skipped silently."""
    folders = tuple(p for p in text.split(",") if p)
    missing = [p for p in folders if not Path(p).is_dir()]
    if missing:
        raise ValueError(f"no folder {missing[0]!r} here ({Path.cwd()}): give an existing directory of "
                         "lm-eval task YAMLs")
    return folders


def _parse_subset(spec: Spec, text: str) -> str | tuple[int, ...]:
    if text in SUBSETS:
        return text
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"use {', '.join(SUBSETS)} or layer indices like 8,9,10") from None


PARSERS = {"int": _parse_int, "float": lambda spec, text: _number(text, "give a number"), "bool": _parse_bool,
           "limit": _parse_limit, "subset": _parse_subset, "str": lambda _, text: text, "choice": lambda _, text: text,
           "policy": lambda _, text: text,
           "optional": lambda spec, text: None if text.lower() in ("", "none") else text,
           "paths": lambda spec, text: _folders(text),
           # a fraction is refused by _check, with the bound in the message
           "processes": lambda spec, text: "auto" if text.lower() == "auto" else _parse_int(spec, text)}


def to_text(value) -> str:
    """One spelling per value: true/false, none, 8,9,10 for layer lists."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


SPECS: tuple[Spec, ...] = tuple(
    Spec(name=f.name, default=f.default, **{k: f.metadata[k] for k in
                                           ("kind", "role", "help", "choices", "minimum", "maximum", "mlproject",
                                            "key", "grid")})
    for f in fields(RunSettings))
DEFAULTS = RunSettings()


def spec(name: str) -> Spec:
    found = next((s for s in SPECS if s.name == name), None)
    if found is None:
        raise SettingError(f"unknown setting {name!r}; the settings are: {', '.join(s.name for s in SPECS)}")
    return found


def grid_settings(kind: str) -> tuple[str, ...]:
    """The settings a grid treats as `kind` (REUSE, OWN, PINNED or FREE)."""
    return tuple(s.name for s in SPECS if s.grid == kind)


_checked: set[type] = set()


def policy_class(name: str) -> type[policies.ReusePolicy]:
    """The registered policy `name`; the first lookup checks what it reads and its grid against
    these settings (ConfigError, one line)."""
    cls = policies.get(name)
    if cls not in _checked:
        where = f"policy {cls.name!r} ({cls.__module__})"
        if unknown := [n for n in cls.reads if n not in {s.name for s in SPECS}]:
            raise ConfigError(f"{where} reads {', '.join(unknown)}, which no setting is (a new setting is a field "
                              "of reuse_exp/settings.py)")
        if off := [n for n in cls.axes if spec(n).grid != REUSE]:
            raise ConfigError(f"{where} has grid axes {', '.join(off)}: an axis is a reuse setting "
                              f"({', '.join(grid_settings(REUSE))})")
        try:
            for n, values in [*cls.axes.items(), *((n, (v,)) for n, v in cls.baseline.items())]:
                for v in values:
                    spec(n).parse(v)
        except SettingError as e:
            raise ConfigError(f"{where} declares a value its setting refuses: {e}") from None
        _checked.add(cls)
    return cls

"""What a grid is made of: its request (task, its policy's axes and the values asked for, pinned
settings), its cells, the task's kind, and the command line that runs one cell. The grid, compare,
the frontier and the launchers share it."""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from itertools import product
from pathlib import Path

from ..errors import ConfigError, SettingError
from ..engine.reuse import SUBSETS
from ..evaluation.harness import bundled_tasks_dir
from ..settings import DEFAULTS, OWN, PINNED, REUSE, SPECS, RunSettings, grid_settings, policy_class, spec, to_text
from ..tracking.schema import same_param, shaping_settings
from .store import ANY, RunRecord, cell_name, norm

GENERATE, LOGLIKELIHOOD = "generate_until", "loglikelihood"
LOGLIKELIHOOD_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice")
PATHS = ("model", "tokenizer", "include_path")   # made absolute: jobs run from a snapshot elsewhere
# The study's tasks, so `grid status` need not index lm-eval's 10k task files (25 s).
KNOWN_KINDS = {"gsm8k": GENERATE, "minerva_math": GENERATE, "ifeval": GENERATE, "mmlu": LOGLIKELIHOOD,
               "gpqa_main_zeroshot": LOGLIKELIHOOD, "gpqa_diamond_zeroshot": LOGLIKELIHOOD,
               "gpqa_main_generative_n_shot": GENERATE}


# -- task kind ------------------------------------------------------------------------------
def task_kind(task: str, runs: list[RunRecord] = ()) -> str:
    """generate_until or loglikelihood, as cheaply as it can be known."""
    for r in runs:                                    # what a run of this task recorded
        if r.tags.get("task_kind") in (GENERATE, LOGLIKELIHOOD):
            return r.tags["task_kind"]
    bundled = bundled_tasks_dir() / f"{task}.yaml"
    if bundled.is_file():
        m = re.search(r"^output_type:\s*(\S+)", bundled.read_text(), re.M)
        return LOGLIKELIHOOD if m and m.group(1) in LOGLIKELIHOOD_TYPES else GENERATE
    if task in KNOWN_KINDS:
        return KNOWN_KINDS[task]
    return _lm_eval_kind(task)


def _lm_eval_kind(task: str) -> str:
    from lm_eval.tasks import TaskManager
    index = TaskManager().task_index

    def leaf_types(name: str, depth: int = 0) -> set[str]:
        entry = index.get(name)
        if entry is None or depth > 5:
            return set()
        cfg = entry.cfg or {}
        if "output_type" in cfg:
            return {cfg["output_type"]}
        subs = cfg.get("task", [])
        subs = [subs] if isinstance(subs, str) else subs
        return set().union(*(leaf_types(s if isinstance(s, str) else s.get("task", ""), depth + 1)
                             for s in subs)) if subs else {GENERATE}

    if task not in index:
        raise ConfigError(f"unknown task {task!r}: give an lm-eval task name or a bundled one "
                          f"({', '.join(sorted(p.stem for p in bundled_tasks_dir().glob('*.yaml')))})")
    types = leaf_types(task)
    return LOGLIKELIHOOD if types and types <= set(LOGLIKELIHOOD_TYPES) else GENERATE


# -- the grid's cells ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One configuration of a grid: its place on its policy's axes and what its run is given."""
    axes: tuple[tuple[str, object], ...]      # (axis, value); ANY where it computes none (k=1's subset)
    settings: tuple[tuple[str, object], ...]  # what the tracked run is given, typed
    shaping: tuple[str, ...] = ()             # the settings that shape it (schema.shaping_settings)
    baseline: bool = False                    # its policy's baseline: what the others are measured against

    @property
    def name(self) -> str:
        return cell_name(self.axes)

    def value(self, axis: str):
        """Its value on `axis` (ANY where it does not compute it); None off the grid's axes."""
        return dict(self.axes).get(axis)

    @property
    def spans(self) -> tuple[str, ...]:
        """The axes it stands for whatever their value (one run for every subset at k=1)."""
        return tuple(a for a, v in self.axes if v == ANY)

    def as_dict(self) -> dict[str, object]:
        return dict(self.settings)

    def matches(self, run: RunRecord) -> bool:
        """A run of this configuration: the same settings shape it, and every setting this cell
        passes equals what the run logged."""
        return (set(run.shaping_names) == set(self.shaping)
                and all(same_param(norm(run.params.get(n)), norm(to_text(v))) for n, v in self.settings))


def make_cell(values: dict[str, object], baseline: bool = False) -> Cell:
    """The cell of a whole configuration (typed values of what a run is given): it passes every
    setting but the reuse ones that do not shape it (k=1 is given no subset, the fixed policy no
    drift), so it matches any run of the same computation."""
    shaping = shaping_settings(values)
    cls = policy_class(values.get("policy") or DEFAULTS.policy)
    passed = tuple((n, v) for n, v in values.items() if spec(n).grid != REUSE or n in shaping)
    axes = tuple((a, values.get(a, getattr(DEFAULTS, a)) if a in shaping else ANY) for a in cls.axes)
    return Cell(axes=axes, settings=passed, shaping=shaping, baseline=baseline)


@dataclass(frozen=True)
class GridRequest:
    task: str
    policy: str = DEFAULTS.policy
    axes: tuple[tuple[str, tuple], ...] = ()          # the policy's axes and the values asked for
    settings: tuple[tuple[str, object], ...] = ()     # every other setting, typed, defaults included

    @property
    def policy_class(self):
        return policy_class(self.policy)

    def baseline_values(self) -> dict[str, object] | None:
        """The baseline's place on the axes, where the values asked for hold it (else None)."""
        asked = dict(self.axes)
        base = self.policy_class.baseline
        if not all(v in asked[n] for n, v in base.items() if n in asked):
            return None
        return {**{n: vs[0] for n, vs in self.axes}, **base}

    def cells(self, kind: str) -> list[Cell]:
        """The policy's baseline first (k=1: one run for every subset, given none), then every
        point of the axes; two that run the same computation are one (replay reuses whole
        forwards: one cell per k). A loglikelihood grid is the baseline alone: no policy can
        change a score."""
        base = self.baseline_values()
        if kind == LOGLIKELIHOOD:
            return [self.cell({**{n: vs[0] for n, vs in self.axes}, **self.policy_class.baseline}, baseline=True)]
        out = [self.cell(base, baseline=True)] if base is not None else []
        names = [n for n, _ in self.axes]
        out += [self.cell(dict(zip(names, point))) for point in product(*(vs for _, vs in self.axes))]
        one: dict[tuple, Cell] = {}
        for c in out:
            one.setdefault(c.settings, c)
        return list(one.values())

    def cell(self, point: dict[str, object], baseline: bool = False) -> Cell:
        return make_cell({"task": self.task, **point, **dict(self.settings)}, baseline)

    def describe_baseline(self) -> str:
        """`k=1`: the baseline's values, as a run takes them."""
        return " ".join(f"{n}={to_text(v)}" for n, v in self.policy_class.baseline.items())


LOGLIKELIHOOD_WHY = ("{task} is a loglikelihood task: reuse acts between denoising steps of generation, "
                     "and scoring runs every layer, so no reuse setting changes the result; "
                     "the grid is one run ({baseline})")


def spanning_why(cell: Cell, request: GridRequest) -> str:
    """Why one run stands for every value of the axes `cell` spans."""
    every = " and ".join(cell.spans)
    if cell.baseline:
        return f"{request.describe_baseline()} never reuses: one run for every {every}"
    fixed = " ".join(f"{n}={to_text(v)}" for n, v in cell.settings if spec(n).grid == REUSE and n not in dict(cell.axes))
    return f"{every} shapes nothing{' at ' + fixed if fixed else ''}: one run for every {every}"


# -- launching one configuration ----------------------------------------------------------------
def run_command(cell: Cell, allow_dirty: bool = False, resume: str | None = None) -> list[str]:
    """The tracked run of one configuration, as a command line (`reuse-exp run --NAME VALUE ...`);
    `resume`: the interrupted run of it to finish."""
    args = [sys.executable, "-m", "reuse_exp.cli", "run"]
    for name, value in cell.settings:
        if to_text(value) not in ("", "none"):   # absent: the run's own default (none)
            args += [spec(name).option, to_text(value)]
    if allow_dirty:
        args.append("--allow-dirty")
    if resume:
        args += ["--resume", resume]
    return args


# A run the grid resumes: killed, or dead while RUNNING (the grid counts a RUNNING run as
# failed only once it is dead); a FAILED one hit an error, which running again would not cure.
RESUMABLE = ("KILLED", "RUNNING", "SCHEDULED")


def resumable(runs: list[RunRecord]) -> str | None:
    """The run a failed cell resumes: its newest, when that one was interrupted, at a clean tree."""
    newest = max(runs, key=lambda r: r.start_ms, default=None)
    if newest is None or newest.status not in RESUMABLE or newest.dirty:
        return None
    return newest.run_id


# -- what a grid is given: every value parsed by the declaration, as `run` parses it -------------
def parse_axis(name: str, text) -> tuple:
    """An axis's values from a comma list (`1,2,3`, `first,last`); a layer list (`8,9,10`) is one
    subset, as `run --subset 8,9,10` takes it. Each value is what `run --NAME VALUE` accepts."""
    s = spec(name)
    if not isinstance(text, str):
        return tuple(s.parse(v) for v in text)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise SettingError(f"--{name} {text!r}: give at least one value")
    if s.kind == "subset" and not all(p in SUBSETS for p in parts):
        return (s.parse(text),)
    return tuple(dict.fromkeys(s.parse(p) for p in parts))


def parse_params(pairs: tuple[str, ...]) -> dict[str, object]:
    """-P NAME=VALUE pairs, each value parsed by its setting; the grid's own and reuse settings are refused
    (the grid takes those as options: --k, --subset, --drift, ...)."""
    out = {}
    for p in pairs:
        name, sep, value = p.partition("=")
        name = name.strip()
        if not sep or not name:
            raise SettingError(f"-P {p!r}: write NAME=VALUE, e.g. -P threshold=0.8")
        s = spec(name)
        if s.grid in (REUSE, OWN):
            raise SettingError("-P resume=...: the grid resumes interrupted runs itself" if name == "resume" else
                               f"-P {name}=...: use {s.option} instead")
        out[name] = s.parse(value)
    return out


def build_request(task: str, *, limit=None, model=None, params: tuple[str, ...] = (), **reuse) -> GridRequest:
    """The grid asked for: its policy's axes at the values given (`k="1,2"`; else the policy's own),
    the other reuse settings it reads at one value, dedicated options and -P values parsed as `run`
    parses them, every pinned setting not given at the run's default. SettingError (one line) names
    the fix, e.g. a reuse setting its policy does not read."""
    settings = {**run_defaults(), **parse_params(params)}
    for name, value in (("limit", limit), ("model", model)):
        if value is not None:
            settings[name] = spec(name).parse(value)
    for name in PATHS:
        if name in settings:
            settings[name] = _absolute(settings[name])
    try:
        cls = policy_class(settings["policy"])
    except ConfigError as e:
        raise SettingError(f"policy={settings['policy']}: {e}") from None
    unknown = sorted(set(reuse) - set(grid_settings(REUSE)))
    if unknown:
        raise SettingError(f"unknown reuse setting {unknown[0]!r}: the reuse settings are "
                           f"{', '.join(grid_settings(REUSE))}")
    axes = []
    for name, default in cls.axes.items():
        text = reuse.get(name)
        axes.append((name, parse_axis(name, default if text is None else text)))
    for name, text in reuse.items():
        if text is None or name in cls.axes:
            continue
        if name not in cls.reads:
            raise SettingError(f"{spec(name).option}: the {cls.name} policy does not read {name} (it reads "
                               f"{', '.join(cls.reads)}); -P policy=NAME picks a policy that does")
        values = parse_axis(name, text)
        if len(values) > 1:
            raise SettingError(f"{spec(name).option} {text}: {name} is not a grid axis of the {cls.name} policy "
                               f"(its axes: {', '.join(cls.axes)}); give one value")
        settings[name] = values[0]
    for name, _ in axes:
        settings.pop(name, None)
    RunSettings(task=task, **{n: vs[0] for n, vs in axes}, **settings)   # what only a whole configuration refuses
    return GridRequest(task=task, policy=cls.name, axes=tuple(axes), settings=tuple(sorted(settings.items())))


def _absolute(value):
    """Paths made absolute where they exist: jobs run from a snapshot elsewhere."""
    if isinstance(value, tuple):
        return tuple(_absolute(v) for v in value)
    if value and not Path(value).is_absolute() and Path(value).exists():
        return str(Path(value).resolve())
    return value


def run_defaults() -> dict[str, object]:
    """The tracked run's own defaults for the settings a grid pins (and the reuse settings, which
    its cells pass where they shape a run), so an omitted setting matches what a run logs (a grid
    without --limit is the whole task, not limit 4)."""
    return {s.name: s.default for s in SPECS if s.grid in (PINNED, REUSE)}

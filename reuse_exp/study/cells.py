"""What a grid is made of: its request (task, k values, subsets, pinned settings), its cells,
the task's kind, and the command line that runs one cell. The grid and the launchers share it."""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, SettingError
from ..engine.policies import get as get_policy
from ..engine.reuse import SUBSETS
from ..evaluation.harness import bundled_tasks_dir
from ..settings import AXIS, OWN, PINNED, SPECS, RunSettings, spec, to_text
from ..tracking.schema import same_param
from .store import ANY_SUBSET, RunRecord, norm

K_VALUES = (1, 2, 3)
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
    """One configuration: the settings passed to the tracked run, typed as the declaration says."""
    k: int
    subset: str | tuple[int, ...]   # ANY_SUBSET at k=1; the mode where it computes no subset (replay)
    settings: tuple[tuple[str, object], ...]

    @property
    def name(self) -> str:
        return f"k{self.k}_{to_text(self.subset)}"

    @property
    def baseline(self) -> bool:
        return self.subset == ANY_SUBSET

    def as_dict(self) -> dict[str, object]:
        return dict(self.settings)

    def matches(self, run: RunRecord) -> bool:
        """Same settings: every setting this cell passes equals what the run logged."""
        return all(same_param(norm(run.params.get(n)), norm(to_text(v))) for n, v in self.settings)


@dataclass(frozen=True)
class GridRequest:
    task: str
    ks: tuple[int, ...] = K_VALUES
    subsets: tuple[str | tuple[int, ...], ...] = SUBSETS
    settings: tuple[tuple[str, object], ...] = ()   # every other setting, typed, defaults included

    def cells(self, kind: str) -> list[Cell]:
        """The k=1 baseline once, whatever the subsets and mode (it computes every layer: the run
        is given neither, and matches a k=1 run of any), then k > 1 by subset; two that run the
        same computation are one (replay reuses whole forwards: one cell per k, named for the
        mode). A loglikelihood grid is the baseline alone: k and subset cannot change a score."""
        ks = (1,) if kind == LOGLIKELIHOOD else self.ks
        return list(dict.fromkeys(self.cell(k, s) for k in ks for s in self.subsets))

    def cell(self, k: int, subset) -> Cell:
        """The cell of (k, subset), passing only the reuse settings that shape its computation."""
        values = (("task", self.task), ("k", k), ("subset", subset), *self.settings)
        try:
            policy = get_policy(dict(values).get("policy") or "fixed")
        except ConfigError:   # a plug-in this process cannot import: every setting counts (the run refuses it)
            return Cell(k=k, subset=subset, settings=values)
        typed = {n: v for n, v in values if n in policy.reads}
        unread = set(policy.reads) - set(policy.computes(**typed))
        label = subset if "subset" not in unread else ANY_SUBSET if k == 1 else to_text(typed.get("mode"))
        return Cell(k=k, subset=label, settings=tuple((n, v) for n, v in values if n not in unread))


LOGLIKELIHOOD_WHY = ("{task} is a loglikelihood task: reuse acts between denoising steps of generation, "
                     "and scoring runs every layer, so every k and subset give the same result; "
                     "the grid is one run (k=1)")
BASELINE_WHY = "k=1 computes every layer: one run for every subset"
# Cells that stand for every subset of their k, with the reason (the grid's table spans them)
SPANNING_WHY = {ANY_SUBSET: BASELINE_WHY, "replay": "replay reuses whole forwards: one run for every subset"}


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
    """-P NAME=VALUE pairs, each value parsed by its setting; the grid's own settings are refused."""
    out = {}
    for p in pairs:
        name, sep, value = p.partition("=")
        name = name.strip()
        if not sep or not name:
            raise SettingError(f"-P {p!r}: write NAME=VALUE, e.g. -P threshold=0.8")
        s = spec(name)
        if s.grid in (AXIS, OWN):
            raise SettingError("-P resume=...: the grid resumes interrupted runs itself" if name == "resume" else
                               f"-P {name}=...: use {s.option} instead")
        out[name] = s.parse(value)
    return out


def build_request(task: str, ks, subsets, mode=None, limit=None, model=None,
                  params: tuple[str, ...] = ()) -> GridRequest:
    """The grid asked for: axes, dedicated options and -P values parsed as `run` parses them,
    every pinned setting not given at the run's default. SettingError (one line) names the fix."""
    settings = {**run_defaults(), **parse_params(params)}
    for name, value in (("mode", mode), ("limit", limit), ("model", model)):
        if value is not None:
            settings[name] = spec(name).parse(value)
    for name in PATHS:
        if name in settings:
            settings[name] = _absolute(settings[name])
    ks, subsets = parse_axis("k", ks), parse_axis("subset", subsets)
    RunSettings(task=task, k=ks[0], subset=subsets[0], **settings)   # what only a whole configuration can refuse
    return GridRequest(task=task, ks=ks, subsets=subsets, settings=tuple(sorted(settings.items())))


def _absolute(value):
    """Paths made absolute where they exist: jobs run from a snapshot elsewhere."""
    if isinstance(value, tuple):
        return tuple(_absolute(v) for v in value)
    if value and not Path(value).is_absolute() and Path(value).exists():
        return str(Path(value).resolve())
    return value


def run_defaults() -> dict[str, object]:
    """The tracked run's own defaults for the settings a grid pins, so an omitted setting
    matches what a run logs (a grid without --limit is the whole task, not limit 4)."""
    return {s.name: s.default for s in SPECS if s.grid == PINNED}

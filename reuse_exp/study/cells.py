"""What a grid is made of: its request (task, k values, subsets, pinned settings), its cells,
the task's kind, and the command line that runs one cell. The grid and the launchers share it."""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, SettingError
from ..engine.reuse import SUBSETS
from ..evaluation.harness import bundled_tasks_dir
from ..settings import SPECS
from ..tracking.schema import same_param
from .store import ANY_SUBSET, RunRecord, norm

K_VALUES = (1, 2, 3)
GENERATE, LOGLIKELIHOOD = "generate_until", "loglikelihood"
LOGLIKELIHOOD_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice")
# Settings a grid pins to their defaults when not told otherwise, so an omitted setting matches
# what a run logs (a grid without --limit is the whole task). The axes and the run's own are not.
PINNED = tuple(s.name for s in SPECS if s.name not in ("task", "k", "subset", "include_path", "experiment",
                                                       "allow_dirty", "revision", "tokenizer", "resume"))
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
    """One configuration: the settings passed to the tracked run, as strings."""
    k: int
    subset: str
    settings: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        return f"k{self.k}_{self.subset}"

    @property
    def baseline(self) -> bool:
        return self.subset == ANY_SUBSET

    def as_dict(self) -> dict[str, str]:
        return dict(self.settings)

    def matches(self, run: RunRecord) -> bool:
        """Same settings: every setting this cell passes equals what the run logged."""
        return all(same_param(norm(run.params.get(n)), norm(v)) for n, v in self.settings)


@dataclass(frozen=True)
class GridRequest:
    task: str
    ks: tuple[int, ...] = K_VALUES
    subsets: tuple[str, ...] = SUBSETS
    settings: tuple[tuple[str, str], ...] = ()   # every other setting, defaults included

    def cells(self, kind: str) -> list[Cell]:
        """The k=1 baseline once, whatever the subsets (it computes every layer: the run is given
        no subset and matches a k=1 run of any), then k > 1 by subset. A loglikelihood grid is the
        baseline alone: k and subset cannot change a score."""
        out = []
        if 1 in self.ks or kind == LOGLIKELIHOOD:
            out.append(Cell(k=1, subset=ANY_SUBSET, settings=(("task", self.task), ("k", "1"), *self.settings)))
        if kind != LOGLIKELIHOOD:
            out += [Cell(k=k, subset=s, settings=(("task", self.task), ("k", str(k)), ("subset", s), *self.settings))
                    for k in self.ks if k != 1 for s in self.subsets]
        return out


LOGLIKELIHOOD_WHY = ("{task} is a loglikelihood task: reuse acts between denoising steps of generation, "
                     "and scoring runs every layer, so every k and subset give the same result; "
                     "the grid is one run (k=1)")
BASELINE_WHY = "k=1 computes every layer: one run for every subset"


# -- launching one configuration ----------------------------------------------------------------
def run_command(cell: Cell, allow_dirty: bool = False, resume: str | None = None) -> list[str]:
    """The tracked run of one configuration, as a command line (`reuse-exp run --NAME VALUE ...`);
    `resume`: the interrupted run of it to finish."""
    args = [sys.executable, "-m", "reuse_exp.cli", "run"]
    for name, value in cell.settings:
        if value != "":
            args += [f"--{name.replace('_', '-')}", value]
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


# -- the grid's options, parsed ---------------------------------------------------------------------------
def parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SettingError(f"{text!r}: give integers like 1,2,3") from None
    if not ks or any(k < 1 for k in ks):
        raise SettingError(f"{text!r}: give integers >= 1 like 1,2,3")
    return ks


def parse_subsets(text: str) -> tuple[str, ...]:
    subsets = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in subsets if s not in SUBSETS]
    if not subsets or bad:
        raise SettingError(f"{text!r}: give a comma list of {', '.join(SUBSETS)}")
    return subsets


def parse_params(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for p in pairs:
        name, sep, value = p.partition("=")
        if not sep or not name.strip():
            raise SettingError(f"{p!r}: write NAME=VALUE, e.g. -P threshold=0.8")
        out[name.strip()] = value.strip()
    return out


def build_request(task: str, ks: str, subsets: str, mode: str | None, limit: int | None, model: str | None,
                  params: tuple[str, ...]) -> GridRequest:
    settings = {**run_defaults(), **parse_params(params)}
    for name, value in (("mode", mode), ("limit", limit), ("model", model)):
        if value is not None:
            settings[name] = str(value)
    for axis in ("task", "k", "subset", "resume"):
        if axis in settings:
            raise SettingError(f"-P {axis}=... : use --{axis} instead" if axis != "resume" else
                               "-P resume=...: the grid resumes interrupted runs itself")
    for name in PATHS:
        value = settings.get(name)
        if value and not Path(value).is_absolute() and Path(value).exists():
            settings[name] = str(Path(value).resolve())
    return GridRequest(task=task, ks=parse_ks(ks), subsets=parse_subsets(subsets),
                       settings=tuple(sorted((n, norm(v)) for n, v in settings.items())))


def run_defaults() -> dict[str, str]:
    """The tracked run's own defaults for the settings a grid does not name, so an omitted
    setting matches what a run logs (a grid without --limit is the whole task, not limit 4)."""
    return {s.name: norm(s.text()) for s in SPECS if s.name in PINNED}

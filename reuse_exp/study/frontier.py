"""The bundled tiny model's frontier: its configurations, declared as data, run as tracked runs.

Each configuration is one tracked run (`reuse-exp run`) into the experiment `frontier`, run by
the grid's machinery: a configuration with a FINISHED clean run at HEAD with the same settings
is done and not run again; the jobs run from a snapshot of HEAD, one at a time, on the CPU with
one thread. The report (frontier_report.py) reads the figures back from the store.

    reuse-exp frontier run [--limit 200]                      # ~1 hour of CPU at 200 items
    reuse-exp frontier run --rerun-contended                  # again those whose timing was contended
    reuse-exp frontier report --out docs/frontier --readme README.md

A new row is one line in CONFIGS: a family (the plot's legend), a label, and the settings
that differ from SHARED.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .cells import Cell, make_cell, resumable, run_defaults
from .grid import DONE, FAILED, CellState, classify, todo
from .speed import timing_of
from .launch import DEFAULT_FOLDER, run_local
from .store import RunRecord, client, experiment_id, experiment_name, fetch_runs, git_state, tracking_uri
from ..settings import DEFAULTS, policy_class

EXPERIMENT = "frontier"
LIMIT = 200            # tiny_gsm items (the whole test split)
THREADS = 1            # on cores other jobs share, torch's threads wait on each other (tiny/model/README.md)
# Every configuration's settings but its own: one batch of every item (a batch decodes as its
# items alone would, so accuracy is the batch-1 accuracy, and it is fast), CPU, float32.
SHARED = {"task": "tiny_gsm", "model": "bundled", "batch_size": 200, "device": "cpu", "dtype": "float32"}


@dataclass(frozen=True)
class Config:
    """One row of the frontier: its family (the plot's legend), a label, and its settings."""
    family: str
    label: str = ""
    settings: tuple[tuple[str, object], ...] = ()

    @property
    def name(self) -> str:
        return f"{self.family} {self.label}".strip()

    def get(self, name: str, default=None):
        return dict(self.settings).get(name, default)

    @property
    def policy(self):
        return policy_class(self.get("policy", DEFAULTS.policy))

    @property
    def learned(self) -> bool:
        """A policy that decides from what it measures (not on a clock): the rows the goal is about."""
        return self.policy.measures

    @property
    def baseline(self) -> bool:
        """At its policy's baseline (k=1): it never reuses, and every row is paired against it."""
        return all(self.get(n, getattr(DEFAULTS, n)) == v for n, v in self.policy.baseline.items())


def config(family: str, label: str = "", **settings) -> Config:
    return Config(family, label, tuple(settings.items()))


# -- the frontier, as data --------------------------------------------------------------------
ADAPTIVE = {"max_reuse": 8}
CONFIGS: tuple[Config, ...] = (
    config("k=1", k=1),
    config("output", "k=2 first", k=2, subset="first", mode="output"),
    config("output", "k=2 middle", k=2, subset="middle", mode="output"),
    config("output", "k=2 last", k=2, subset="last", mode="output"),
    config("output", "k=3 first", k=3, subset="first", mode="output"),
    config("output", "k=3 middle", k=3, subset="middle", mode="output"),
    config("output", "k=3 last", k=3, subset="last", mode="output"),
    config("delta", "k=2 first", k=2, subset="first", mode="delta"),
    config("delta", "k=2 middle", k=2, subset="middle", mode="delta"),
    config("delta", "k=2 last", k=2, subset="last", mode="delta"),
    config("delta", "k=3 first", k=3, subset="first", mode="delta"),
    config("delta", "k=3 middle", k=3, subset="middle", mode="delta"),
    config("delta", "k=3 last", k=3, subset="last", mode="delta"),
    config("replay", "k=2", k=2, mode="replay"),
    config("replay", "k=3", k=3, mode="replay"),
    config("adaptive delta", "0.5", policy="adaptive", mode="delta", drift=0.5, **ADAPTIVE),
    config("adaptive delta", "0.75", policy="adaptive", mode="delta", drift=0.75, **ADAPTIVE),
    config("adaptive delta", "1", policy="adaptive", mode="delta", drift=1.0, **ADAPTIVE),
    config("adaptive delta", "1.25", policy="adaptive", mode="delta", drift=1.25, **ADAPTIVE),
    config("adaptive replay", "0.5", policy="adaptive", mode="replay", drift=0.5, **ADAPTIVE),
    config("adaptive replay", "0.75", policy="adaptive", mode="replay", drift=0.75, **ADAPTIVE),
    config("adaptive replay", "1", policy="adaptive", mode="replay", drift=1.0, **ADAPTIVE),
    config("adaptive replay", "1.1", policy="adaptive", mode="replay", drift=1.1, **ADAPTIVE),
    config("depth delta", "0.5", policy="depth", mode="delta", drift=0.5, **ADAPTIVE),
    config("depth delta", "0.75", policy="depth", mode="delta", drift=0.75, **ADAPTIVE),
    config("depth delta", "1", policy="depth", mode="delta", drift=1.0, **ADAPTIVE),
    config("depth delta", "1.25", policy="depth", mode="delta", drift=1.25, **ADAPTIVE),
)
# Loglikelihood: one forward per request, so no policy can act; measured once, at k=1, every item.
MC = config("tiny_mc", task="tiny_mc", k=1, limit=None)


# -- configurations as the grid's cells --------------------------------------------------------
@dataclass(frozen=True)
class FrontierCell(Cell):
    """A grid cell named by its configuration (the grid's names are k and subset only)."""
    label: str = ""

    @property
    def name(self) -> str:
        return self.label


def cell_of(c: Config, limit: int | None = LIMIT) -> FrontierCell:
    """The configuration's tracked run: every pinned setting at the run's default unless SHARED,
    the limit or the configuration says otherwise; like a grid's cell, it passes only the reuse
    settings that shape it (cells.make_cell), so any run of the same computation counts."""
    values = {**run_defaults(), **SHARED, "limit": limit, **dict(c.settings)}
    task = values.pop("task")
    cell = make_cell({"task": task, **dict(sorted(values.items()))}, baseline=c.baseline)
    return FrontierCell(axes=cell.axes, settings=cell.settings, shaping=cell.shaping, baseline=cell.baseline,
                        label=c.name)


def cells(limit: int | None = LIMIT, configs: tuple[Config, ...] = CONFIGS, mc: Config | None = MC) -> list[FrontierCell]:
    out = [cell_of(c, limit) for c in configs] + ([cell_of(mc, None)] if mc else [])
    names = [c.name for c in out]
    if len(set(names)) != len(names) or len({c.settings for c in out}) != len(out):
        raise ConfigError(f"the frontier declares a configuration twice: {names}")
    return out


def frontier_runs(experiment: str | None = EXPERIMENT) -> tuple[object, str | None, list[RunRecord]]:
    cl = client()
    exp_id = experiment_id(cl, experiment)
    return cl, exp_id, fetch_runs(cl, exp_id)


def status(cells_: list[FrontierCell], runs: list[RunRecord], head: str) -> list[CellState]:
    import time
    now = int(time.time() * 1000)
    return [classify(c, runs, head, now) for c in cells_]


def contended(states: list[CellState]) -> list[FrontierCell]:
    """Done at HEAD, but every run of it there measured its tokens/s under contention."""
    return [s.cell for s in states if s.state == DONE and all(timing_of(r).contended for r in s.runs)]


@contextmanager
def threads(n: int):
    """The jobs' torch threads (OMP_NUM_THREADS, which the tracked run's torch reads at start)."""
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(n)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = before


def run(limit: int | None = LIMIT, experiment: str | None = EXPERIMENT, force: bool = False,
        dry_run: bool = False, echo: Callable[[str], None] = print, folder: Path = DEFAULT_FOLDER,
        configs: tuple[Config, ...] = CONFIGS, mc: Config | None = MC, rerun_contended: bool = False) -> list[str]:
    """Run every configuration not done at HEAD (all with `force`; with `rerun_contended` those
    whose runs' timing was contended too), one tracked run each, in turn; returns the names of
    those that failed. Raises ConfigError on a dirty tree."""
    prov = git_state()
    if prov.dirty and not dry_run:
        raise ConfigError(f"uncommitted changes ({', '.join(prov.dirty_files[:5])}): commit them; the "
                          "frontier's figures come from runs of a commit")
    wanted = cells(limit, configs, mc)
    cl = client()
    exp_id = experiment_id(cl, experiment, create=not dry_run)
    states = status(wanted, fetch_runs(cl, exp_id), prov.commit)
    go = todo(states, force)
    go += [c for c in contended(states) if rerun_contended and c not in go]
    resume = {} if force else {s.cell: rid for s in states if s.state == FAILED and (rid := resumable(s.runs))}
    for s in states:
        if s.cell not in go:
            echo(f"skip {s.cell.name}: {s.state} ({', '.join(r.short() for r in s.runs[:1])})")
    if not go:
        echo(f"nothing to run: all {len(states)} configuration(s) done at {prov.commit[:7]}")
        return []
    if dry_run:
        for c in go:
            echo(f"would run {c.name}")
        return []
    with threads(THREADS):
        return run_local(go, tracking_uri(), experiment_name(experiment), False, prov.commit, echo=echo,
                         folder=folder, resume=resume, repo=prov.root)

"""The study's grid (per task, the axes its policy declares: k x subset for the fixed policy),
read from and run against MLflow.

A configuration is *done* only when a FINISHED, clean run of it exists at the
current commit with the same settings. A summary file, or a run at another commit,
does not count: that is how the old shell runner put three commits in one table.

    reuse-exp grid status --task tiny_gsm --limit 4
    reuse-exp grid run    --task tiny_gsm --limit 4 [--k 1,2,3] [--subset first,last] [--dry-run]
    reuse-exp grid run    --task gsm8k --executor slurm --partition gpu --gpus 1 --time 240

The policy's baseline (k=1) is one run per grid, whatever the subsets: it computes every
layer. For a loglikelihood task the grid is that run alone: reuse acts between the denoising
steps of generation, and scoring runs every layer, so no reuse setting changes the result
(the run tags say so too).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path
from typing import Callable

from ..errors import DirtyTree, GridFailed
from ..knobs import ANY_ENVIRONMENT, knob_set
from ..settings import to_text
from .cells import LOGLIKELIHOOD, LOGLIKELIHOOD_WHY, Cell, GridRequest, resumable, run_command, spanning_why, task_kind
from .environments import here, same_here
from .launch import SubmititOptions, run_local, submit
from .store import (LIVE, STALE_AFTER_S, RunRecord, client, end_command, experiment_id, experiment_name,
                    fetch_runs, git_state, tracking_uri)

# -- status ---------------------------------------------------------------------------------
DONE, STALE, FAILED, RUNNING, MISSING = "done", "stale", "failed", "running", "missing"
OTHER_ENVIRONMENT = ("done at HEAD in another environment only (GPU model, CUDA or library versions): "
                     "not done here; --any-environment if it does not matter for this grid")


@dataclass
class CellState:
    cell: Cell
    state: str
    runs: list[RunRecord] = field(default_factory=list)   # the runs behind the state, newest first
    note: str = ""

    def label(self) -> str:
        if self.state == STALE and self.note == OTHER_ENVIRONMENT:
            return "stale@env"
        if self.state == STALE:
            return f"stale@{self.runs[0].commit[:7] if self.runs[0].commit else '?'}"
        return self.state


def classify(cell: Cell, runs: list[RunRecord], head: str, now_ms: int,
             stale_after_s: float = STALE_AFTER_S, where: Callable[[str], tuple] | None = here) -> CellState:
    """done at HEAD > running > failed (or dead) at HEAD > stale (done elsewhere) > missing.

    Done means done here: at HEAD, in the environment a run here would get (`where`: what this
    machine can know of it; None: the user said the environment does not matter for this grid).
    A run at HEAD in another environment makes the cell stale. A dead run (RUNNING, its
    heartbeat older than `stale_after_s`) is a failed one: its configuration is not done and
    `grid run` runs it again."""
    # A refused run never evaluated (mlflow run's stays FAILED a few seconds, till its aftercare
    # deletes it): it must not hide the run it refused to resume, nor count as a failure.
    mine = sorted((r for r in runs if cell.matches(r) and r.role == "run" and not r.refused),
                  key=lambda r: r.start_ms, reverse=True)
    at_head = [r for r in mine if r.commit == head and not r.dirty and (where is None or same_here(r, where))]
    done = [r for r in at_head if r.status == "FINISHED"]
    if done:
        return CellState(cell, DONE, done)
    live = [r for r in at_head if r.status in LIVE]
    alive = [r for r in live if not r.is_dead(now_ms, stale_after_s)]
    if alive:
        return CellState(cell, RUNNING, alive)
    dead = [r for r in live if r not in alive]
    bad = [r for r in at_head if r.status in ("FAILED", "KILLED")] + dead
    if bad:
        note = (f"{len(dead)} dead: RUNNING, {dead[0].last_sign_of_life(now_ms)}; "
                f"end it with `{end_command(dead[0].run_id, stale_after_s)}`") if dead else ""
        return CellState(cell, FAILED, sorted(bad, key=lambda r: r.start_ms, reverse=True), note)
    elsewhere = [r for r in mine if r.status == "FINISHED"]
    if elsewhere:
        clean_head = [r for r in elsewhere if r.commit == head and not r.dirty]
        note = (OTHER_ENVIRONMENT if clean_head else
                "dirty tree" if all(r.commit == head for r in elsewhere) else "")
        return CellState(cell, STALE, elsewhere, note)
    return CellState(cell, MISSING)


def grid_status(request: GridRequest, runs: list[RunRecord], head: str, kind: str,
                now_ms: int | None = None, stale_after_s: float = STALE_AFTER_S,
                where: Callable[[str], tuple] | None = here) -> list[CellState]:
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return [classify(c, runs, head, now_ms, stale_after_s, where) for c in request.cells(kind)]


def format_status(request: GridRequest, states: list[CellState], head: str, kind: str,
                  experiment: str, root: Path | None = None) -> str:
    extra = " ".join(f"{n}={to_text(v)}" for n, v in request.settings if to_text(v) not in ("", "none"))
    lines = [f"grid {request.task} [{extra}] in experiment {experiment!r} at HEAD {head[:7]}"
             + (f" of {root}" if root else "")]
    if kind == LOGLIKELIHOOD:
        lines.append(LOGLIKELIHOOD_WHY.format(task=request.task, baseline=request.describe_baseline()))
    lines += table(request, states)
    counts = {st: sum(s.state == st for s in states) for st in (DONE, STALE, FAILED, RUNNING, MISSING)}
    lines.append(f"done at HEAD {counts[DONE]}/{len(states)}, stale {counts[STALE]}, failed {counts[FAILED]}, "
                 f"running {counts[RUNNING]}, missing {counts[MISSING]}")
    for s in states:
        if s.state != MISSING:
            runs = ", ".join(r.short() + ("" if s.state != FAILED else f" {'dead' if r.status in LIVE else r.status}")
                             for r in s.runs[:3])
            lines.append(f"  {s.cell.name:<10} {s.state:<8} {runs}{'  (' + s.note + ')' if s.note else ''}")
    return "\n".join(lines)


def table(request: GridRequest, states: list[CellState]) -> list[str]:
    """The states laid out on the policy's axes: a row per value of the first, a column per value
    of the others (one column for a single axis); a cell that spans the columns (k=1: every
    subset) fills its row, saying why."""
    names = [n for n, _ in request.axes]
    row_axis, columns = names[0], names[1:]
    def column_of(cell: Cell) -> str:
        return "_".join(to_text(cell.value(a)) for a in columns)
    wanted = ["_".join(map(to_text, point)) for point in product(*(vs for n, vs in request.axes if n in columns))]
    used = [c for c in wanted if any(column_of(s.cell) == c for s in states)] if columns else [""]
    width = max(14, *(len(s.label()) + 2 for s in states)) if states else 14
    rows = list(dict.fromkeys(to_text(s.cell.value(row_axis)) for s in states))
    head = max(6, *(len(f"{row_axis}={r}") + 1 for r in rows)) if rows else 6
    lines = [" " * head + "".join(f"{c:<{width}}" for c in used)] if columns and used else []
    for r in rows:
        mine = [s for s in states if to_text(s.cell.value(row_axis)) == r]
        span = next((s for s in mine if columns and set(columns) <= set(s.cell.spans)), None)
        if span:
            row = f"{span.label():<{width}}({spanning_why(span.cell, request)})"
        else:
            by_column = {column_of(s.cell) if columns else "": s for s in mine}
            row = "".join(f"{by_column[c].label() if c in by_column else '':<{width}}" for c in used)
        lines.append(f"{row_axis + '=' + r:<{head}}{row}".rstrip())
    return lines


def todo(states: list[CellState], force: bool) -> list[Cell]:
    """What `grid run` launches: everything not done (or running), or everything with --force."""
    if force:
        return [s.cell for s in states]
    return [s.cell for s in states if s.state not in (DONE, RUNNING)]


# -- the grid's commands, as functions: they raise the package's errors, the CLI prints them ---------
@dataclass(frozen=True)
class GridView:
    """A grid request against the store: its runs, the task's kind and each cell's state."""
    request: GridRequest
    head: str
    root: Path          # the checkout whose HEAD it is: the current directory's
    experiment_id: str
    kind: str
    states: list[CellState]


def load(request: GridRequest, experiment: str | None, stale_after_s: float = STALE_AFTER_S,
         create: bool = False, any_environment: bool = False) -> GridView:
    """The grid's state at the HEAD of the checkout here (`any_environment`: wherever it ran);
    `create`: make the experiment when it does not exist yet."""
    code = git_state()
    head = code.commit
    cl = client()
    exp_id = experiment_id(cl, experiment, create=create)
    runs = fetch_runs(cl, exp_id, request.task)
    kind = task_kind(request.task, runs)
    return GridView(request, head, code.root, exp_id, kind,
                    grid_status(request, runs, head, kind, None, stale_after_s, None if any_environment else here))


def status(request: GridRequest, experiment: str | None, stale_after_s: float = STALE_AFTER_S,
           any_environment: bool = False) -> str:
    """The grid as text: done at HEAD (here), stale, failed, running, missing."""
    view = load(request, experiment, stale_after_s, any_environment=any_environment)
    return format_status(request, view.states, view.head, view.kind, experiment_name(experiment), view.root)


@dataclass(frozen=True)
class Launch:
    """Where a grid's jobs run: `local` (one process per configuration, in turn or one per GPU),
    `slurm` (a submitit array job) or `submitit-local` (the same array as local processes)."""
    executor: str = "local"
    options: SubmititOptions = SubmititOptions()   # cluster is set from the executor
    wait: bool | None = None                       # None: wait for submitit-local, not for slurm

    EXECUTORS = ("local", "slurm", "submitit-local")


def check_tree(allow_dirty: bool, dry_run: bool) -> None:
    """A grid runs committed code: its runs count as done only then."""
    dirty = git_state().dirty_files
    if dirty and not allow_dirty and not dry_run:
        raise DirtyTree(f"uncommitted changes ({', '.join(dirty[:5])}{' ...' if len(dirty) > 5 else ''}):"
                        " commit them, or pass --allow-dirty (such runs never count as done)")


def run(request: GridRequest, experiment: str | None, launch: Launch = Launch(), *, force: bool = False,
        allow_dirty: bool = False, dry_run: bool = False, stale_after_s: float = STALE_AFTER_S,
        any_environment: bool = False, echo: Callable[[str], None] = print) -> None:
    """Run the configurations with no FINISHED run at this commit with the same settings, here
    (`any_environment`: anywhere; the runs are tagged so). Raises GridFailed when some failed,
    GridStopped when a signal stopped a local grid."""
    check_tree(allow_dirty, dry_run)
    view = load(request, experiment, stale_after_s, create=not dry_run, any_environment=any_environment)
    states, head = view.states, view.head
    echo(f"checkout {view.root} at {head[:7]}")
    if view.kind == LOGLIKELIHOOD:
        echo(LOGLIKELIHOOD_WHY.format(task=request.task, baseline=request.describe_baseline()))
    cells = todo(states, force)
    # A cell whose run was killed or died resumes it, at this commit with these settings.
    resume = {} if force else {s.cell: rid for s in states if s.state == FAILED and (rid := resumable(s.runs))}
    for cell, rid in resume.items():
        echo(f"resume {cell.name}: run {rid[:8]} was interrupted; its finished requests are kept")
    for s in states:
        if s.cell not in cells:
            echo(f"skip {s.cell.name}: {s.state} ({', '.join(r.short() for r in s.runs[:1])})")
    for s in states:
        if s.cell in cells and s.state == FAILED and any(r.status in LIVE for r in s.runs):
            echo(f"{s.cell.name}: {s.note}; running it again")
    if not cells:
        echo(f"nothing to run: all {len(states)} configuration(s) done at {head[:7]}")
        return
    uri, exp = tracking_uri(), experiment_name(experiment)
    if dry_run:
        for c in cells:
            echo(f"would run {c.name}: {' '.join(run_command(c, allow_dirty, resume.get(c))[3:])}")
        return
    with knob_set(ANY_ENVIRONMENT, any_environment):   # the jobs inherit it and tag their runs
        _launch(cells, uri, exp, allow_dirty, head, view.root, launch, resume, echo)


def _launch(cells, uri, exp, allow_dirty, head, root, launch, resume, echo) -> None:
    hint = None
    opts = launch.options
    if launch.executor == "local":
        failed = run_local(cells, uri, exp, allow_dirty, head, echo=echo, gpus=opts.gpus, resume=resume,
                           folder=opts.folder, repo=root)
    else:
        opts = replace(opts, cluster="local" if launch.executor == "submitit-local" else "slurm")
        wait = (launch.executor == "submitit-local") if launch.wait is None else launch.wait
        failed, hint = submit(cells, uri, exp, allow_dirty, opts, wait=wait, commit=head, echo=echo, resume=resume,
                              repo=root)
    if hint:
        raise GridFailed(hint)
    if failed:
        raise GridFailed(f"{len(failed)} of {len(cells)} configuration(s) failed: {', '.join(failed)}"
                         " (they stay failed or missing in `reuse-exp grid status`)")

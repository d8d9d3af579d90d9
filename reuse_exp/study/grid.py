"""The study's grid (k x subset, per task), read from and run against MLflow.

A configuration is *done* only when a FINISHED, clean run of it exists at the
current commit with the same settings. A summary file, or a run at another commit,
does not count: that is how the old shell runner put three commits in one table.

    reuse-exp grid status --task tiny_gsm --limit 4
    reuse-exp grid run    --task tiny_gsm --limit 4 [--k 1,2,3] [--subset first,last] [--dry-run]
    reuse-exp grid run    --task gsm8k --executor slurm --partition gpu --gpus 1 --time 240

The k=1 baseline is one run per grid, whatever the subsets: it computes every layer.
For a loglikelihood task the grid is that run alone: reuse acts between the denoising
steps of generation, and scoring runs every layer, so every k and subset give the
same result (the run tags say so too).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from ..engine.config import ConfigError
from ..settings import SettingError, to_text
from .cells import (ANY_SUBSET, BASELINE_WHY, LOGLIKELIHOOD, LOGLIKELIHOOD_WHY, Cell, GridRequest,
                    build_request, grid_options, resumable, run_command, task_kind)
from .launch import GridStopped, run_local
from .store import (LIVE, STALE_AFTER_S, RunRecord, client, experiment_id, experiment_name, fetch_runs, git_head,
                    git_state, tracking_uri)

# -- status ---------------------------------------------------------------------------------
DONE, STALE, FAILED, RUNNING, MISSING = "done", "stale", "failed", "running", "missing"


@dataclass
class CellState:
    cell: Cell
    state: str
    runs: list[RunRecord] = field(default_factory=list)   # the runs behind the state, newest first
    note: str = ""

    def label(self) -> str:
        if self.state == STALE:
            return f"stale@{self.runs[0].commit[:7] if self.runs[0].commit else '?'}"
        return self.state


def classify(cell: Cell, runs: list[RunRecord], head: str, now_ms: int,
             stale_after_s: float = STALE_AFTER_S) -> CellState:
    """done at HEAD > running > failed (or dead) at HEAD > stale (done elsewhere) > missing.

    A dead run (RUNNING, its heartbeat older than `stale_after_s`) is a failed one: its
    configuration is not done and `grid run` runs it again."""
    mine = sorted((r for r in runs if cell.matches(r) and r.role == "run"),
                  key=lambda r: r.start_ms, reverse=True)
    at_head = [r for r in mine if r.commit == head and not r.dirty]
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
                f"end it with `reuse-exp runs end {dead[0].run_id}`") if dead else ""
        return CellState(cell, FAILED, sorted(bad, key=lambda r: r.start_ms, reverse=True), note)
    elsewhere = [r for r in mine if r.status == "FINISHED"]
    if elsewhere:
        note = "dirty tree" if all(r.commit == head for r in elsewhere) else ""
        return CellState(cell, STALE, elsewhere, note)
    return CellState(cell, MISSING)


def grid_status(request: GridRequest, runs: list[RunRecord], head: str, kind: str,
                now_ms: int | None = None, stale_after_s: float = STALE_AFTER_S) -> list[CellState]:
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return [classify(c, runs, head, now_ms, stale_after_s) for c in request.cells(kind)]


def format_status(request: GridRequest, states: list[CellState], head: str, kind: str,
                  experiment: str) -> str:
    extra = " ".join(f"{n}={to_text(v)}" for n, v in request.settings if to_text(v) not in ("", "none"))
    lines = [f"grid {request.task} [{extra}] in experiment {experiment!r} at HEAD {head[:7]}"]
    if kind == LOGLIKELIHOOD:
        lines.append(LOGLIKELIHOOD_WHY.format(task=request.task))
    by_cell = {(s.cell.k, s.cell.subset): s for s in states}
    subsets = [s for s in request.subsets if any(c[1] == s for c in by_cell)]
    ks = sorted({c[0] for c in by_cell})
    width = max(14, *(len(s.label()) + 2 for s in states))
    if subsets:
        lines.append(" " * 6 + "".join(f"{to_text(s):<{width}}" for s in subsets))
    for k in ks:
        if (k, ANY_SUBSET) in by_cell:   # the baseline: one cell across the subsets
            row = f"{by_cell[(k, ANY_SUBSET)].label():<{width}}" + (f"({BASELINE_WHY})" if subsets else "")
        else:
            row = "".join(f"{by_cell[(k, s)].label() if (k, s) in by_cell else '':<{width}}" for s in subsets)
        lines.append(f"k={k:<4}{row}".rstrip())
    counts = {st: sum(s.state == st for s in states) for st in (DONE, STALE, FAILED, RUNNING, MISSING)}
    lines.append(f"done at HEAD {counts[DONE]}/{len(states)}, stale {counts[STALE]}, failed {counts[FAILED]}, "
                 f"running {counts[RUNNING]}, missing {counts[MISSING]}")
    for s in states:
        if s.state != MISSING:
            runs = ", ".join(r.short() + ("" if s.state != FAILED else f" {'dead' if r.status in LIVE else r.status}")
                             for r in s.runs[:3])
            lines.append(f"  {s.cell.name:<10} {s.state:<8} {runs}{'  (' + s.note + ')' if s.note else ''}")
    return "\n".join(lines)


def todo(states: list[CellState], force: bool) -> list[Cell]:
    """What `grid run` launches: everything not done (or running), or everything with --force."""
    if force:
        return [s.cell for s in states]
    return [s.cell for s in states if s.state not in (DONE, RUNNING)]


@click.group("grid")
def grid() -> None:
    """The k x subset grid of a task: what is done at this commit, and running the rest."""


def _load(task, ks, subsets, mode, limit, model, params, experiment, stale_after, create=False):
    try:
        request = build_request(task, ks, subsets, mode, limit, model, params)
        head = git_head()
        cl = client()
        exp_id = experiment_id(cl, experiment, create=create)
        runs = fetch_runs(cl, exp_id, task)
        kind = task_kind(task, runs)
    except SettingError as e:   # a value the run would refuse too: a usage error, as `run` gives
        raise click.UsageError(str(e)) from None
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    return request, head, exp_id, runs, kind, grid_status(request, runs, head, kind, None, stale_after)


@grid.command("status")
@grid_options
def status_cmd(task, ks, subsets, mode, limit, model, params, experiment, stale_after) -> None:
    """Print the grid: done at HEAD, stale (done only at another commit), failed, running, missing."""
    request, head, _, _, kind, states = _load(task, ks, subsets, mode, limit, model, params, experiment,
                                               stale_after)
    click.echo(format_status(request, states, head, kind, experiment_name(experiment)))


@grid.command("run")
@grid_options
@click.option("--dry-run", is_flag=True, help="print what would run, run nothing")
@click.option("--force", is_flag=True, help="run every configuration, done or not")
@click.option("--allow-dirty", is_flag=True, help="pass allow_dirty to the runs (they never count as done)")
@click.option("--executor", type=click.Choice(["local", "slurm", "submitit-local"]), default="local",
              show_default=True, help="local: one process per configuration, in turn; slurm: an array job "
              "through submitit; submitit-local: the same array as local processes, concurrently")
@click.option("--partition", default=None, help="slurm: partition")
@click.option("--gpus", type=int, default=None, help="GPUs per job (default: the runs' processes, else 1); "
              "local and submitit-local run one job per GPU (or per g GPUs) at a time, each on its own")
@click.option("--time", "time_min", type=int, default=240, show_default=True, help="slurm: minutes per job")
@click.option("--account", default=None, help="slurm: account")
@click.option("--cpus", type=int, default=None, help="slurm: CPUs per job")
@click.option("--jobs-dir", type=click.Path(file_okay=False), default=None,
              help="folder for job scripts, logs and the snapshots jobs run from (default "
              "~/.cache/reuse_exp/submitit, outside the checkout so the tree stays clean)")
@click.option("--wait/--no-wait", default=None, help="wait for submitted jobs (default: wait for "
              "submitit-local, not for slurm)")
def run_cmd(task, ks, subsets, mode, limit, model, params, experiment, stale_after, dry_run, force,
            allow_dirty, executor, partition, gpus, time_min, account, cpus, jobs_dir, wait) -> None:
    """Run the configurations with no FINISHED run at this commit with the same settings."""
    dirty = git_state().dirty_files
    if dirty and not allow_dirty and not dry_run:
        raise click.ClickException(f"uncommitted changes ({', '.join(dirty[:5])}{' ...' if len(dirty) > 5 else ''}):"
                                   " commit them, or pass --allow-dirty (such runs never count as done)")
    request, head, _, _, kind, states = _load(task, ks, subsets, mode, limit, model, params, experiment,
                                               stale_after, create=not dry_run)
    if kind == LOGLIKELIHOOD:
        click.echo(LOGLIKELIHOOD_WHY.format(task=task))
    cells = todo(states, force)
    # A cell whose run was killed or died resumes it, at this commit with these settings.
    resume = {} if force else {s.cell: rid for s in states if s.state == FAILED and (rid := resumable(s.runs))}
    for cell, rid in resume.items():
        click.echo(f"resume {cell.name}: run {rid[:8]} was interrupted; its finished requests are kept")
    skipped = [s for s in states if s.cell not in cells]
    for s in skipped:
        click.echo(f"skip {s.cell.name}: {s.state} ({', '.join(r.short() for r in s.runs[:1])})")
    for s in states:
        if s.cell in cells and s.state == FAILED and any(r.status in LIVE for r in s.runs):
            click.echo(f"{s.cell.name}: {s.note}; running it again")
    if not cells:
        click.echo(f"nothing to run: all {len(states)} configuration(s) done at {head[:7]}")
        return
    uri, exp = tracking_uri(), experiment_name(experiment)
    if dry_run:
        for c in cells:
            click.echo(f"would run {c.name}: {' '.join(run_command(c, allow_dirty, resume.get(c))[3:])}")
        return
    hint = None
    try:
        if executor == "local":
            failed = run_local(cells, uri, exp, allow_dirty, head, echo=click.echo, gpus=gpus, resume=resume,
                               **({"folder": Path(jobs_dir)} if jobs_dir else {}))
        else:
            from .launch import SubmititOptions, submit
            opts = SubmititOptions(cluster="local" if executor == "submitit-local" else "slurm",
                                   partition=partition, gpus=gpus, time_min=time_min, account=account, cpus=cpus,
                                   **({"folder": Path(jobs_dir)} if jobs_dir else {}))
            failed, hint = submit(cells, uri, exp, allow_dirty, opts,
                                  wait=(executor == "submitit-local") if wait is None else wait, commit=head,
                                  echo=click.echo, resume=resume)
    except ConfigError as e:   # no GPU for the runs' device, a snapshot git could not make, ...
        raise click.ClickException(str(e)) from None
    except GridStopped as e:
        click.echo(f"reuse-exp: {e}", err=True)
        sys.exit(e.code)
    if hint:
        raise click.ClickException(hint)
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(cells)} configuration(s) failed: {', '.join(failed)}"
                                   " (they stay failed or missing in `reuse-exp grid status`)")

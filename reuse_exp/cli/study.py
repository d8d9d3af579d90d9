"""The study's commands: `grid status|run`, `compare`, `audit`, `runs end`, `ui`. Each parses its
options and calls study/, which raises the package's errors; they end as one line here."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import GridStopped
from ..study import audit as audit_mod, compare as compare_mod, grid as grid_mod, runs as runs_mod, ui as ui_mod
from ..settings import REUSE, grid_settings, spec
from ..study.cells import build_request
from ..study.launch import DEFAULT_FOLDER, SubmititOptions
from .options import one_line, stale_after_option


def _help(name: str, prefix: str = "") -> str:
    """An option's help from its setting's declaration, so the grid says what `run` says."""
    s = spec(name)
    allowed = f" ({', '.join(s.choices)})" if s.choices else ""
    return prefix + s.help.replace("`", "") + allowed + "; default: the run's"


def _reuse_help(name: str) -> str:
    s = spec(name)
    allowed = f" ({', '.join(s.choices)})" if s.choices else ""
    return ("a grid axis where the policy declares one (a comma list; default: the policy's values), else one "
            f"value for every configuration that computes it: {s.help.replace('`', '')}{allowed}")


def grid_options(f):
    f = stale_after_option()(f)
    reuse = [click.option(spec(n).option, n, default=None, help=_reuse_help(n)) for n in grid_settings(REUSE)]
    for opt in reversed([
        click.option("--task", required=True, help="lm-eval task name (or a bundled one: tiny_gsm, tiny_mc)"),
        *reuse,
        click.option("--limit", default=None, help=_help("limit")),
        click.option("--model", default=None, help=_help("model", "model for every run: ")),
        click.option("-P", "--param", "params", multiple=True, metavar="NAME=VALUE",
                     help="any other setting of the tracked run, for every configuration (values as `run` takes "
                          "them); -P policy=NAME picks the policy whose axes the grid varies (default: fixed)"),
        click.option("--experiment", default=None, help="MLflow experiment (default: MLFLOW_EXPERIMENT_NAME "
                     "or Default)"),
    ]):
        f = opt(f)
    return f


# -- grid -----------------------------------------------------------------------------------
@click.group("grid")
def grid() -> None:
    """The grid of a task (its policy's axes: k x subset for the fixed policy): what is done at this
    commit, and running the rest."""


ANY_ENVIRONMENT_HELP = ("the environment does not matter for this grid: a run done at this commit on another "
                        "GPU model or library set counts as done (the runs are tagged reuse_exp.any_environment)")


@grid.command("status")
@grid_options
@click.option("--any-environment", is_flag=True, help=ANY_ENVIRONMENT_HELP)
def status_cmd(task, limit, model, params, experiment, stale_after, any_environment, **reuse) -> None:
    """Print the grid: done at HEAD here, stale (done only at another commit or in another
    environment), failed, running, missing."""
    with one_line():
        request = build_request(task, limit=limit, model=model, params=params, **reuse)
        click.echo(grid_mod.status(request, experiment, stale_after, any_environment))


@grid.command("run")
@grid_options
@click.option("--dry-run", is_flag=True, help="print what would run, run nothing")
@click.option("--force", is_flag=True, help="run every configuration, done or not")
@click.option("--any-environment", is_flag=True, help=ANY_ENVIRONMENT_HELP)
@click.option("--allow-dirty", is_flag=True, help="pass allow_dirty to the runs (they never count as done)")
@click.option("--executor", type=click.Choice(grid_mod.Launch.EXECUTORS), default="local",
              show_default=True, help="local: one process per configuration, in turn; slurm: an array job "
              "through submitit; submitit-local: the same array as local processes, concurrently")
@click.option("--partition", default=None, help="slurm: partition")
@click.option("--gpus", type=int, default=None, help="GPUs per job (default: the runs' processes, else 1); "
              "local and submitit-local run one job per GPU (or per g GPUs) at a time, each on its own")
@click.option("--time", "time_min", type=int, default=240, show_default=True, help="slurm: minutes per job")
@click.option("--account", default=None, help="slurm: account")
@click.option("--cpus", type=int, default=None, help="slurm: CPUs per job")
@click.option("--jobs-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder for job scripts, logs and the snapshots jobs run from (default "
              "~/.cache/reuse_exp/submitit, outside the checkout so the tree stays clean)")
@click.option("--wait/--no-wait", default=None, help="wait for submitted jobs (default: wait for "
              "submitit-local, not for slurm)")
def run_cmd(task, limit, model, params, experiment, stale_after, dry_run, force, any_environment, allow_dirty,
            executor, partition, gpus, time_min, account, cpus, jobs_dir, wait, **reuse) -> None:
    """Run the configurations with no FINISHED run at this commit with the same settings."""
    options = SubmititOptions(folder=jobs_dir or DEFAULT_FOLDER, partition=partition, gpus=gpus,
                              time_min=time_min, account=account, cpus=cpus)
    try:
        with one_line():
            request = build_request(task, limit=limit, model=model, params=params, **reuse)
            grid_mod.run(request, experiment, grid_mod.Launch(executor, options, wait), force=force,
                         allow_dirty=allow_dirty, dry_run=dry_run, stale_after_s=stale_after,
                         any_environment=any_environment, echo=click.echo)
    except GridStopped as e:
        click.echo(f"reuse-exp: {e}", err=True)
        sys.exit(e.code)


# -- compare, audit, runs ---------------------------------------------------------------------
@click.command("compare")
@grid_options
@click.option("--commit", default=None, help="compare runs of this commit (default: HEAD)")
@click.option("--include-other-commits", is_flag=True, help="fill configurations missing at the commit "
              "with their newest run from another commit (starred)")
@click.option("--include-dirty", is_flag=True, help="allow runs from uncommitted changes (starred)")
@click.option("--include-other-environments", is_flag=True, help="allow runs that computed in another "
              "environment (GPU model, CUDA or library versions) or read other data (starred, the difference shown)")
@click.option("--allow-contended", is_flag=True, help="allow runs whose timing was contended (other processes "
              "took their CPUs, a GPU throttled): starred, the reason shown")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="also write compare.txt and compare.png here")
@click.option("--no-log", is_flag=True, help="print only; log nothing to MLflow")
def compare_cmd(task, limit, model, params, experiment, stale_after, commit, include_other_commits, include_dirty,
                include_other_environments, allow_contended, out, no_log, **reuse) -> None:
    """Per configuration: n, accuracy ± stderr, tokens/s with spread and noise, speed against the
    policy's baseline (k=1) with an interval, outputs changed against it; and a plot. From one commit."""
    with one_line():
        request = build_request(task, limit=limit, model=model, params=params, **reuse)
        parent = compare_mod.compare(request, experiment, commit, include_other_commits=include_other_commits,
                                     include_dirty=include_dirty,
                                     include_other_environments=include_other_environments,
                                     allow_contended=allow_contended, out=out,
                                     log=not no_log, echo=click.echo)
    if parent:
        click.echo(f"\nlogged to parent run {parent}")


@click.command("audit")
@click.option("--experiment", default=None, help="experiment to check (default: MLFLOW_EXPERIMENT_NAME or Default)")
@click.option("--all-experiments", is_flag=True, help="check every experiment of the store")
@stale_after_option()
@click.option("--speed", is_flag=True, help="also fail on speed regressions: one configuration's tokens/s at a "
              "commit below the commit before's by more than the runs' noise (runs with clean timing only)")
def audit_cmd(experiment, all_experiments, stale_after, speed) -> None:
    """Fail, listing run ids and reasons, if any run is untrustworthy (CI guard)."""
    with one_line():
        audit_mod.audit_store(experiment, all_experiments, stale_after, echo=click.echo, speed=speed)


@click.group("runs")
def runs() -> None:
    """Tracked runs one at a time."""


@runs.command("end")
@click.argument("run_id")
@click.option("--reason", default=None, help="why it ended (tag reuse_exp.end_reason); default: its last heartbeat")
@stale_after_option()
@click.option("--force", is_flag=True, help="end it even though its heartbeat is recent")
def end_cmd(run_id, reason, stale_after, force) -> None:
    """Mark a dead RUNNING run KILLED, with a reason tag."""
    with one_line():
        reason = runs_mod.end(run_id, reason, stale_after, force)
    click.echo(f"ended {run_id} KILLED: {reason}")


@click.command("ui")
@click.option("--store", default=None, help="the tracking store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
@click.option("--experiment", default=None, help="experiment to open (default: MLFLOW_EXPERIMENT_NAME, else the "
              "one of the newest run)")
@click.option("--host", default="127.0.0.1", show_default=True, help="where `mlflow server` listens")
@click.option("--port", type=int, default=5000, show_default=True, help="where `mlflow server` listens")
@click.option("--no-browser", is_flag=True, help="print the address only")
def ui_cmd(store, experiment, host, port, no_browser) -> None:
    """The MLflow UI of the store, opened on the study's view: configuration, commit and result of every run."""
    from ..tracking.store_init import absolute_uri, tracking_uri
    with one_line():
        ui_mod.serve(absolute_uri(store) if store else tracking_uri(), experiment, host, port,
                     browser=not no_browser, echo=click.echo)

"""`reuse-exp runs end RUN_ID`: end a dead run KILLED, with the reason as a tag.

A run whose process was killed outright (SIGKILL, the OOM killer, a lost node) stays
RUNNING forever: nothing is left to end it. The audit names such runs and this command.
A live run (a recent heartbeat) is refused: stop its process, and it ends itself.
"""
from __future__ import annotations

import time

import click

from .cells import stale_after_option
from .store import LIVE, RunRecord, client, end_dead, format_duration, tracking_uri


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
    from mlflow.exceptions import MlflowException
    cl = client()
    try:
        run = RunRecord.from_run(cl.get_run(run_id))
    except MlflowException:
        raise click.ClickException(f"no run {run_id} in {tracking_uri()}: check the id, or set "
                                   "MLFLOW_TRACKING_URI to its store") from None
    now_ms = int(time.time() * 1000)
    if run.status not in LIVE:
        raise click.ClickException(f"run {run_id} already ended {run.status}: nothing to do")
    if not run.is_dead(now_ms, stale_after) and not force:
        raise click.ClickException(f"run {run_id} looks alive ({run.last_sign_of_life(now_ms)}, less than "
                                   f"{format_duration(stale_after)}): stop its process and it ends itself, "
                                   "or pass --force")
    reason = reason or f"dead: {run.last_sign_of_life(now_ms)}; ended by `reuse-exp runs end`"
    end_dead(cl, run, reason)
    click.echo(f"ended {run_id} KILLED: {reason}")

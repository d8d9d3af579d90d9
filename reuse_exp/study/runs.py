"""`reuse-exp runs end RUN_ID`: end a dead run KILLED, with the reason as a tag.

A run whose process was killed outright (SIGKILL, the OOM killer, a lost node) stays
RUNNING forever: nothing is left to end it. The audit names such runs and this command.
A live run (a recent heartbeat) is refused: stop its process, and it ends itself.
"""
from __future__ import annotations

import time

from ..errors import ConfigError
from .store import LIVE, STALE_AFTER_S, RunRecord, client, end_dead, format_duration, tracking_uri


def end(run_id: str, reason: str | None = None, stale_after_s: float = STALE_AFTER_S, force: bool = False) -> str:
    """Mark a dead RUNNING run KILLED, with a reason tag; returns the reason. A live one (a recent
    heartbeat) is refused unless `force`."""
    from mlflow.exceptions import MlflowException
    cl = client()
    try:
        run = RunRecord.from_run(cl.get_run(run_id))
    except MlflowException:
        raise ConfigError(f"no run {run_id} in {tracking_uri()}: check the id, or set "
                          "MLFLOW_TRACKING_URI to its store") from None
    now_ms = int(time.time() * 1000)
    if run.status not in LIVE:
        raise ConfigError(f"run {run_id} already ended {run.status}: nothing to do")
    if not run.is_dead(now_ms, stale_after_s) and not force:
        raise ConfigError(f"run {run_id} looks alive ({run.last_sign_of_life(now_ms)}, less than "
                          f"{format_duration(stale_after_s)}): stop its process and it ends itself, "
                          "or pass --force")
    reason = reason or f"dead: {run.last_sign_of_life(now_ms)}; ended by `reuse-exp runs end`"
    end_dead(cl, run, reason)
    return reason

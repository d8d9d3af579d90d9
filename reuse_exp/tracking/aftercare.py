"""What becomes of a run `mlflow run` opened, once MLflow is done with it.

MLflow's own ending comes last: once its child exits, `mlflow run` marks the run FAILED unless
it FINISHED, and it may end only an active run. Two things therefore need a process that
outlives both, so a tracked run under `mlflow run` leaves one behind: a bare Python process
(stdlib only, no open pipes, a session of its own) that waits until MLflow and the tracked
process have both exited, then
- deletes a refused run (a typo, a dirty tree: `reuse_exp.refused`): MLflow's soft delete, so
  it leaves the runs table's default view ("State: Active") and keeps its record, which the
  audit counts and `mlflow runs restore` brings back;
- ends KILLED, with the reason, a run whose process died without ending it (SIGKILL: the OOM
  killer, `kill -9`; or a crash) and which MLflow then marked FAILED with no word of why: so the
  grid resumes it from its request cache instead of starting again.
Runs the tracked process ended itself (`end_status`), or that FINISHED, are left as they are.
`reuse-exp run` needs none of this: no MLflow process ends its runs after it.
"""
from __future__ import annotations

import os
import select
import subprocess
import sys
import time

DIED = ("its process died without ending the run (killed by SIGKILL: the OOM killer, or kill -9; or it "
        "crashed), and `mlflow run` then marked it FAILED; its finished requests are kept: `reuse-exp grid run` "
        "resumes it, or --resume {run_id}")


def watch(mlflow_pid: int, run_id: str) -> None:
    """Leave the process that finishes run `run_id` once `mlflow run` (`mlflow_pid`) and this
    process have exited. It inherits the environment: MLFLOW_TRACKING_URI names the store."""
    subprocess.Popen([sys.executable, "-m", __name__, str(mlflow_pid), str(os.getpid()), run_id],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)


def wait_for_exit(pid: int) -> None:
    """Until process `pid` (not a child of this one) has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):   # no pidfd (an old kernel): ask every half second
        while _exists(pid):
            time.sleep(0.5)
        return
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process by now: ours has gone
        return False
    return True


def finish(client, run_id: str) -> str | None:
    """What the ending of the run needs once no process of its own or of MLflow's is left: the
    action taken ("deleted", "killed"), or None."""
    from mlflow.entities import RunTag

    from .schema import END_REASON_TAG, REFUSED_TAG   # only now: the watcher waits with the stdlib alone
    run = client.get_run(run_id)
    tags = run.data.tags
    if run.info.lifecycle_stage != "active":
        return None
    if tags.get(REFUSED_TAG) == "true":
        client.delete_run(run_id)
        return "deleted"
    if run.info.status == "FINISHED" or "end_status" in tags:   # the tracked process ended it itself
        return None
    line = DIED.format(run_id=run_id)
    client.log_batch(run_id, tags=[RunTag("end_status", "KILLED"), RunTag("error", line), RunTag(END_REASON_TAG, line)])
    client.set_terminated(run_id, "KILLED", end_time=run.info.end_time)   # when MLflow saw it end
    return "killed"


def main(mlflow_pid: int, tracked_pid: int, run_id: str) -> None:
    for pid in (tracked_pid, mlflow_pid):
        wait_for_exit(pid)
    import mlflow
    finish(mlflow.MlflowClient(), run_id)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

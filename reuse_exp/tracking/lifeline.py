"""How a tracked run hears that it must stop, and stops alone.

SIGTERM (`kill`, `scancel`, a time limit) raises `Terminated` and Ctrl-C
KeyboardInterrupt: the run then ends KILLED with what it had. While it ends, further
signals are ignored, so a second Ctrl-C cannot leave it RUNNING.

Under `mlflow run`, MLflow starts the command as its child (MLproject's command execs it,
so no shell stays between them, and tells it MLflow's pid) and waits for it:
- killed by SIGTERM, MLflow dies without passing it on, and the child ran on, orphaned,
  to FINISHED. So the child asks the kernel for SIGTERM when its parent dies
  (Linux prctl PR_SET_PDEATHSIG), and ends at once if MLflow died before that;
- interrupted (SIGINT), MLflow sends the child SIGTERM, waits, then marks the run FAILED
  whatever the child left: MLflow 3.17's "already ended?" check compares the status
  string with integer codes, so it never sees KILLED. So a child that has ended its run
  KILLED stops its waiting parent (SIGTERM) before that parent can overwrite it. The same
  check re-marks a FINISHED run FAILED when MLflow is interrupted after the run ended but
  before this process exited; so from the end on, MLflow's SIGTERM stops MLflow instead.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

from ..errors import Terminated
from ..knobs import MLFLOW_PID

PR_SET_PDEATHSIG = 1


def _raise_terminated(signum, frame):
    raise Terminated()


def mlflow_parent() -> int | None:
    """The pid of the `mlflow run` process that started this one (alive or not), if one did.
    Taken from the environment, so that processes this one starts do not inherit it."""
    pid = MLFLOW_PID.read()
    os.environ.pop(MLFLOW_PID.name, None)
    if pid is None or not sys.platform.startswith("linux"):
        return None
    return pid


def _parent_death_signal(signum: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


class Lifeline:
    """The signal handling of one tracked run: `arm()` at its start, `ending()` when a failure
    or a signal ends it, `finished()` once it ended FINISHED, `disarm()` when it is over."""

    def __init__(self):
        self.parent = mlflow_parent()
        self._previous: dict[int, object] = {}
        self._finished = False

    def arm(self) -> "Lifeline":
        self._previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_terminated),
                          signal.SIGINT: signal.getsignal(signal.SIGINT)}
        if self.parent is not None:
            _parent_death_signal(signal.SIGTERM)
            if os.getppid() != self.parent:  # it died before the kernel was told
                raise Terminated()
        return self

    def ending(self) -> None:
        """The run is ending: a second signal must not cut its ending short."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def finished(self) -> None:
        """The run ended FINISHED: no signal may unmake that, up to this process's exit."""
        self._finished = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._stop_parent)

    def release_parent(self, status: str) -> None:
        """After a KILLED ending, stop the waiting `mlflow run` before it re-marks the run FAILED."""
        if status == "KILLED":
            self._stop_parent()

    def _stop_parent(self, *signal_args) -> None:
        if self.parent is None or os.getppid() != self.parent:
            return
        _parent_death_signal(0)   # its death is ours to cause now, not a reason to stop
        os.kill(self.parent, signal.SIGTERM)

    def disarm(self) -> None:
        if self._finished and self.parent is not None:
            return   # MLflow's cancel can come until the process exits; it must still stop MLflow
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

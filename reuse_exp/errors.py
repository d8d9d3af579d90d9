"""The package's errors: refusals a user can fix, and the ways a run or a grid ends badly.

A refusal (`ConfigError` and its kinds) carries one line that names the fix; the CLI prints
that line and exits, never a traceback. Nothing below the CLI exits or prints usage: it
raises one of these.
"""
from __future__ import annotations

import signal


# -- refusals: bad input or a state the user can change -------------------------------------
class ConfigError(ValueError):
    """A setting that cannot work; the message names the fix."""


class SettingError(ConfigError):
    """A value a setting cannot take; the message names the setting and the fix."""


class CheckpointError(ConfigError):
    """A checkpoint that does not match the architecture; the message names the tensor."""


class DirtyTree(ConfigError):
    """Uncommitted changes where the run must know its code: commit them, or allow them."""


class StoreUnavailable(ConfigError):
    """The tracking store cannot be opened or does not answer; the message names the URI and the fix."""


class Refused(ConfigError):
    """A comparison that would mix code; the message names the runs and the flags."""


# -- faults: what ended a run, a rank or a grid -----------------------------------------------
class RunFailed(Exception):
    """The run ended FAILED or KILLED; `line` is what the user reads, `code` the exit status."""

    def __init__(self, line: str, code: int):
        super().__init__(line)
        self.line, self.code = line, code


class RankFailed(Exception):
    """A rank failed or was killed, or the launcher was stopped: how the run ends, and why."""

    def __init__(self, status: str, code: int, line: str, traceback: str = ""):
        super().__init__(line)
        self.status, self.code, self.line, self.traceback = status, code, line, traceback


class Terminated(BaseException):
    """SIGTERM (scancel, `kill`, a cancelled mlflow run): end the run KILLED.

    A BaseException, like KeyboardInterrupt: no `except Exception` on the way may swallow it."""


class JobFailed(RuntimeError):
    """The tracked run of one configuration exited non-zero."""


class GridFailed(Exception):
    """Some of a grid's configurations failed; the message names them (and the store's limits
    when they explain it)."""


class AuditFailed(Exception):
    """The audit found runs that cannot be trusted in a comparison; it has listed them."""


class GridStopped(Exception):
    """A signal stopped a local grid; `code` is the grid's exit status (128 + the signal)."""

    def __init__(self, signum: int, failed: list[str], not_started: list[str]):
        self.code = 128 + signum
        name = signal.Signals(signum).name
        parts = [f"{len(failed)} configuration(s) ended early: {', '.join(failed)}" if failed else "",
                 f"{len(not_started)} not started: {', '.join(not_started)}" if not_started else ""]
        super().__init__(f"grid stopped by {name}; " + "; ".join(filter(None, parts))
                         + " (they stay failed or missing in `reuse-exp grid status`)")

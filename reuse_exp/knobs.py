"""The REUSE_EXP_* environment variables the package reads, declared once: name, meaning,
default, type. Every layer reads them through this declaration (the engine too, so it sits
below the engine)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import SettingError

# How every true/false value is spelled, in a setting or a knob.
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(frozen=True)
class Knob:
    """A REUSE_EXP_* environment variable: its name, what it means, its default and its type."""
    name: str
    help: str
    default: object = None
    kind: type = str

    def read(self, env=None):
        """Its typed value from `env` (os.environ by default); SettingError names the fix."""
        text = (os.environ if env is None else env).get(self.name, "").strip()
        if not text:
            return self.default
        if self.kind is bool:
            return text.lower() not in FALSE
        try:
            value = self.kind(text)
        except ValueError:
            raise SettingError(f"{self.name}={text!r}: give {self.help}") from None
        if self.kind in (int, float) and not value > 0:
            raise SettingError(f"{self.name}={text!r}: give {self.help} (positive)")
        return value


MLFLOW_PID = Knob("REUSE_EXP_MLFLOW_PID", "the pid of the `mlflow run` process (MLproject's command sets it)",
                  None, int)
HEARTBEAT_S = Knob("REUSE_EXP_HEARTBEAT_S", "the heartbeat interval in seconds, e.g. 30 (tests shorten it)",
                   30.0, float)
COLLECTIVE_TIMEOUT_S = Knob("REUSE_EXP_COLLECTIVE_TIMEOUT_S", "the seconds a rank waits in a collective before "
                            "it fails, e.g. 1800", 1800.0, float)
REQUEST_CACHE = Knob("REUSE_EXP_REQUEST_CACHE", "the folder of this run's request cache, as the process that "
                     "launched the ranks chose it")
CACHE_ROOT = Knob("REUSE_EXP_CACHE_ROOT", "the folder of the package's caches: runs' request caches in "
                  "requests/, compiled kernels in compile/ (default ~/.cache/reuse_exp)")
LAUNCHED = Knob("REUSE_EXP_LAUNCHED", "set (1) for the ranks `reuse-exp run --processes N` starts: rank 0 leaves "
                "the summary to the launching process", False, bool)
POLICY_MODULES = Knob("REUSE_EXP_POLICY_MODULES", "comma-separated importable modules that register more reuse "
                      "policies (imported when a policy is named that neither this package nor an installed "
                      "entry point provides), e.g. mylab.policies")
ANY_ENVIRONMENT = Knob("REUSE_EXP_ANY_ENVIRONMENT", "set (1) by `grid run --any-environment` for its runs: the "
                       "environment does not matter for this grid (the runs are tagged so)", False, bool)
PROBE_SPAN_S = Knob("REUSE_EXP_PROBE_SPAN_S", "the seconds the fixed speed probe spreads its bursts over, before "
                    "and again after the evaluation, e.g. 1.2 (tests shorten it)", 1.2, float)
KNOBS: tuple[Knob, ...] = (MLFLOW_PID, HEARTBEAT_S, COLLECTIVE_TIMEOUT_S, REQUEST_CACHE, CACHE_ROOT, LAUNCHED,
                           POLICY_MODULES, ANY_ENVIRONMENT, PROBE_SPAN_S)


def cache_root() -> Path:
    """The folder of every cache the package keeps on this machine (CACHE_ROOT, or ~/.cache/reuse_exp)."""
    return Path(CACHE_ROOT.read() or Path.home() / ".cache" / "reuse_exp")


@contextmanager
def knob_set(knob: Knob, value: bool):
    """`knob` set (1) for the processes started inside, when `value`; as it was afterwards."""
    before = os.environ.get(knob.name)
    if value:
        os.environ[knob.name] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(knob.name, None)
        else:
            os.environ[knob.name] = before

"""A tracked run's heartbeat: a tag rewritten every 30 s by a thread of its own, whatever
the evaluation is doing (one 7B batch can take minutes between progress metrics).

A SIGKILL, an OOM kill or a lost node ends a job without a word, leaving its run
RUNNING. A RUNNING run whose heartbeat is older than a few intervals has no process
behind it: the audit flags it and the grid runs its configuration again
(study/store.py: RunRecord.is_dead). MLflow's own system-metrics thread cannot serve:
it can be switched off, and it says nothing when it fails.
"""
from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from typing import Callable

from ..knobs import HEARTBEAT_S

log = logging.getLogger(__name__)

INTERVAL_ENV = HEARTBEAT_S.name   # tests shorten it; a run's default is 30 s


def interval_s() -> float:
    return HEARTBEAT_S.read()


def stamp(epoch_s: float) -> str:
    """The tag's value: UTC to the millisecond, readable in the MLflow UI."""
    return datetime.fromtimestamp(epoch_s, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_stamp(text: str | None) -> float | None:
    """Epoch seconds of a heartbeat tag, or None when there is none (or it is unreadable)."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.strip().replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class Heartbeat:
    """Calls `beat(stamp)` now and then every `interval` seconds until stopped.

    A beat that fails (the store briefly unreachable) is said once and retried at the
    next interval: the heartbeat is the run's sign of life, never a reason to end it.
    """

    def __init__(self, beat: Callable[[str], None], interval: float = HEARTBEAT_S.default):
        self.beat, self.interval = beat, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def _once(self) -> None:
        try:
            self.beat(stamp(time.time()))
            self._failing = False
        except Exception as e:
            if not self._failing:
                log.warning("heartbeat not written (%s: %s); retrying every %.0f s", type(e).__name__, e,
                            self.interval)
            self._failing = True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._once()

    def start(self) -> "Heartbeat":
        self._once()   # the run has a heartbeat from its first moment
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval + 10)
        self._thread = None

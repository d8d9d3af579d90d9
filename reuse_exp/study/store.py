"""The tracking store as the study reads it: runs as records, the store's address, and the
commit of the checkout the user stands in. Shared by the grid, its launchers, compare and audit."""
from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

from ..errors import ConfigError
from ..tracking.heartbeat import parse_stamp
from ..tracking.provenance import Provenance, checkout_root, provenance
from ..settings import DEFAULTS, SPECS, policy_class, spec, to_text
from ..tracking.schema import END_REASON_TAG, HEARTBEAT_TAG, REFUSED_TAG, logged_values, shaping_settings, unquoted
from ..tracking.store_init import open_client, tracking_uri

# A cell's value on an axis it does not compute (k=1's subset): any run of it will do.
ANY = "any"
# A RUNNING run whose heartbeat (every 30 s) is older than this has no process behind it.
STALE_AFTER_S = 300.0
LIVE = ("RUNNING", "SCHEDULED")


def parse_duration(text: str | float) -> float:
    """Seconds from `90s`, `10m`, `2h`, `1d` or a plain number of seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*", str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r}: give a duration like 90s, 10m, 2h or 1d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def format_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- runs as the store holds them -------------------------------------------------------------
@dataclass(frozen=True)
class RunRecord:
    """The parts of an MLflow run the grid reads."""
    run_id: str
    status: str                    # RUNNING, SCHEDULED, FINISHED, FAILED, KILLED
    start_ms: int
    params: dict
    tags: dict
    metrics: dict

    @classmethod
    def from_run(cls, run) -> "RunRecord":
        return cls(run_id=run.info.run_id, status=run.info.status, start_ms=run.info.start_time or 0,
                   params=dict(run.data.params), tags=dict(run.data.tags), metrics=dict(run.data.metrics))

    @property
    def commit(self) -> str | None:
        c = self.tags.get("git_commit", "").strip()
        return None if c in ("", "unknown") else c

    @property
    def dirty(self) -> bool:
        return self.tags.get("git_dirty", "true").strip().lower() != "false"

    @property
    def refused(self) -> bool:
        """Refused before it evaluated (a bad value, a dirty tree): never a result, never a finding."""
        return self.tags.get(REFUSED_TAG, "").strip().lower() == "true"

    @property
    def last_heartbeat_ms(self) -> int | None:
        seconds = parse_stamp(self.tags.get(HEARTBEAT_TAG))
        return None if seconds is None else round(seconds * 1000)   # the stamp is to the ms

    def is_dead(self, now_ms: int | None = None, stale_after_s: float = STALE_AFTER_S) -> bool:
        """RUNNING, but no heartbeat (or, without one, no start) for `stale_after_s`: its process
        is gone (SIGKILL, OOM kill, a lost node) and nothing will ever end the run."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        last = self.last_heartbeat_ms or self.start_ms
        return self.status in LIVE and now_ms - last > stale_after_s * 1000

    def last_sign_of_life(self, now_ms: int | None = None) -> str:
        """`last heartbeat <time> (<age> ago)`, or the start time where it never beat."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        hb = self.last_heartbeat_ms
        what, ms = ("last heartbeat", hb) if hb else ("no heartbeat, started", self.start_ms)
        return f"{what} {format_time(ms)} ({format_duration((now_ms - ms) / 1000)} ago)"

    @property
    def role(self) -> str:
        return self.tags.get("reuse_exp.role", "run")

    @cached_property
    def values(self) -> dict:
        """Its settings, typed (schema.logged_values)."""
        return logged_values(self.params)

    @cached_property
    def shaping_names(self) -> tuple[str, ...]:
        """The settings that shaped it (schema.shaping_settings); every one that can where its
        policy is not known here (a plug-in not installed): then it matches only itself."""
        try:
            return shaping_settings(self.values)
        except ConfigError:
            return tuple(s.name for s in SPECS if s.key)

    @cached_property
    def axes(self) -> tuple[str, ...]:
        """The grid axes its policy declares (none where the policy is not known here)."""
        try:
            return tuple(policy_class(self.values.get("policy") or DEFAULTS.policy).axes)
        except ConfigError:
            return ()

    def resolved(self, names) -> dict[str, str]:
        """The params that carry the settings `names` (their declared key params), one spelling each."""
        device = self.params.get("resolved_device") or self.params.get("device", "")
        values = {**self.params, "device_type": device.split(":")[0]}
        return {p: norm(values.get(p)) for n in names for p in spec(n).key_params}

    @property
    def cell(self) -> tuple[tuple[str, str], ...]:
        """Its place on its policy's axes: the value it ran with, ANY on an axis it did not compute."""
        return tuple((a, norm(to_text(self.values.get(a))) if a in self.shaping_names else ANY) for a in self.axes)

    def grid_part(self) -> dict[str, str]:
        """What a grid of it pins: the params of the settings that shaped it, off its policy's axes
        (the task, the policy and its other settings, the model, ...)."""
        return self.resolved(n for n in self.shaping_names if n not in self.axes)

    @property
    def grid_key(self) -> str:
        return hashlib.sha256(repr(sorted(self.grid_part().items())).encode()).hexdigest()[:12]

    def short(self) -> str:
        return f"{self.run_id[:8]}@{(self.commit or 'no-commit')[:7]}{'+dirty' if self.dirty else ''}"


def end_dead(cl, run: RunRecord, reason: str) -> None:
    """End a dead run KILLED, saying why (the tracked run's own ending never came). It ended
    when its process last gave a sign of life (its last heartbeat, else its start), not now."""
    from mlflow.entities import RunTag
    cl.log_batch(run.run_id, tags=[RunTag(END_REASON_TAG, reason[:5000]), RunTag("end_status", "KILLED")])
    cl.set_terminated(run.run_id, "KILLED", end_time=run.last_heartbeat_ms or run.start_ms)


def end_command(run_id: str, stale_after_s: float) -> str:
    """The command that ends a run found dead after `stale_after_s`: it must judge it by the same
    threshold, or it refuses what was just called dead."""
    extra = "" if stale_after_s == STALE_AFTER_S else f" --stale-after {stale_after_s:g}s"
    return f"reuse-exp runs end {run_id}{extra}"


def cell_name(axes) -> str:
    """A cell's name from its place on the axes: `k2_first`, `k1_any`, `drift0.5` (a number
    carries its axis's name)."""
    return "_".join(_label(n, v) for n, v in axes) or "all"


def _label(axis: str, value) -> str:
    if value == ANY or spec(axis).kind not in ("int", "float"):
        return to_text(value)
    try:
        return f"{axis}{float(value):g}"
    except ValueError:
        return f"{axis}{value}"


def norm(value) -> str:
    """One spelling per value, as params are strings in MLflow: None/''/'none' alike (quoted too, as
    `mlflow run -P limit=` logs it), bools lower."""
    s = "" if value is None else unquoted(str(value))
    if s.lower() in ("", "none", "null"):
        return ""
    if s.lower() in ("true", "false"):
        return s.lower()
    return s


# -- the store ------------------------------------------------------------------------------
SQLITE_RACES = re.compile(r"database is locked|UNIQUE constraint failed|already exists|"
                          r"Can't locate revision|alembic|Detected out-of-date database schema", re.I)


def store_error(text: str, uri: str) -> str | None:
    """One line for the sqlite store's known failures under concurrent writers, else None."""
    if not uri.startswith("sqlite") or not text:
        return None
    m = SQLITE_RACES.search(text)
    if not m:
        return None
    return (f"the sqlite store {uri} failed under concurrent runs ({m.group(0)}): serve it instead, "
            "e.g. `mlflow server --backend-store-uri postgresql+psycopg2://USER@HOST/DB --host 127.0.0.1`, "
            "then export MLFLOW_TRACKING_URI=http://127.0.0.1:5000 (docs/grid.md), or use --executor local")


def client(must_exist: bool = False):
    """A client of the store; a new sqlite store is created under the runs' lock (store_init),
    unless `must_exist`. StoreUnavailable (one line) when the store cannot be used."""
    return open_client(tracking_uri(), must_exist)


def experiment_name(name: str | None) -> str:
    return name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"


def experiment_id(cl, name: str | None, create: bool = False) -> str | None:
    """The experiment's id; created only when asked (before concurrent jobs race to make it)."""
    name = experiment_name(name)
    exp = cl.get_experiment_by_name(name)
    if exp is None and create:
        return cl.create_experiment(name)
    return exp.experiment_id if exp else None


def fetch_runs(cl, exp_id: str | None, task: str | None = None) -> list[RunRecord]:
    if exp_id is None:
        return []
    filt = f"params.task = '{task}'" if task else ""
    out, token = [], None
    while True:
        page = cl.search_runs([exp_id], filter_string=filt, max_results=1000, page_token=token)
        out.extend(RunRecord.from_run(r) for r in page)
        token = page.token
        if not token:
            return out


def git_state() -> Provenance:
    """The checkout of reuse_exp the current directory is in, as a tracked run started there sees
    it (its store excluded): what `mlflow run .` runs and records, so what the grid judges, snapshots
    and runs, and compare reads. Not the checkout the package was installed from: with two clones
    and one install, that one is the other clone."""
    here = Path.cwd()
    root = checkout_root(here)
    if root is None or not (root / "reuse_exp" / "__init__.py").is_file():
        raise ConfigError(f"{here} is not in a checkout of reuse_exp: the grid and compare judge the commit of "
                          "the checkout you stand in (cd into your clone of the repository)")
    prov = provenance(pkg=root / "reuse_exp")
    if prov.commit == "unknown":
        raise ConfigError(f"{root} has no commit yet: the grid needs HEAD to know what is done (commit first)")
    return prov


def git_head() -> str:
    return git_state().commit

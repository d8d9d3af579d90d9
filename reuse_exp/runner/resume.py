"""Resuming an interrupted run: its finished requests come back from a per-request cache.

Every run keeps each request's result, with the decode statistics computing it measured, as
soon as it is computed (evaluation/request_cache.py: one sqlite file per rank), in a folder
keyed by the commit and the settings: REQUEST_CACHE/<commit>/<settings key>/<run id>.
`--resume RUN_ID` (`-P resume=RUN_ID`) opens a new run linked to RUN_ID by tags
(`resumed_from`, and `resumed_by` on RUN_ID) that reads RUN_ID's cache, so only the
unfinished requests are decoded, and the run is whole: its metrics, counts and fractions and
its generations cover every document and equal an uninterrupted run's; only the figures its
`throughput_scope` tag names cover just what it decoded. It is refused, in one line, when
RUN_ID ran at another commit, from a dirty tree, or with other settings (of those that shape
the run: tracking/schema.py's shaping_settings, and `processes`, which lays the cache out by rank; a k=1 run
resumes in any mode), when it finished,
or when a run resumed it already (that run is the one to resume: a second resume would decode
again and lose the link). A finished run's cache is deleted.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from ..errors import ConfigError
from ..knobs import CACHE_ROOT, REQUEST_CACHE, cache_root
from ..settings import RunSettings, spec
from ..tracking.heartbeat import parse_stamp
from ..tracking.schema import HEARTBEAT_TAG, same_param, shaping_settings

CACHE_ENV, ROOT_ENV = REQUEST_CACHE.name, CACHE_ROOT.name
CACHE_LAYOUT = ("processes",)   # shapes no result, but the cache is one file per rank
# A RUNNING run with a heartbeat younger than this may still have its process (the grid's and
# the audit's default --stale-after): resuming it would decode its requests twice at once.
ALIVE_WITHIN_S = 300.0


def root() -> Path:
    return cache_root() / "requests"


def compared(s: RunSettings) -> tuple[str, ...]:
    """The settings a resumed run must share with the run it resumes: those that shape it, and
    how its cache is laid out."""
    return (*shaping_settings(s.as_dict()), *CACHE_LAYOUT)


def settings_key(s: RunSettings) -> str:
    shaping = {n: spec(n).text(getattr(s, n)) for n in compared(s)}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(s: RunSettings, commit: str, run_id: str | None, resumed: Path | None = None) -> Path:
    """This run's request cache: the one the launching process chose, the resumed run's, or its own."""
    if REQUEST_CACHE.read():
        return Path(REQUEST_CACHE.read())
    if resumed is not None:
        return resumed
    ident = s.resume or os.environ.get("TORCHELASTIC_RUN_ID") or run_id
    return root() / commit / settings_key(s) / str(ident)


def check(client, s: RunSettings, commit: str, dirty: bool) -> Path:
    """The cache a resume of `s.resume` reads; ConfigError (one line) when it must not resume."""
    from mlflow.exceptions import MlflowException
    rid = s.resume
    try:
        old = client.get_run(rid)
    except MlflowException:
        raise ConfigError(f"resume {rid}: no such run in this tracking store") from None
    tags, params = old.data.tags, old.data.params
    if old.info.status == "FINISHED":
        raise ConfigError(f"resume {rid}: that run FINISHED; there is nothing to resume")
    if tags.get("resumed_by"):
        raise ConfigError(f"resume {rid}: run {tags['resumed_by']} resumed it already; "
                          f"resume that one (`--resume {tags['resumed_by']}`) if it did not finish")
    if old.info.status in ("RUNNING", "SCHEDULED"):
        age = time.time() - (parse_stamp(tags.get(HEARTBEAT_TAG)) or (old.info.start_time or 0) / 1000)
        if age < ALIVE_WITHIN_S:
            raise ConfigError(f"resume {rid}: it is RUNNING and its heartbeat is {age:.0f} s old, so it may still "
                              f"run; wait until it is dead ({ALIVE_WITHIN_S:.0f} s without one), or, once its process "
                              f"is gone, end it (`reuse-exp runs end {rid} --force`)")
    if tags.get("git_commit") != commit or tags.get("git_dirty") != "false" or dirty:
        where = tags.get("git_commit", "unknown")[:12] + (" (dirty)" if tags.get("git_dirty") != "false" else "")
        raise ConfigError(f"resume {rid}: it ran at commit {where}, this is {commit[:12]}"
                          f"{' (dirty)' if dirty else ''}; check out its commit, clean, or start a new run")
    for name in compared(s):
        mine = spec(name).text(getattr(s, name))
        if name in params and not same_param(params[name], mine):
            raise ConfigError(f"resume {rid}: it ran with {name}={params[name]}, this run has "
                              f"{name}={mine}; resume with its settings, or start a new run")
    return Path(tags.get("request_cache") or cache_dir(s, commit, rid))


def scope(resumed_from: str, computed: int, documents: int) -> tuple[dict, dict]:
    """(tags, metrics) that say which figures of a resumed run cover only what it computed."""
    from ..evaluation.stats import COMPUTED_ONLY
    cached = max(0, documents - computed)
    return ({"throughput_scope": f"the metrics {' '.join(COMPUTED_ONLY)} and the artifacts timings.json and "
             f"reuse_trace.json cover only what this run computed: {computed} of {documents} requests; "
             f"{cached} came from run {resumed_from}'s request cache with their statistics, so every other "
             "metric and generations.jsonl cover all of them"},
            {"cached_requests": cached})


def forget(path: Path) -> None:
    """A finished run's cache is of no more use."""
    if path.is_dir() and path.is_relative_to(root()):
        shutil.rmtree(path, ignore_errors=True)

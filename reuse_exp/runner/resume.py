"""Resuming an interrupted run: its finished requests come back from a per-request cache.

Every run keeps each request's result, with the decode statistics computing it measured, as
soon as it is computed (evaluation/request_cache.py: one sqlite file per rank), in a folder
keyed by the commit and the settings: REQUEST_CACHE/<commit>/<settings key>/<run id>.
`--resume RUN_ID` (`-P resume=RUN_ID`) opens a new run linked to RUN_ID by tags
(`resumed_from`, and `resumed_by` on RUN_ID) that reads RUN_ID's cache, so only the
unfinished requests are decoded, and the run is whole: its metrics, counts and fractions and
its generations cover every document and equal an uninterrupted run's; only the figures its
`throughput_scope` tag names cover just what it decoded. Every setting not given takes RUN_ID's
value (its params; its experiment and include_path from its tags), so `reuse-exp run --resume
RUN_ID` alone resumes it; a given one that differs, of those that shape the run
(tracking/schema.py's shaping_settings, and `processes`, which lays the cache out by rank; a k=1
run resumes in any mode), is refused, every such one named in one line (`mlflow run` gives all
its parameters, and has logged them on the new run before this code runs: there they must be
RUN_ID's, and the line says which to pass). It is refused, in one line, when RUN_ID ran at
another commit or from a dirty tree, when it finished, or when a run resumed it already (that
run is the one to resume: a second resume would decode again and lose the link). A finished
run's cache is deleted.
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
from ..settings import SPECS, RunSettings, spec
from ..tracking.heartbeat import parse_stamp
from ..tracking.schema import HEARTBEAT_TAG, logged_values, same_param, shaping_settings, unquoted

CACHE_ENV, ROOT_ENV = REQUEST_CACHE.name, CACHE_ROOT.name
CACHE_LAYOUT = ("processes",)   # shapes no result, but the cache is one file per rank
NOT_ADOPTED = ("resume", "experiment", "allow_dirty", "include_path")   # not the interrupted run's to decide
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


def check(client, s: RunSettings, commit: str, dirty: bool, given: frozenset[str] | None = None,
          under_mlflow: bool = False) -> tuple[RunSettings, Path]:
    """The settings of the resume of `s.resume` (those not `given` taken from it; None: all given)
    and the cache it reads; ConfigError (one line) when it must not resume."""
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
    given = {x.name for x in SPECS} if given is None else given
    s = adopted(client, old, s, given)
    differ = differences(params, s, given)
    if differ:
        theirs = ", ".join(f"{n}={unquoted(params[n]) or 'none'}" for n in differ)
        mine = ", ".join(f"{n}={spec(n).text(getattr(s, n))}" for n in differ)
        values = " ".join(f"-P {n}={unquoted(params[n]) or 'none'}" for n in differ)
        fix = (f"pass its values ({values}), or resume with `reuse-exp run --resume {rid}`, which takes them "
               "itself" if under_mlflow else "leave them out to take its settings, or start a new run")
        raise ConfigError(f"resume {rid}: it ran with {theirs}; this run has {mine}: {fix}")
    return s, Path(tags.get("request_cache") or cache_dir(s, commit, rid))


def differences(params: dict, s: RunSettings, given) -> list[str]:
    """The settings among `given` that shape either run (or lay out the cache) whose value in `s`
    is not what the run logged, in the order of the declaration."""
    theirs = (*shaping_settings(logged_values(params)), *CACHE_LAYOUT)
    either = set(compared(s)) | set(theirs)
    return [x.name for x in SPECS if x.name in either and x.name in given and x.name in params
            and not same_param(params[x.name], x.text(getattr(s, x.name)))]


def adopted(client, old, s: RunSettings, given) -> RunSettings:
    """`s` with every setting not in `given` set as the interrupted run `old` had it."""
    params, tags = old.data.params, old.data.tags
    if not any(n in params for n in compared(s)):
        raise ConfigError(f"resume {old.info.run_id}: it logged no settings (it ended before it began): start a new run")
    taken = {x.name: x.parse(unquoted(params[x.name])) for x in SPECS
             if x.name not in given and x.name not in NOT_ADOPTED and x.name in params}
    if "include_path" not in given and tags.get("include_path"):
        taken["include_path"] = spec("include_path").parse(tags["include_path"])
    chosen = any(os.environ.get(v) for v in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"))
    if "experiment" not in given and not chosen:   # chosen by the user or by MLflow; else beside the run it finishes
        taken["experiment"] = client.get_experiment(old.info.experiment_id).name
    return s.replace(**taken)


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

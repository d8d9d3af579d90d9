"""Executing one configuration, tracked: the dirty guard, lm-eval (in this process or over
launched ranks), and an ending that is always FINISHED, FAILED or KILLED with what was logged so far.

The run attaches to the MLflow run that `mlflow run` opened (MLFLOW_RUN_ID) or, called
directly (`reuse-exp run`), opens one. A refusal before evaluating (a dirty tree, an
unknown task, a model that is not there, a value its policy refuses) opens none, or deletes the
one it opened; one that `mlflow run` opened is tagged refused and deleted once MLflow has ended it
(tracking/aftercare.py), so it leaves the runs table and the audit counts it apart. While it runs, a heartbeat
says it lives (tracking/heartbeat.py) and the console shows progress; it ends with a summary
(tracking/console.py). The MLflow run itself: tracking/lifecycle.py; what it logs, by name:
tracking/schema.py. With `processes` > 1 it launches that many data-parallel ranks instead
(runner/ranks.py).
"""
from __future__ import annotations

import os
import re
import sys
import traceback
from pathlib import Path

from ..errors import RankFailed, RunFailed, StoreUnavailable, Terminated
from ..knobs import ANY_ENVIRONMENT, LAUNCHED
from ..settings import RunSettings
from ..tracking import aftercare, data, environment, timing
from ..tracking.artifacts import log_artifacts
from ..tracking.console import Summary, quiet_known_noise
from ..tracking.lifecycle import MAX_DIRTY_FILES_TAG, Tracker, end_outside_run
from ..tracking.lifeline import Lifeline
from ..tracking.provenance import Provenance, check_clean, checkout_root, dirty_diff, provenance, redact
from ..tracking.schema import (ANY_ENVIRONMENT_TAG, GPU_METRICS_TAG, NO_GPU_NOTE, REFUSED_TAG, config_key,
                               library_versions, lm_eval_metrics, param_str, run_name)
from ..tracking.store_init import absolute_uri, open_client, tracking_uri


# -- failure -------------------------------------------------------------------------------------
def classify(e: BaseException) -> tuple[str, int, str]:
    """(MLflow status, exit code, the one line) of what ended a run."""
    import torch
    if isinstance(e, KeyboardInterrupt):
        return "KILLED", 130, "interrupted (Ctrl-C): the run ended KILLED with what it had logged"
    if isinstance(e, Terminated):
        return "KILLED", 143, "terminated (SIGTERM): the run ended KILLED with what it had logged"
    if isinstance(e, RankFailed):
        return e.status, e.code, e.line
    if isinstance(e, torch.OutOfMemoryError):
        return "FAILED", 3, ("CUDA out of memory: lower --batch-size or --max-new-tokens, "
                             "or use a GPU with more memory")
    if isinstance(e, ValueError) and type(e).__module__.startswith("reuse_exp."):  # ConfigError & co
        return "FAILED", 2, str(e)
    text = f"{type(e).__name__}: {e}"
    if re.search(r"gated|401 Client Error|GatedRepo", text, re.I):
        return "FAILED", 2, ("the data set is gated on the hub: accept its terms there, then set HF_TOKEN "
                             "(or run `hf auth login`)")
    return "FAILED", 1, text.splitlines()[0] if text else type(e).__name__


# -- the run -------------------------------------------------------------------------------------
def run(settings: RunSettings, given: frozenset[str] | None = None) -> Summary | None:
    """Evaluate one configuration, tracked. Returns its summary (None from a rank our launcher
    started, or one other than 0); raises RunFailed. `given`: the settings the user gave (None:
    all of them); a resume takes the others from the run it resumes."""
    lifeline = Lifeline()
    tracker = prov = None
    try:
        lifeline.arm()
        if lifeline.parent is not None and os.environ.get("MLFLOW_RUN_ID"):   # MLflow ends the run after us
            aftercare.watch(lifeline.parent, os.environ["MLFLOW_RUN_ID"])
        open_client(tracking_uri())   # a store that cannot work: one line, before anything heavy
        from ..evaluation import harness  # lm-eval and torch: imported once the arguments are known good
        from ..evaluation.lm import check_policy
        from ..evaluation.placement import launched_rank, resolve as resolve_placement
        from . import ranks, resume
        prov = provenance()
        resumed = None
        if launched_rank() == 0:   # rank 0, or the only process: the others are handed its settings
            check_clean(prov, settings.allow_dirty)   # before anything heavy, and before any model
            _note_other_checkout(prov)
            if settings.resume:   # the interrupted run's settings, where not given
                settings, resumed = resume.check(open_client(), settings, prov.commit, prov.dirty, given,
                                                 under_mlflow=lifeline.parent is not None)
        check_policy(settings)   # a value the policy refuses is a typo: refused before any run opens
        placement = resolve_placement(settings)   # once per process; handed down from here
        rank = placement.rank
        quiet_known_noise({p.stem for p in harness.bundled_tasks_dir().glob("*.yaml")})
        harness.check_gated(settings.task)
        task_manager = harness.task_manager_for(settings.task, settings.include_path)
        launching = placement.to_launch
        if rank > 0:
            ranks.follow(settings, placement, task_manager, resume.cache_dir(settings, prov.commit, None))
            return None
        tracker = Tracker.start(settings, system_metrics=launching == 1)
        cache = resume.cache_dir(settings, prov.commit, tracker.run_id, resumed)
        if launching > 1:
            ranks.launch(tracker.run_id, settings, launching, tracker.workdir / "ranks", cache)
            summary = _launched_end(tracker, settings, prov)
            lifeline.finished()
            return summary
        _log_start(tracker, settings, prov)
        summary = _evaluate(tracker, settings, placement, task_manager, prov, cache)
        tracker.end("FINISHED")
        lifeline.finished()
        resume.forget(cache)
        return None if LAUNCHED.read() else summary   # the launching process prints it
    except BaseException as e:
        lifeline.ending()
        status, code, line = classify(e)
        line = redact(line)
        if os.environ.get("WORLD_SIZE", "1") != "1":   # a launched rank: tell the launcher why
            from .ranks import record_failure
            record_failure(line, "".join(traceback.format_exception(e)))
        # A bad value or a missing thing found before lm-eval had the model: nothing was evaluated.
        # (a rank's refusal is the rank's to say: rank 0 tags the run it attached to)
        refused = code == 2 and not isinstance(e, RankFailed) and (tracker is None or not tracker.evaluating)
        if isinstance(e, StoreUnavailable):
            pass   # nothing can be logged where nothing can be reached
        elif tracker is None:
            if code == 1:  # an unexpected error with no run to keep its traceback: show it
                traceback.print_exception(e, file=sys.stderr)
                line += " (traceback above)"
            end_outside_run(status, line, prov, refused)
        else:
            if code == 1:
                line += " (traceback: the run's error.txt)"
            _log_failure(tracker, status, line, e, refused)
            if lifeline.parent is None and not LAUNCHED.read():   # no MLflow ends it after us: a refusal goes now
                aftercare.finish(tracker.client, tracker.run_id)
        lifeline.release_parent(status)
        raise RunFailed(line, code) from None
    finally:
        lifeline.disarm()


def _note_other_checkout(prov: Provenance) -> None:
    """`reuse-exp` installed from one clone and typed in another runs the installed clone's code (and
    records its commit): say so, since the grid and `mlflow run .` there would run the other."""
    here = checkout_root()
    if here is not None and prov.root is not None and here != prov.root and (here / "reuse_exp").is_dir():
        print(f"reuse-exp: note: this runs the package of {prov.root}, not of the checkout here ({here}); "
              "`mlflow run .` or `python -m reuse_exp.cli run` runs this one", file=sys.stderr)


def _launched_end(tracker: Tracker, s: RunSettings, prov: Provenance) -> Summary:
    """Every rank exited 0: rank 0 has logged the results and ended the run FINISHED."""
    run = tracker.client.get_run(tracker.run_id)
    if run.info.status != "FINISHED":
        raise RankFailed("FAILED", 1, f"the ranks exited 0 but rank 0 left the run {run.info.status}")
    tracker.end("FINISHED")
    m, tags = run.data.metrics, run.data.tags
    accuracy = ((tags.get("accuracy_metric", ""), m["accuracy"], m.get("accuracy_stderr"), m.get("n_samples"))
                if "accuracy" in m else None)
    return _summary_of(tracker, s, prov, tags.get("task_kind", "none"), accuracy, m)


def _log_start(tracker: Tracker, s: RunSettings, prov: Provenance) -> None:
    tracker.tags({"git_commit": prov.commit, "git_branch": prov.branch, "git_dirty": prov.dirty,
                  "git_dirty_files": "\n".join(prov.dirty_files[:MAX_DIRTY_FILES_TAG]),
                  "source_hash": prov.source_hash, "allow_dirty": s.allow_dirty, "reuse_exp.role": "run",
                  "mlflow.runName": run_name(s, prov.dirty),
                  **({"mlflow.source.git.commit": prov.commit} if prov.commit != "unknown" else {}),
                  **({"include_path": ",".join(s.include_path)} if s.include_path else {})})
    given = {n: v for n, v in s.as_dict().items() if n not in ("experiment", "include_path")}
    tracker.params({**given, **library_versions()})
    if prov.dirty and prov.root is not None:
        tracker.artifact_text("dirty.diff", dirty_diff(prov))


def _evaluate(tracker: Tracker, s: RunSettings, placement, task_manager, prov: Provenance, cache: Path) -> Summary:
    """Rank 0's (or the only process's) evaluation, logged; the other ranks run ranks.follow."""
    from ..evaluation import harness
    from ..evaluation.stats import LOGLIKELIHOOD_NOTE, HarnessStats, sample_records, world_metrics
    from . import ranks, resume
    from ..tracking.gpu_stats import combine
    device = placement.device
    tracker.sampler = ranks.start_sampler(device)
    lm = ranks.load_model(s, placement)
    tracker.lm = lm
    lm.on_batch = tracker.progress
    devices = ranks.rank_devices(lm)
    world_params, world_tags = ranks.world_params(devices)
    params = lm.params()
    tracker.params({**params, **world_params})
    env = environment.gather(placement.torch_device.type, params["resolved_dtype"], params["path"],
                             lm.world_size, [name for d, name in devices if d.startswith("cuda")])
    tracker.tags({**env.tags(), **({ANY_ENVIRONMENT_TAG: "true"} if ANY_ENVIRONMENT.read() else {})})
    all_params = {**{n: param_str(v) for n, v in s.as_dict().items()}, **params,
                  "device_type": placement.torch_device.type}
    if not any(d.startswith("cuda") for d, _ in devices):
        world_tags[GPU_METRICS_TAG] = NO_GPU_NOTE
    tracker.tags({"config_key": config_key(all_params), "model_path": lm.loaded.path or "", **world_tags,
                  "request_cache": str(cache), **({"resumed_from": s.resume} if s.resume else {})})
    if s.resume:
        tracker.client.set_tag(s.resume, "resumed_by", tracker.run_id)

    tracker.evaluating = True
    results, wall, timed = ranks.evaluate(lm, s, task_manager, cache)
    reports = ranks.gather_reports(lm, tracker.sampler, timed)
    tracker.sampler = None   # stopped: its statistics are in the reports
    shards = [r.stats for r in reports]
    stats = HarnessStats.merged(shards) if len(shards) > 1 else lm.stats
    samples = results.pop("samples", {})
    task_results = results["results"].get(s.task, {})
    primary = harness.primary_metric(task_results)
    kind = stats.task_kind
    metrics = {**lm_eval_metrics(results, s.task), **world_metrics(shards), "wall_seconds": wall}
    if primary is not None:
        metrics["accuracy"] = primary[1]
        stderr = harness.primary_stderr(task_results, primary[0])
        if stderr is not None:
            metrics["accuracy_stderr"] = stderr
    metrics["n_samples"] = len(sample_records(samples, primary[0] if primary else None))
    metrics |= combine([r.gpu for r in reports])
    fairness = timing.verdict([r.timing for r in reports], [r.gpu for r in reports])
    metrics |= fairness.metrics()
    tracker.tags(fairness.tags())
    tracker.artifact_json("timing_quality.json", timing.record([r.timing for r in reports]))
    if s.resume:
        scope_tags, scope_metrics = resume.scope(s.resume, stats.requests, _requests(samples))
        tracker.tags(scope_tags)
        metrics |= scope_metrics
    metrics["peak_rss_mb"] = environment.peak_rss_mb()
    tracker.metrics(metrics)
    read = data.fingerprint(results, samples)
    tracker.tags(data.tags(read))
    data.log_datasets(tracker.client, tracker.run_id, read)
    tracker.artifact_json("environment.json", {**env.record(), "data": [
        {"task": t.task, "version": t.version, "config_hash": t.config_hash, "documents_digest": t.digest,
         "documents": t.documents} for t in read]})
    tracker.tags({"task_kind": kind, "accuracy_metric": primary[0] if primary else "none",
                  "reuse_note": LOGLIKELIHOOD_NOTE if kind == "loglikelihood"
                  else lm.policy.note()})
    log_artifacts(tracker, s, results, samples, lm, stats, metrics, all_params, primary, kind)
    return _summary(tracker, s, prov, results, task_results, primary, kind, metrics)


def _summary(tracker, s, prov, results, task_results, primary, kind, metrics) -> Summary:
    accuracy = None
    if primary is not None:
        metric, _, filt = primary[0].partition(",")
        err = task_results.get(f"{metric}_stderr,{filt}")
        n = results.get("n-samples", {}).get(s.task, {}).get("effective")
        accuracy = (primary[0], primary[1], err if isinstance(err, (int, float)) else None, n)
    return _summary_of(tracker, s, prov, kind, accuracy, metrics)


def _summary_of(tracker, s, prov, kind, accuracy, metrics) -> Summary:
    import mlflow
    run = tracker.client.get_run(tracker.run_id)
    exp_id = run.info.experiment_id
    return Summary(run_id=tracker.run_id, experiment=tracker.client.get_experiment(exp_id).name,
                   experiment_id=exp_id, store=absolute_uri(mlflow.get_tracking_uri()), commit=prov.commit,
                   dirty_files=len(prov.dirty_files), dirty=prov.dirty, task=s.task, kind=kind,
                   accuracy=accuracy, metrics=metrics, resumed_from=s.resume,
                   timing=run.data.tags.get(timing.QUALITY_TAG))


def _requests(samples: dict) -> int:
    """lm-eval's requests behind the logged samples (one row per document and filter)."""
    docs = {(task, row["doc_id"]): len(row["arguments"]) for task, rows in samples.items() for row in rows}
    return sum(docs.values())


def _gpu_metrics(tracker: Tracker, device: str) -> dict:
    from .ranks import gpu_report
    return gpu_report(tracker.sampler, device)


def _log_failure(tracker: Tracker, status: str, line: str, e: BaseException, refused: bool) -> None:
    """Whatever the run had, then its end: a broken store still ends it."""
    try:
        tracker.tags({"error": line, "end_status": status, **({REFUSED_TAG: "true"} if refused else {})})
        lm = tracker.lm
        device = str(lm.device) if lm is not None else "cpu"
        partial = lm.stats.metrics() if lm is not None else {}
        tracker.metrics({**partial, **_gpu_metrics(tracker, device)})
        if status == "FAILED":   # a rank's traceback where a rank failed, else this process's
            tracker.artifact_text("error.txt", getattr(e, "traceback", "") or "".join(traceback.format_exception(e)))
    finally:
        tracker.end(status)

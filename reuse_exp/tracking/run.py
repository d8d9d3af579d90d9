"""One tracked run's lifecycle: attach to or open the MLflow run, the dirty guard, lm-eval,
and an ending that is always FINISHED, FAILED or KILLED with what was logged so far.

The run attaches to the MLflow run that `mlflow run` opened (MLFLOW_RUN_ID) or, called
directly (`reuse-exp run`), opens one. A refusal before evaluating (a dirty tree, an
unknown task, a model that is not there) opens none; one that `mlflow run` opened is
tagged refused, so the audit tells it from a failed result. While it runs, a heartbeat
says it lives (heartbeat.py) and the console shows progress; it ends with a summary
(console.py). What it logs, by name: tracking/schema.py. With `processes` > 1 it launches
that many data-parallel ranks instead (tracking/ranks.py).
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.config import ConfigError
from ..settings import LAUNCHED, RunSettings
from .artifacts import log_artifacts
from .console import Progress, Summary, quiet_known_noise
from .heartbeat import Heartbeat, interval_s
from .lifeline import Lifeline, Terminated
from .provenance import Provenance, check_clean, dirty_diff, provenance, redact, secret_values
from .ranks import RankFailed
from .schema import HEARTBEAT_TAG, REFUSED_TAG, config_key, library_versions, lm_eval_metrics, param_str, same_param
from .store_init import absolute_uri, open_client, store_opening

MAX_DIRTY_FILES_TAG = 50


class RunFailed(Exception):
    """The run ended FAILED or KILLED; `line` is what the user reads, `code` the exit status."""

    def __init__(self, line: str, code: int):
        super().__init__(line)
        self.line, self.code = line, code


# -- the MLflow run ------------------------------------------------------------------------------
@dataclass
class Tracker:
    """The MLflow run of one configuration, attached or opened; logs by run id."""
    run_id: str
    secrets: list[str]
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="reuse_exp_")))
    last_progress: float = 0.0
    step: int = 0            # of the last metrics logged: per-batch progress, then the final values
    sampler: object = None   # the GpuSampler, once started
    lm: object = None        # the harness model, once loaded: its stats are logged even on failure
    heartbeat: Heartbeat | None = None
    console: Progress = field(default_factory=Progress)
    evaluating: bool = False  # past the refusals: lm-eval has the model

    @classmethod
    def start(cls, settings: RunSettings, system_metrics: bool = True) -> "Tracker":
        """Attach or open; `system_metrics` off in a process that only launches ranks (rank 0 logs them)."""
        import mlflow
        mlflow.set_system_metrics_sampling_interval(2)
        mlflow.set_system_metrics_samples_before_logging(1)
        run_id = os.environ.get("MLFLOW_RUN_ID") or None
        beat_every = interval_s()
        with store_opening(mlflow.get_tracking_uri()):   # a new sqlite store: one process creates it
            if run_id is None and settings.experiment:
                mlflow.set_experiment(settings.experiment)
            run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
        tracker = cls(run.info.run_id, secret_values())
        tracker.heartbeat = Heartbeat(tracker.beat, beat_every).start()
        return tracker

    def beat(self, stamp: str) -> None:
        self.client.set_tag(self.run_id, HEARTBEAT_TAG, stamp)

    @property
    def client(self):
        import mlflow
        return mlflow.MlflowClient()

    def _clean(self, text: str) -> str:
        return redact(text, self.secrets)

    def tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag
        self.client.log_batch(self.run_id, tags=[RunTag(k, self._clean(param_str(v))[:5000])
                                                 for k, v in tags.items()])

    def params(self, params: dict) -> None:
        """Log params; one already logged (by `mlflow run`) must hold the same value."""
        from mlflow.entities import Param
        logged = self.client.get_run(self.run_id).data.params
        new = []
        for k, v in params.items():
            v = self._clean(param_str(v))[:6000]
            if k in logged:
                if not same_param(logged[k], v):
                    raise ConfigError(f"parameter {k}: mlflow run logged {logged[k]!r} but the code used {v!r}; "
                                      f"pass the concrete value (-P {k}={v})")
                continue
            new.append(Param(k, v))
        if new:
            self.client.log_batch(self.run_id, params=new)

    def metrics(self, metrics: dict, step: int | None = None) -> None:
        """Log metrics; without a step, after every progress step (MLflow shows the latest step)."""
        from mlflow.entities import Metric
        if step is None:
            self.step += 1
            step = self.step
        now = int(time.time() * 1000)
        clean = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and v == v]  # v == v: NaN is not logged
        if clean:
            self.client.log_batch(self.run_id, metrics=clean)

    def progress(self, stats) -> None:
        """Per batch: the console's progress; metrics at most every 2 s, so a failed or killed
        run keeps what it had."""
        m = stats.metrics()
        self.console.desc = stats.phase
        if stats.phase == "scoring":
            self.console.update(stats.requests_done, stats.requests_total, stats.scoring.scored_tokens,
                                stats.scoring.seconds, unit="scored tok/s")
        else:
            self.console.update(stats.requests_done, stats.requests_total, m.get("generated_tokens", 0),
                                m.get("seconds", 0.0))
        now = time.monotonic()
        if now - self.last_progress < 2.0:
            return
        self.last_progress = now
        self.step = max(self.step, len(stats.decode) + stats.scoring.batch_forwards)
        self.metrics({k: m[k] for k in ("generated_tokens", "seconds", "scored_tokens") if k in m}, step=self.step)

    def artifact_text(self, name: str, text: str) -> None:
        path = self.workdir / name
        path.write_text(self._clean(text))
        self.client.log_artifact(self.run_id, str(path))

    def artifact_json(self, name: str, obj) -> None:
        self.artifact_text(name, json.dumps(obj, indent=2, default=str) + "\n")

    def artifact_jsonl(self, name: str, rows: list) -> None:
        self.artifact_text(name, "".join(json.dumps(r, default=str) + "\n" for r in rows))

    def end(self, status: str) -> None:
        """End the run (and MLflow's system-metrics thread, the heartbeat and the progress bar)."""
        import mlflow
        self.console.close()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status=status)
        else:
            self.client.set_terminated(self.run_id, status)


def end_outside_run(status: str, line: str, prov: Provenance | None = None, refused: bool = False) -> None:
    """A run `mlflow run` opened, ending before we attached (a refusal, a signal): say why and
    which code refused, and close it. Called directly (`reuse-exp run`) there is no such run."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    from mlflow.entities import RunTag
    prov = prov or provenance()
    tags = {"error": redact(line), "end_status": status, "git_commit": prov.commit, "git_branch": prov.branch,
            "git_dirty": param_str(prov.dirty), "source_hash": prov.source_hash,
            "git_dirty_files": "\n".join(prov.dirty_files[:MAX_DIRTY_FILES_TAG])}
    if refused:
        tags[REFUSED_TAG] = "true"
    client = open_client()
    client.log_batch(run_id, tags=[RunTag(k, v[:5000]) for k, v in tags.items()])
    client.set_terminated(run_id, status)


def refuse_outside_run(line: str) -> None:
    """A value refused before the run began (the command line): the run `mlflow run` opened ends
    FAILED, tagged refused."""
    end_outside_run("FAILED", line, refused=True)


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
def run(settings: RunSettings) -> Summary | None:
    """Evaluate one configuration, tracked. Returns its summary (None from a rank our launcher
    started, or one other than 0); raises RunFailed."""
    lifeline = Lifeline()
    tracker = prov = None
    try:
        lifeline.arm()
        from ..evaluation import harness  # lm-eval and torch: imported once the arguments are known good
        from ..evaluation.placement import resolve as resolve_placement
        from . import ranks, resume
        placement = resolve_placement(settings)   # once per process; handed down from here
        rank = placement.rank
        quiet_known_noise({p.stem for p in harness.bundled_tasks_dir().glob("*.yaml")})
        prov = provenance()
        if rank == 0:
            check_clean(prov, settings.allow_dirty)   # before anything heavy, and before any model
        harness.check_gated(settings.task)
        task_manager = harness.task_manager_for(settings.task, settings.include_path)
        launching = placement.to_launch
        if rank > 0:
            ranks.follow(settings, placement, task_manager, resume.cache_dir(settings, prov.commit, None))
            return None
        resumed = resume.check(open_client(), settings, prov.commit, prov.dirty) if settings.resume else None
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
        refused = code == 2 and (tracker is None or not tracker.evaluating)
        if tracker is None:
            if code == 1:  # an unexpected error with no run to keep its traceback: show it
                traceback.print_exception(e, file=sys.stderr)
                line += " (traceback above)"
            end_outside_run(status, line, prov, refused)
        else:
            if code == 1:
                line += " (traceback: the run's error.txt)"
            _log_failure(tracker, status, line, e, refused)
        lifeline.release_parent(status)
        raise RunFailed(line, code) from None
    finally:
        lifeline.disarm()


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


def run_name(s: RunSettings) -> str:
    if s.policy == "adaptive":
        return f"adaptive_{s.mode}_drift{s.drift}_{s.task}"
    return f"k{s.k}_{s.subset if isinstance(s.subset, str) else 'custom'}_{s.task}"


def _log_start(tracker: Tracker, s: RunSettings, prov: Provenance) -> None:
    tracker.tags({"git_commit": prov.commit, "git_branch": prov.branch, "git_dirty": prov.dirty,
                  "git_dirty_files": "\n".join(prov.dirty_files[:MAX_DIRTY_FILES_TAG]),
                  "source_hash": prov.source_hash, "allow_dirty": s.allow_dirty, "reuse_exp.role": "run",
                  "mlflow.runName": run_name(s)})
    given = {n: v for n, v in s.as_dict().items() if n not in ("experiment", "include_path")}
    tracker.params({**given, **library_versions()})
    if prov.dirty and prov.root is not None:
        tracker.artifact_text("dirty.diff", dirty_diff(prov))


def _evaluate(tracker: Tracker, s: RunSettings, placement, task_manager, prov: Provenance, cache: Path) -> Summary:
    """Rank 0's (or the only process's) evaluation, logged; the other ranks run ranks.follow."""
    from ..evaluation import harness
    from ..evaluation.stats import LOGLIKELIHOOD_NOTE, HarnessStats, sample_records, world_metrics
    from . import ranks, resume
    from .gpu_stats import combine
    device = placement.device
    tracker.sampler = ranks.start_sampler(device)
    lm = ranks.load_model(s, placement)
    tracker.lm = lm
    lm.on_batch = tracker.progress
    world_params, world_tags = ranks.world_params(ranks.rank_devices(lm))
    params = lm.params()
    tracker.params({**params, **world_params})
    all_params = {**{n: param_str(v) for n, v in s.as_dict().items()}, **params,
                  "device_type": placement.torch_device.type}
    tracker.tags({"config_key": config_key(all_params), "model_path": lm.loaded.path or "", **world_tags,
                  "request_cache": str(cache), **({"resumed_from": s.resume} if s.resume else {})})
    if s.resume:
        tracker.client.set_tag(s.resume, "resumed_by", tracker.run_id)

    tracker.evaluating = True
    results, wall = ranks.evaluate(lm, s, task_manager, cache)
    reports = ranks.gather_reports(lm, tracker.sampler)
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
    if s.resume:
        scope_tags, scope_metrics = resume.scope(s.resume, stats.requests, _requests(samples))
        tracker.tags(scope_tags)
        metrics |= scope_metrics
    tracker.metrics(metrics)
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
    exp_id = tracker.client.get_run(tracker.run_id).info.experiment_id
    return Summary(run_id=tracker.run_id, experiment=tracker.client.get_experiment(exp_id).name,
                   experiment_id=exp_id, store=absolute_uri(mlflow.get_tracking_uri()), commit=prov.commit,
                   dirty_files=len(prov.dirty_files), dirty=prov.dirty, task=s.task, kind=kind,
                   accuracy=accuracy, metrics=metrics)


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

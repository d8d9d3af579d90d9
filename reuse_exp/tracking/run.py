"""One tracked run's lifecycle: attach to or open the MLflow run, the dirty guard, lm-eval,
and an ending that is always FINISHED, FAILED or KILLED with what was logged so far.

The run attaches to the MLflow run that `mlflow run` opened (MLFLOW_RUN_ID) or, called
directly (`reuse-exp run`), opens one. What it logs, by name: tracking/schema.py. With
`processes` > 1 it launches that many data-parallel ranks instead (tracking/ranks.py).
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.config import ConfigError
from ..settings import RunSettings
from .artifacts import log_artifacts
from .provenance import Provenance, check_clean, dirty_diff, provenance, redact, secret_values
from .ranks import RankFailed
from .schema import config_key, library_versions, lm_eval_metrics, param_str, same_param

MAX_DIRTY_FILES_TAG = 50


class RunFailed(Exception):
    """The run ended FAILED or KILLED; `line` is what the user reads, `code` the exit status."""

    def __init__(self, line: str, code: int):
        super().__init__(line)
        self.line, self.code = line, code


class Terminated(BaseException):
    """SIGTERM (scancel, `kill`, a cancelled mlflow run): end the run KILLED."""



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

    @classmethod
    def start(cls, settings: RunSettings, system_metrics: bool = True) -> "Tracker":
        """Attach or open; `system_metrics` off in a process that only launches ranks (rank 0 logs them)."""
        import mlflow
        mlflow.set_system_metrics_sampling_interval(2)
        mlflow.set_system_metrics_samples_before_logging(1)
        run_id = os.environ.get("MLFLOW_RUN_ID") or None
        if run_id is None and settings.experiment:
            mlflow.set_experiment(settings.experiment)
        run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
        return cls(run.info.run_id, secret_values())

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
        """Per-batch progress, at most every 2 s: a failed or killed run keeps what it had."""
        now = time.monotonic()
        if now - self.last_progress < 2.0:
            return
        self.last_progress = now
        m = stats.metrics()
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
        """End the run (and MLflow's system-metrics thread with it)."""
        import mlflow
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status=status)
        else:
            self.client.set_terminated(self.run_id, status)


def end_outside_run(status: str, line: str) -> None:
    """A run `mlflow run` opened, ending before we attached (a refusal): say why, close it."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    import mlflow
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "error", redact(line))
    client.set_tag(run_id, "end_status", status)
    client.set_terminated(run_id, status)


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
    return "FAILED", 1, f"{text.splitlines()[0] if text else type(e).__name__} (traceback: the run's error.txt)"


def _raise_terminated(signum, frame):
    raise Terminated()


# -- the run -------------------------------------------------------------------------------------
def run(settings: RunSettings) -> str | None:
    """Evaluate one configuration, tracked. Returns the run id (None on a rank other than 0);
    raises RunFailed."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    tracker = None
    rank = int(os.environ.get("RANK", "0"))   # of a launched world; 0 in a single process
    try:
        from ..evaluation import harness  # lm-eval and torch: imported once the arguments are known good
        from . import ranks, resume
        prov = provenance()
        if rank == 0:
            check_clean(prov, settings.allow_dirty)   # before anything heavy, and before any model
        harness.check_gated(settings.task)
        task_manager = harness.task_manager_for(settings.task, settings.include_path)
        launching = ranks.to_launch(settings)
        if rank > 0:
            ranks.follow(settings, task_manager, resume.cache_dir(settings, prov.commit, None))
            return None
        resumed = resume.check(_client(), settings, prov.commit, prov.dirty) if settings.resume else None
        tracker = Tracker.start(settings, system_metrics=launching == 1)
        cache = resume.cache_dir(settings, prov.commit, tracker.run_id, resumed)
        if launching > 1:
            ranks.launch(tracker.run_id, settings, launching, tracker.workdir / "ranks", cache)
            return _launched_end(tracker)
        _log_start(tracker, settings, prov)
        _evaluate(tracker, settings, task_manager, cache)
        tracker.end("FINISHED")
        resume.forget(cache)
        return tracker.run_id
    except BaseException as e:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the ending short
        status, code, line = classify(e)
        line = redact(line)
        if os.environ.get("WORLD_SIZE", "1") != "1":   # a launched rank: tell the launcher why
            ranks.record_failure(line, "".join(traceback.format_exception(e)))
        if tracker is None:
            end_outside_run(status, line)
            if code == 1:  # an unexpected error with no run to keep its traceback: show it
                traceback.print_exception(e, file=sys.stderr)
        else:
            _log_failure(tracker, status, line, e)
        raise RunFailed(line, code) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _client():
    import mlflow
    return mlflow.MlflowClient()


def _launched_end(tracker: Tracker) -> str:
    """Every rank exited 0: rank 0 has logged the results and ended the run FINISHED."""
    status = tracker.client.get_run(tracker.run_id).info.status
    if status != "FINISHED":
        raise RankFailed("FAILED", 1, f"the ranks exited 0 but rank 0 left the run {status}")
    tracker.end("FINISHED")
    return tracker.run_id


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


def _evaluate(tracker: Tracker, s: RunSettings, task_manager, cache: Path) -> None:
    """Rank 0's (or the only process's) evaluation, logged; the other ranks run ranks.follow."""
    import torch

    from ..evaluation import harness
    from ..evaluation.stats import LOGLIKELIHOOD_NOTE, HarnessStats, sample_records, world_metrics
    from . import ranks, resume
    from .gpu_stats import combine
    device = ranks.shard_device(s)
    tracker.sampler = ranks.start_sampler(device)
    lm = ranks.load_model(s)
    tracker.lm = lm
    lm.on_batch = tracker.progress
    world_params, world_tags = ranks.world_params(ranks.rank_devices(lm))
    params = lm.params()
    tracker.params({**params, **world_params})
    all_params = {**{n: param_str(v) for n, v in s.as_dict().items()}, **params,
                  "device_type": torch.device(device).type}
    tracker.tags({"config_key": config_key(all_params), "model_path": lm.loaded.path or "", **world_tags,
                  "request_cache": str(cache), **({"resumed_from": s.resume} if s.resume else {})})
    if s.resume:
        tracker.client.set_tag(s.resume, "resumed_by", tracker.run_id)

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


def _requests(samples: dict) -> int:
    """lm-eval's requests behind the logged samples (one row per document and filter)."""
    docs = {(task, row["doc_id"]): len(row["arguments"]) for task, rows in samples.items() for row in rows}
    return sum(docs.values())


def _gpu_metrics(tracker: Tracker, device: str) -> dict:
    from .ranks import gpu_report
    return gpu_report(tracker.sampler, device)


def _log_failure(tracker: Tracker, status: str, line: str, e: BaseException) -> None:
    """Whatever the run had, then its end: a second Ctrl-C or a broken store still ends it."""
    try:
        tracker.tags({"error": line, "end_status": status})
        lm = tracker.lm
        device = str(lm.device) if lm is not None else "cpu"
        partial = lm.stats.metrics() if lm is not None else {}
        tracker.metrics({**partial, **_gpu_metrics(tracker, device)})
        if status == "FAILED":   # a rank's traceback where a rank failed, else this process's
            tracker.artifact_text("error.txt", getattr(e, "traceback", "") or "".join(traceback.format_exception(e)))
    finally:
        tracker.end(status)

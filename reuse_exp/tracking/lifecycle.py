"""One MLflow run's lifecycle: attach to the run `mlflow run` opened or open one, log to it by
id, and end it FINISHED, FAILED or KILLED; a run `mlflow run` opened that ends before we
attached is closed with the reason (a refusal, a signal)."""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..knobs import MLFLOW_PID
from ..settings import RunSettings
from .aftercare import watch
from .console import Progress
from .heartbeat import Heartbeat, interval_s
from .provenance import Provenance, provenance, redact, secret_values
from .schema import HEARTBEAT_TAG, REFUSED_TAG, param_str, same_param
from .store_init import open_client, store_opening
from .ui import ensure_view

MAX_DIRTY_FILES_TAG = 50


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
            ensure_view(mlflow.MlflowClient(), run.info.experiment_id)   # what the UI shows of the study
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
            self.console.update(stats.requests_done, stats.requests_total, stats.scored_here(),
                                stats.scoring.seconds, unit="scored tok/s")
        else:   # the rate of what this run decoded, not of what a resumed run found kept
            self.console.update(stats.requests_done, stats.requests_total, stats.decoded_here(),
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
    if refused:   # named for what it is, not MLflow's random name
        tags |= {REFUSED_TAG: "true", "reuse_exp.role": "refused", "mlflow.runName": f"refused: {redact(line)}"[:100]}
    client = open_client()
    client.log_batch(run_id, tags=[RunTag(k, v[:5000]) for k, v in tags.items()])
    client.set_terminated(run_id, status)


def refuse_outside_run(line: str) -> None:
    """A value refused before the run began (the command line): the run `mlflow run` opened ends
    FAILED, tagged refused, and is deleted once MLflow has ended it too (aftercare)."""
    end_outside_run("FAILED", line, refused=True)
    mlflow_pid, run_id = MLFLOW_PID.read(), os.environ.get("MLFLOW_RUN_ID")
    if mlflow_pid and run_id:
        watch(mlflow_pid, run_id)

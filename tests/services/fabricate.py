"""Runs written straight into a store with MlflowClient, in the tracked run's schema.

They let status, compare and audit be tested in a second, without a model; the
end-to-end tests check the same code against runs the tracked run really made.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from mlflow.entities import Metric, Param

from reuse_exp.evaluation.stats import output_hash, rate_metrics
from reuse_exp.settings import SPECS

# The tracked run's defaults as it logs them (every setting as given, then what it resolved), at limit 4.
PARAMS = {**{s.name: s.text() for s in SPECS if s.name not in ("experiment", "include_path")}, "limit": "4",
          "model_revision": "local", "model_hash": "abc123", "resolved_dtype": "float32",
          "resolved_device": "cpu", "path": "eager"}
LAYERS = {"first": "1,2,3", "middle": "2,3,4", "last": "5,6,7"}
TOKENS_PER_BATCH = 40


def environment_tags(data_digest: str = "d" * 16, **shaping) -> dict[str, str]:
    """The env.* and data tags of a CPU run on this machine (what the grid counts as here);
    `shaping` overrides entries, e.g. cuda="12.8", device="NVIDIA H100 80GB HBM3"."""
    from reuse_exp.tracking.environment import PREFIX, here
    values = {**here("cpu"), "dtype": "float32", "path": "eager", "world_size": "1", **shaping}
    return {**{PREFIX + n: v for n, v in values.items()}, "data_digest": data_digest,
            "data.tiny_gsm.version": "1.0", "data.tiny_gsm.config_hash": "c" * 16, "data.tiny_gsm.digest": data_digest}


def fabricate(cl, exp_id: str, *, task: str = "tiny_gsm", k: int = 1, subset: str = "first", commit: str,
              dirty: bool = False, status: str = "FINISHED", accuracy: float = 0.5, tps: float = 100.0,
              skipped: float | None = None, start_ms: int | None = None, kind: str = "generate_until",
              tags: dict | None = None, n: int = 8, rates: list[float] | None = None,
              correct: list[bool] | None = None, outputs: list[str] | None = None, env: dict | None = None,
              extra_metrics: dict | None = None, **params) -> str:
    """A run with the tracked run's params, tags and metrics. `rates` (per-batch tokens/s) adds
    timings.json and the median metrics; `correct` (per document, with `outputs`, default all
    "same") adds per_sample.jsonl and sets accuracy and n from it. `env`: its environment and
    data tags (default: this machine's, environment_tags()). `extra_metrics`: more metrics, or other values."""
    run = cl.create_run(exp_id, start_time=start_ms or int(time.time() * 1000), tags={
        "git_commit": commit, "git_branch": "main", "git_dirty": "true" if dirty else "false",
        "source_hash": "s" * 8, "config_key": f"{task}-{k}-{subset}", "task_kind": kind,
        "accuracy_metric": "exact_match,strict-match", "reuse_exp.role": "run",
        **(environment_tags() if env is None else env), **(tags or {})})
    rid = run.info.run_id
    params = {**PARAMS, "task": task, "k": str(k), "subset": subset, "layers": LAYERS[subset],
              **{n: str(v) for n, v in params.items()}}
    if correct is not None:
        n, accuracy = len(correct), sum(correct) / len(correct)
    metrics = {}
    if status == "FINISHED":
        batches = [(TOKENS_PER_BATCH, TOKENS_PER_BATCH / r) for r in rates] if rates else []
        metrics = {"accuracy": accuracy, "accuracy_stderr": (accuracy * (1 - accuracy) / (n - 1)) ** 0.5,
                   "n_samples": n, "skipped_fraction": (k - 1) / k * 0.4 if skipped is None else skipped,
                   "tokens_per_second": (sum(t for t, _ in batches) / sum(s for _, s in batches)) if rates else tps,
                   "generated_tokens": 400.0, "seconds": 400.0 / tps, **rate_metrics(batches), **(extra_metrics or {})}
    now = int(time.time() * 1000)
    cl.log_batch(rid, params=[Param(n, v) for n, v in params.items()],
                 metrics=[Metric(n, v, now, 0) for n, v in metrics.items()])
    with tempfile.TemporaryDirectory() as tmp:
        if status == "FINISHED" and rates:
            path = Path(tmp) / "timings.json"
            path.write_text(json.dumps({"unit": "generated tokens", "batches": [list(b) for b in batches]}))
            cl.log_artifact(rid, str(path))
        if status == "FINISHED" and correct is not None:
            outputs = outputs or ["same"] * len(correct)
            path = Path(tmp) / "per_sample.jsonl"
            path.write_text("".join(json.dumps({"task": task, "doc_id": i, "score": float(c), "correct": c,
                                                "output": output_hash([[o]])}) + "\n"
                                    for i, (c, o) in enumerate(zip(correct, outputs))))
            cl.log_artifact(rid, str(path))
    if status != "RUNNING":
        cl.set_terminated(rid, status)
    return rid

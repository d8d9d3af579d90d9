"""Runs written straight into a store with MlflowClient, in the tracked run's schema.

They let status, compare and audit be tested in a second, without a model; the
end-to-end tests check the same code against runs the tracked run really made.
"""
from __future__ import annotations

import time

from mlflow.entities import Metric, Param

from reuse_exp.settings import SPECS

# The tracked run's defaults as it logs them (every setting as given, then what it resolved), at limit 4.
PARAMS = {**{s.name: s.text() for s in SPECS if s.name not in ("experiment", "include_path")}, "limit": "4",
          "model_revision": "local", "model_hash": "abc123", "resolved_dtype": "float32",
          "resolved_device": "cpu", "path": "eager"}
LAYERS = {"first": "1,2,3", "middle": "2,3,4", "last": "5,6,7"}


def fabricate(cl, exp_id: str, *, task: str = "tiny_gsm", k: int = 1, subset: str = "first", commit: str,
              dirty: bool = False, status: str = "FINISHED", accuracy: float = 0.5, tps: float = 100.0,
              skipped: float | None = None, start_ms: int | None = None, kind: str = "generate_until",
              tags: dict | None = None, **params) -> str:
    run = cl.create_run(exp_id, start_time=start_ms or int(time.time() * 1000), tags={
        "git_commit": commit, "git_branch": "main", "git_dirty": "true" if dirty else "false",
        "source_hash": "s" * 8, "config_key": f"{task}-{k}-{subset}", "task_kind": kind,
        "reuse_exp.role": "run", **(tags or {})})
    rid = run.info.run_id
    params = {**PARAMS, "task": task, "k": str(k), "subset": subset, "layers": LAYERS[subset],
              **{n: str(v) for n, v in params.items()}}
    metrics = {}
    if status == "FINISHED":
        metrics = {"accuracy": accuracy, "tokens_per_second": tps,
                   "skipped_fraction": (k - 1) / k * 0.4 if skipped is None else skipped,
                   "generated_tokens": 400.0, "seconds": 400.0 / tps}
    now = int(time.time() * 1000)
    cl.log_batch(rid, params=[Param(n, v) for n, v in params.items()],
                 metrics=[Metric(n, v, now, 0) for n, v in metrics.items()])
    if status != "RUNNING":
        cl.set_terminated(rid, status)
    return rid

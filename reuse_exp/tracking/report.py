"""A study's report (tables, plots, one metric per configuration) logged as an MLflow run of its
own, tagged with the commit and dirty state like every run, so the audit can judge it."""
from __future__ import annotations

from pathlib import Path

from .provenance import provenance
from .schema import param_str


def log_report(role: str, name: str, files: list[Path], metrics: dict[str, float], params: dict,
               experiment: str | None = None) -> str:
    import mlflow
    prov = provenance()
    client = mlflow.MlflowClient()
    exp = experiment or "Default"
    found = client.get_experiment_by_name(exp)
    exp_id = found.experiment_id if found else client.create_experiment(exp)
    run = client.create_run(exp_id, run_name=name, tags={
        "reuse_exp.role": role, "git_commit": prov.commit, "git_branch": prov.branch,
        "git_dirty": param_str(prov.dirty), "source_hash": prov.source_hash})
    run_id = run.info.run_id
    for key, value in params.items():
        client.log_param(run_id, key, param_str(value))
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))
    for f in files:
        client.log_artifact(run_id, str(f))
    client.set_terminated(run_id, "FINISHED")
    return run_id

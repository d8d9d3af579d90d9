"""The grid end to end with real tracked runs: run, skip what is done, go stale on a new
commit, re-run only that, compare and audit. A random tiny checkpoint, one sample, one block."""
from __future__ import annotations

import pytest

from services.checkout import clean_checkout

pytestmark = pytest.mark.slow

GRID = ["--task", "tiny_gsm", "--limit", "1", "--model", "{ckpt}", "-P", "max_new_tokens=32", "--k", "1,2",
        "--subset", "first"]


def args(ckpt, *extra: str) -> list[str]:
    return [*extra[:2], *[a.format(ckpt=ckpt) for a in GRID], *extra[2:]]


def test_grid_runs_only_what_is_not_done_at_head(tmp_path, tiny_ckpt):
    repo = clean_checkout(tmp_path / "repo")
    env = repo.env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}",
                   MLFLOW_EXPERIMENT_NAME="e2e")
    (tmp_path / "store").mkdir()
    first_head = repo.head

    jobs = ["--jobs-dir", str(tmp_path / "jobs")]
    ran = repo.cli([*args(tiny_ckpt, "grid", "run"), *jobs], env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "[1/2] k1_any" in ran.stdout and "[2/2] k2_first" in ran.stdout
    import mlflow
    runs = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_runs(
        [mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).get_experiment_by_name("e2e").experiment_id])
    snap = tmp_path / "jobs" / "snapshots" / first_head
    assert {r.data.tags["mlflow.source.name"] for r in runs} == {str(snap / "reuse_exp" / "cli" / "__main__.py")}, \
        "the jobs ran from a snapshot of HEAD, not from the checkout"

    status = repo.cli(args(tiny_ckpt, "grid", "status"), env)
    assert "done at HEAD 2/2" in status.stdout, status.stdout + status.stderr

    again = repo.cli([*args(tiny_ckpt, "grid", "run"), *jobs], env)
    assert again.returncode == 0 and "nothing to run: all 2 configuration(s) done" in again.stdout

    repo.commit("NOTES.txt", "a new commit: every run above is now stale\n")
    stale = repo.cli(args(tiny_ckpt, "grid", "status"), env)
    assert f"stale@{first_head[:7]}" in stale.stdout and "done at HEAD 0/2, stale 2" in stale.stdout

    one = repo.cli([*args(tiny_ckpt, "grid", "run", "--k", "1"), *jobs], env)
    assert one.returncode == 0 and "[1/1] k1_any" in one.stdout, one.stdout + one.stderr

    refused = repo.cli(args(tiny_ckpt, "compare"), env)
    assert refused.returncode == 1 and "refusing runs not from clean" in refused.stderr
    assert "k2_first" in refused.stderr

    audit = repo.cli(["audit"], env)
    assert audit.returncode == 1 and "grid tiny_gsm mixes commits" in audit.stdout, audit.stdout + audit.stderr

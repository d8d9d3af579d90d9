"""The grid's SLURM executor against a real single-node Slurm (munged, slurmctld, slurmd on
loopback, started here): an array of the missing configurations through submitit, and a
job killed mid-run that leaves its configuration failed or missing, never done."""
from __future__ import annotations

import re
import subprocess
import time

import pytest

from services.checkout import clean_checkout
from services.slurm import BINARIES, PARTITION, start_slurm
from services import missing

pytestmark = pytest.mark.slow

GRID = ["--task", "tiny_gsm", "--limit", "1", "-P", "max_new_tokens=32", "--subset", "first"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if missing(*BINARIES):
        pytest.skip(f"missing {', '.join(missing(*BINARIES))}: install slurm-wlm and munge (bash .ci/services.sh)")
    cluster = start_slurm(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def repo_env(tmp_path, slurm, tiny_ckpt):
    repo = clean_checkout(tmp_path / "repo")
    (tmp_path / "store").mkdir()
    env = repo.env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}",
                   MLFLOW_EXPERIMENT_NAME="slurm", **slurm.env)
    return repo, env, [*GRID, "--model", str(tiny_ckpt)]


def slurm_args(tmp_path) -> list[str]:
    return ["--executor", "slurm", "--partition", PARTITION, "--time", "10", "--cpus", "1",
            "--jobs-dir", str(tmp_path / "jobs")]


def test_array_of_missing_configs_runs_on_slurm(tmp_path, repo_env):
    repo, env, grid = repo_env
    out = repo.cli(["grid", "run", *grid, "--k", "1,2", *slurm_args(tmp_path), "--wait"], env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    jobs = re.findall(r"submitted (k\d_\w+): job (\d+)_(\d+)", out.stdout)
    assert [j[0] for j in jobs] == ["k1_any", "k2_first"] and len({j[1] for j in jobs}) == 1  # one array
    status = repo.cli(["grid", "status", *grid, "--k", "1,2"], env)
    assert "done at HEAD 2/2" in status.stdout, status.stdout + status.stderr


def test_a_killed_job_never_counts_as_done(tmp_path, repo_env):
    import mlflow
    repo, env, grid = repo_env
    out = repo.cli(["grid", "run", *grid, "--k", "3", *slurm_args(tmp_path), "--no-wait"], env)
    assert out.returncode == 0, out.stdout + out.stderr
    job = re.search(r"submitted k3_first: job (\S+)", out.stdout).group(1)
    cl = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:   # kill it once its run is open, mid-evaluation
        exp = cl.get_experiment_by_name("slurm")
        if exp and cl.search_runs([exp.experiment_id]):
            break
        time.sleep(0.5)
    subprocess.run(["scancel", job.split("_")[0]], env=env, check=True, timeout=30)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        q = subprocess.run(["squeue", "-h", "-j", job.split("_")[0]], env=env, capture_output=True, text=True)
        if not q.stdout.strip():
            break
        time.sleep(0.5)
    status = repo.cli(["grid", "status", *grid, "--k", "3"], env)
    assert "done at HEAD 0/1" in status.stdout, status.stdout + status.stderr
    row = [line.split() for line in status.stdout.splitlines() if line.startswith("k=3")][0]
    assert row[1] in ("failed", "missing"), status.stdout   # the run ended KILLED on SIGTERM, or never began
    runs = cl.search_runs([cl.get_experiment_by_name("slurm").experiment_id])
    assert all(r.info.status != "FINISHED" for r in runs)


def test_a_queued_job_runs_the_commit_it_was_submitted_at(tmp_path, repo_env, slurm):
    """Submit while the node is drained (the job waits in the queue), then edit the checkout and
    commit another change; once the node is back the job runs the submitted commit, clean."""
    import mlflow
    repo, env, grid = repo_env
    submitted = repo.head
    node = ["scontrol", "update", "nodename=localhost"]
    subprocess.run([*node, "state=drain", "reason=queue"], env=env, check=True, timeout=30)
    try:
        out = repo.cli(["grid", "run", *grid, "--k", "2", *slurm_args(tmp_path), "--no-wait"], env)
        assert out.returncode == 0, out.stdout + out.stderr
        job = re.search(r"submitted k2_first: job (\S+)", out.stdout).group(1).split("_")[0]
        queued = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True, text=True)
        assert queued.stdout.strip() == "PENDING", queued.stdout + queued.stderr
        later = repo.commit("NOTES.txt", "a commit made while the job waits\n")
        with open(repo.root / "reuse_exp" / "cli" / "__init__.py", "a") as f:
            f.write("# an edit made while the job waits\n")
    finally:
        subprocess.run([*node, "state=resume"], env=env, check=True, timeout=30)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        q = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True)
        if not q.stdout.strip():
            break
        time.sleep(1)
    cl = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    [run] = cl.search_runs([cl.get_experiment_by_name("slurm").experiment_id])
    assert run.info.status == "FINISHED", run.data.tags.get("error")
    assert run.data.tags["git_commit"] == submitted != later
    assert run.data.tags["git_dirty"] == "false"
    assert run.data.tags["mlflow.source.name"].startswith(str(tmp_path / "jobs" / "snapshots" / submitted))

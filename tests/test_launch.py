"""Grid jobs on GPUs and from snapshots: each concurrent job its own GPU(s), no more jobs at
once than the GPUs allow, nothing on the CPU unless asked; jobs run the submitted commit."""
from __future__ import annotations

import re
import subprocess
import threading
import time

import pytest

from services.checkout import clean_checkout
from reuse_exp.errors import ConfigError
from reuse_exp.study.cells import Cell
from reuse_exp.settings import spec
from reuse_exp.study.launch import gpu_slots, gpus_per_job, run_pool, snapshot


# -- which GPUs a job gets -------------------------------------------------------------------
@pytest.mark.parametrize("gpus, per_job, device, slots", [
    (["0", "1"], 1, "auto", ["0", "1"]),
    (["0", "1", "2", "3"], 2, "cuda", ["0,1", "2,3"]),
    (["0", "1", "2"], 2, "auto", ["0,1"]),                      # the odd GPU stays idle
    (["4", "6"], 1, "auto", ["4", "6"]),                        # CUDA_VISIBLE_DEVICES=4,6 given
    (["GPU-aa", "GPU-bb"], 1, "auto", ["GPU-aa", "GPU-bb"]),   # UUIDs
    ([], 1, "auto", None),                                      # no GPU: the CPU, as asked by auto
    (["0", "1"], 1, "cpu", None),                               # GPUs, but the grid asked for the CPU
])
def test_each_concurrent_job_gets_its_own_gpus(gpus, per_job, device, slots):
    assert gpu_slots(gpus, per_job, device) == slots
    if slots:
        used = [g for s in slots for g in s.split(",")]
        assert len(used) == len(set(used)), "no GPU in two slots"


@pytest.mark.parametrize("gpus, per_job, device, says", [
    ([], 1, "cuda", "no GPU is visible: use -P device=cpu"),
    (["0", "1"], 1, "cuda:1", "pins every job to one GPU"),
    (["0", "1"], 3, "auto", "a job needs 3 GPU(s) but 2 are visible"),
])
def test_what_cannot_be_placed_is_refused(gpus, per_job, device, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        gpu_slots(gpus, per_job, device)


def test_a_data_parallel_run_takes_one_gpu_per_rank():
    cell = lambda processes: Cell(axes=(("k", 1), ("subset", "any")), settings=(("processes", spec("processes").parse(processes)),))  # noqa: E731
    assert gpus_per_job([cell("2")], None, 4) == 2 and gpus_per_job([cell("2.0")], None, 4) == 2
    assert gpus_per_job([cell("1")], None, 4) == 1
    assert gpus_per_job([cell("auto")], None, 4) == 4 and gpus_per_job([cell("auto")], None, 0) == 1
    assert gpus_per_job([cell("2")], 4, 8) == 4


def test_no_more_jobs_at_once_than_slots_and_never_two_on_one():
    running: dict[str, int] = {"0": 0, "1": 0}
    seen, lock = [], threading.Lock()
    peak = [0]

    def start(job, slot):
        with lock:
            running[slot] += 1
            peak[0] = max(peak[0], sum(running.values()))
            seen.append((job, slot, running[slot]))
        time.sleep(0.05 * (job % 3 + 1))
        with lock:
            running[slot] -= 1
        return job * 10

    assert run_pool(list(range(7)), ["0", "1"], start) == [j * 10 for j in range(7)]
    assert peak[0] == 2 and all(n == 1 for _, _, n in seen)
    assert sorted(j for j, _, _ in seen) == list(range(7)) and {s for _, s, _ in seen} == {"0", "1"}


# -- the code a job runs ---------------------------------------------------------------------
def git(args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_a_snapshot_is_the_submitted_commit_clean_whatever_the_checkout_does(tmp_path):
    repo = clean_checkout(tmp_path / "repo")
    submitted = repo.head
    snap = snapshot(submitted, tmp_path / "jobs", repo.root)
    assert snap == tmp_path / "jobs" / "snapshots" / submitted
    assert git(["rev-parse", "HEAD"], snap) == submitted and git(["status", "--porcelain"], snap) == ""
    # The checkout moves on and gets dirty; the snapshot does not.
    repo.commit("NOTES.txt", "another commit\n")
    (repo.root / "reuse_exp" / "cli" / "__init__.py").write_text("# edited in the live tree\n")
    assert git(["rev-parse", "HEAD"], snap) == submitted and git(["status", "--porcelain"], snap) == ""
    assert "edited" not in (snap / "reuse_exp" / "cli" / "__init__.py").read_text()
    # A second grid at that commit reuses it; a touched one is made again.
    assert snapshot(submitted, tmp_path / "jobs", repo.root) == snap
    (snap / "reuse_exp" / "settings.py").write_text("# touched\n")
    snapshot(submitted, tmp_path / "jobs", repo.root)
    assert git(["status", "--porcelain"], snap) == "" and "touched" not in (snap / "reuse_exp" / "settings.py").read_text()
    # A commit that is on no branch (a detached HEAD) snapshots too.
    git(["checkout", "-q", "--detach"], repo.root)
    (repo.root / "reuse_exp" / "cli" / "__init__.py").write_text("# detached\n")
    git(["-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qam", "detached"], repo.root)
    detached = repo.head
    assert git(["rev-parse", "HEAD"], snapshot(detached, tmp_path / "jobs", repo.root)) == detached


# -- submitit-local on (faked) GPUs, for real ----------------------------------------------------
PROBE = """import os
if os.environ.get("PROBE_DIR") and os.environ.get("MLFLOW_EXPERIMENT_NAME") == "slots":
    with open(os.path.join(os.environ["PROBE_DIR"], str(os.getpid())), "w") as f:
        f.write(os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
"""


@pytest.mark.slow
def test_submitit_local_hands_each_gpu_its_next_job(tmp_path, monkeypatch, store):
    """Two faked GPUs, three jobs through submitit: each job on its slot, never two on one; the
    jobs keep the submitting shell's PYTHONPATH (a sitecustomize there reports each process)."""
    import mlflow
    from click.testing import CliRunner

    from reuse_exp.cli.study import grid
    from reuse_exp.study import launch
    monkeypatch.setattr(launch, "visible_gpus", lambda: ["0", "1"])
    extra, probes = tmp_path / "extra", tmp_path / "probes"
    extra.mkdir(), probes.mkdir()
    (extra / "sitecustomize.py").write_text(PROBE)
    monkeypatch.setenv("PYTHONPATH", str(extra))
    monkeypatch.setenv("PROBE_DIR", str(probes))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    args = ["run", "--task", "tiny_gsm", "--limit", "1", "-P", "max_new_tokens=16", "--k", "1,2",
            "--subset", "first,last", "--experiment", "slots", "--executor", "submitit-local", "--allow-dirty",
            "--jobs-dir", str(tmp_path / "jobs")]
    out = CliRunner().invoke(grid, args)
    assert out.exit_code == 0, out.output
    slots = [line.split("GPU ")[1][0] for line in out.output.splitlines() if line.startswith("submitted")]
    assert len(slots) == 3 and set(slots) == {"0", "1"}
    cl = mlflow.MlflowClient(store)
    runs = cl.search_runs([cl.get_experiment_by_name("slots").experiment_id])
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    spans = [(r.info.start_time, r.info.end_time, r.data.tags["cuda_visible_devices"]) for r in runs]
    for a in spans:
        together = [b for b in spans if b[0] < a[1] and a[0] < b[1]]
        assert len(together) <= 2 and len({b[2] for b in together}) == len(together), spans
    seen = {p.read_text() for p in probes.iterdir()}
    assert {"0", "1"} <= seen, f"the tracked runs did not see the submitting shell's PYTHONPATH: {seen}"


def test_a_failed_job_is_named_by_its_own_last_error():
    from reuse_exp.study.launch import last_error
    traceback = ("decoding: 0/1 requests [00:00<?, - tok/s]\nTraceback (most recent call last):\n"
                 '  File "x.py", line 1, in <module>\nmlflow.exceptions.RestException: BAD_REQUEST: duplicate key\n'
                 "submitit ERROR (2026-12-06) - Submitted job triggered an exception\n")
    assert last_error(traceback) == "mlflow.exceptions.RestException: BAD_REQUEST: duplicate key"
    assert last_error("warming up\nError: unknown task 'tiny_gms'; use one of tiny_gsm, tiny_mc\n") == \
        "Error: unknown task 'tiny_gms'; use one of tiny_gsm, tiny_mc"
    assert last_error("  - /tmp/jobs/555/555_0_log.out\n") is None

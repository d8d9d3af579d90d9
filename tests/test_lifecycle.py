"""A tracked run's life as its user meets it, for real: killed outright (SIGKILL), signalled
(SIGTERM, SIGINT) directly or through `mlflow run`, or started together with others on a
new store. Every process here is a real `reuse-exp run` or `mlflow run`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli, subprocess_env

from reuse_exp.tracking.schema import END_REASON_TAG, HEARTBEAT_TAG

pytestmark = pytest.mark.slow


# -- processes --------------------------------------------------------------------------------
def parents() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            out[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def descendants(pid: int) -> set[int]:
    tree, frontier, family = set(), {pid}, parents()
    while frontier:
        frontier = {p for p, pp in family.items() if pp in frontier} - tree
        tree |= frontier
    return tree


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Running (a zombie has ended: it waits only for its parent to read its status)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def still_running(pids, timeout: float = 60) -> list[int]:
    """Those of `pids` still running after up to `timeout` s of waiting for them to end."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    return [p for p in pids if alive(p)]


def as_from_a_terminal():
    """Ctrl-C reaches the child as it would from a shell: not ignored, whatever pytest's parent did."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def fake_conda(directory: Path) -> dict[str, str]:
    """A conda whose every environment is this Python: `mlflow run` with its conda env manager
    then runs the entry point as with a real one, behind `source conda.sh && conda activate`.
    Its conda.sh sets an EXIT trap, so bash stays between MLflow and the command, as bash
    before 5.1 always did (5.1 and later exec a `-c` list's last command when they can)."""
    (directory / "bin").mkdir(parents=True)
    (directory / "etc" / "profile.d").mkdir(parents=True)
    conda = directory / "bin" / "conda"
    conda.write_text('#!/bin/sh\n[ "$1 $2" = "env list" ] && echo \'{"envs": []}\'\nexit 0\n')
    conda.chmod(0o755)
    (directory / "etc" / "profile.d" / "conda.sh").write_text("conda() { :; }\ntrap : EXIT\n")
    return {"MLFLOW_CONDA_HOME": str(directory)}


def launch(launcher: str, repo: Path, store: str, settings: dict, env: dict | None = None) -> subprocess.Popen:
    """`reuse-exp run`, `mlflow run --env-manager local` ("mlflow") or `mlflow run` with its
    conda env manager ("mlflow-conda", a fake conda in env)."""
    if launcher.startswith("mlflow"):
        cmd = [sys.executable, "-m", "mlflow", "run", str(repo)]
        cmd += ["--env-manager", "local"] if launcher == "mlflow" else []
        cmd += [a for k, v in settings.items() for a in ("-P", f"{k}={v}")]
    else:
        cmd = [sys.executable, "-m", "reuse_exp.cli", "run"]
        cmd += [a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    return subprocess.Popen(cmd, cwd=repo, env={**subprocess_env(store), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_terminal)


def wait_for(proc: subprocess.Popen, store: str, ready, timeout: float = 400):
    """The one run in the store, once `ready(run)` says so; fails if the process ends first."""
    import mlflow
    client = mlflow.MlflowClient(store)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ended early ({proc.returncode}): {proc.communicate()[1][-3000:]}"
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        if runs and ready(runs[0]):
            return client, runs[0]
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"not ready in {timeout} s: {proc.communicate()[1][-3000:]}")


def decoding(run) -> bool:
    return run.data.metrics.get("generated_tokens", 0) > 0


# -- SIGTERM and SIGINT -----------------------------------------------------------------------
@pytest.mark.parametrize("launcher, sig", [
    ("reuse-exp", signal.SIGTERM), ("reuse-exp", signal.SIGINT), ("mlflow", signal.SIGTERM),
    ("mlflow", signal.SIGINT), ("mlflow-conda", signal.SIGTERM), ("mlflow-conda", signal.SIGINT)],
    ids=lambda v: v.name if isinstance(v, signal.Signals) else v)
def test_a_signal_ends_the_run_killed_with_no_orphan(clean_repo, store, tmp_path, launcher, sig):
    """SIGTERM (kill, scancel) or SIGINT to the process the user started ends the evaluation:
    no process is left, and the run ends KILLED with the metrics it had. Under `mlflow run`
    the signal goes to MLflow's process, which does not pass SIGTERM on and re-marks an
    interrupted run FAILED by itself."""
    settings = {"task": "tiny_gsm", "limit": 200}   # minutes of decoding: the signal lands in it
    env = fake_conda(tmp_path / "conda") if launcher == "mlflow-conda" else None
    proc = launch(launcher, clean_repo, store, settings, env=env)
    client, run = wait_for(proc, store, decoding)
    tree = descendants(proc.pid)
    if launcher != "reuse-exp":
        assert tree, "mlflow run runs the entry point as its child"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)   # its pipes close when the last process holding them ends
    assert still_running(tree) == [], "no process outlives the one signalled"
    run = client.get_run(run.info.run_id)
    assert (run.info.status, run.data.tags.get("end_status")) == ("KILLED", "KILLED"), err[-3000:]
    assert run.data.metrics["generated_tokens"] > 0 and run.data.metrics["seconds"] > 0
    said = "terminated (SIGTERM)" if sig == signal.SIGTERM and launcher == "reuse-exp" else "the run ended KILLED"
    assert said in err and "Traceback" not in err
    if launcher == "reuse-exp":
        assert proc.returncode == (143 if sig == signal.SIGTERM else 130)


@pytest.mark.parametrize("launcher", ["mlflow", "mlflow-conda"])
def test_mlflow_killed_as_the_run_starts_leaves_nothing_running(clean_repo, store, tmp_path, launcher):
    """SIGTERM to `mlflow run` as soon as its child exists, long before that child has set up
    its signal handling (it imports torch first): the child, orphaned, must not run on to
    FINISHED. It ends the run KILLED before evaluating anything."""
    env = fake_conda(tmp_path / "conda") if launcher == "mlflow-conda" else None
    proc = launch(launcher, clean_repo, store, {"task": "tiny_gsm", "limit": 200}, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        entry_point = [p for p in descendants(proc.pid) if "reuse_exp.cli" in command_line(p)]
        if entry_point:
            break
        time.sleep(0.02)
    assert entry_point, "mlflow run started its entry point"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert still_running(entry_point, timeout=120) == [], "the orphaned entry point ended"
    import mlflow
    client = mlflow.MlflowClient(store)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert (run.info.status, run.data.tags.get("end_status")) == ("KILLED", "KILLED")
    assert "generated_tokens" not in run.data.metrics and run.data.tags["git_commit"]


def test_an_interrupt_after_the_run_finished_leaves_it_finished(clean_repo, store, tiny_ckpt, tasks_dir,
                                                                tmp_path):
    """Ctrl-C to `mlflow run` once the run has ended FINISHED, while its process is still
    exiting: MLflow cancels (SIGTERM to the child) and would then re-mark the run FAILED. The
    child's exit is held open here by an atexit sleep, as a slow teardown would hold it."""
    slow_exit = tmp_path / "slow_exit"
    slow_exit.mkdir()
    (slow_exit / "sitecustomize.py").write_text("import atexit, time\natexit.register(time.sleep, 8)\n")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(slow_exit), os.environ.get("PYTHONPATH")]))}
    settings = {"model": tiny_ckpt, "task": "t_gen", "include_path": tasks_dir, "limit": 2}
    proc = launch("mlflow", clean_repo, store, settings, env=env)
    client, run = wait_for(proc, store, lambda r: r.info.status != "RUNNING")
    assert run.info.status == "FINISHED"
    tree = descendants(proc.pid)
    assert tree, "the child is still exiting"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert still_running(tree) == [], "no process outlives the one signalled"
    assert client.get_run(run.info.run_id).info.status == "FINISHED", err[-3000:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_a_local_grid_reaches_its_job_and_starts_no_other(clean_repo, store, tmp_path, sig):
    """`kill` (or Ctrl-C) of `reuse-exp grid run` with the local executor: the running job ends
    its run KILLED, the next configuration never starts, and the grid says so and exits 128+sig."""
    cmd = [sys.executable, "-m", "reuse_exp.cli", "grid", "run", "--task", "tiny_gsm", "--limit", "200",
           "--k", "1,2", "--subset", "first", "--jobs-dir", str(tmp_path / "jobs")]
    proc = subprocess.Popen(cmd, cwd=clean_repo, env=subprocess_env(store), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_terminal)
    client, run = wait_for(proc, store, decoding)
    tree = descendants(proc.pid)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert still_running(tree) == [], "no job outlives the grid"
    assert proc.returncode == 128 + sig, out + err
    assert (f"grid stopped by {sig.name}; 1 configuration(s) ended early: k1_any; 1 not started: k2_first"
            in err), err[-3000:]
    assert "[2/2]" not in out
    [only] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert (only.info.status, only.data.tags.get("end_status")) == ("KILLED", "KILLED")


# -- SIGKILL: the heartbeat, the audit, the grid and `runs end` ------------------------------
def test_a_killed_run_is_dead_to_the_audit_and_the_grid(clean_repo, store):
    """`kill -KILL` leaves the run RUNNING: no code is left to end it. Its heartbeat stops,
    so the audit flags it dead once --stale-after has passed, the grid runs it again, and
    `reuse-exp runs end` (which the audit names) ends it KILLED with the reason."""
    grid_args = ["--task", "tiny_gsm", "--k", "2", "--subset", "first", "--limit", "50"]
    env = {"REUSE_EXP_HEARTBEAT_S": "1"}
    proc = launch("reuse-exp", clean_repo, store, {"task": "tiny_gsm", "k": 2, "subset": "first", "limit": 50},
                  env=env)
    beats = set()

    def beating_while_decoding(run) -> bool:
        beats.add(run.data.tags.get(HEARTBEAT_TAG))
        return decoding(run) and len(beats - {None}) >= 3

    client, run = wait_for(proc, store, beating_while_decoding)
    proc.kill()
    proc.communicate(timeout=60)
    run_id = run.info.run_id
    assert client.get_run(run_id).info.status == "RUNNING"

    cli_env = {**subprocess_env(store), **env}
    assert run_cli(["audit"], cli_env, clean_repo).returncode == 0, "5 minutes have not passed: alive for now"
    time.sleep(4)
    audit = run_cli(["audit", "--stale-after", "3s"], cli_env, clean_repo)
    assert audit.returncode == 1, audit.stdout + audit.stderr
    assert f"{run_id}  dead: RUNNING with last heartbeat " in audit.stdout
    assert f"end it with `reuse-exp runs end {run_id} --stale-after 3s`" in audit.stdout   # runs as printed

    status = run_cli(["grid", "status", *grid_args, "--stale-after", "3s"], cli_env, clean_repo)
    assert "k=2   failed" in status.stdout and "1 dead: RUNNING, last heartbeat" in status.stdout, status.stdout
    plan = run_cli(["grid", "run", *grid_args, "--stale-after", "3s", "--dry-run"], cli_env, clean_repo)
    assert "would run k2_first" in plan.stdout and "running it again" in plan.stdout, plan.stdout + plan.stderr

    end = run_cli(["runs", "end", run_id, "--stale-after", "3s"], cli_env, clean_repo)
    assert end.returncode == 0 and f"ended {run_id} KILLED" in end.stdout, end.stderr
    ended = client.get_run(run_id)
    assert ended.info.status == "KILLED" and "dead: last heartbeat" in ended.data.tags[END_REASON_TAG]
    assert run_cli(["audit", "--stale-after", "3s"], cli_env, clean_repo).returncode == 0


# -- runs started together ---------------------------------------------------------------------
def test_four_runs_started_together_on_a_new_store_all_finish(clean_repo, tiny_ckpt, tasks_dir, tmp_path):
    """The first process to open a new sqlite store migrates it; four at once used to race
    there (one died in alembic). The store and the experiment are both new."""
    db = tmp_path / "new_store" / "mlflow.db"
    db.parent.mkdir()
    store = f"sqlite:///{db}"
    settings = {"model": tiny_ckpt, "task": "t_gen", "include_path": tasks_dir, "limit": 2,
                "max_new_tokens": 32, "experiment": "together"}
    procs = [launch("reuse-exp", clean_repo, store, {**settings, "k": k}) for k in (1, 2, 3, 4)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n\n".join(err[-2000:] for _, err in outs)
    import mlflow
    client = mlflow.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("together").experiment_id])
    assert sorted(r.data.params["k"] for r in runs) == ["1", "2", "3", "4"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert all(r.data.metrics["generated_tokens"] > 0 for r in runs)

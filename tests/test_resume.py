"""Resume: a run killed for real (SIGKILL) and resumed ends with the metrics and outputs of an
uninterrupted run, decoding only what was left; resuming elsewhere is refused in one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import subprocess_env

from reuse_exp.errors import ConfigError
from reuse_exp.settings import SPECS, RunSettings
from reuse_exp.runner import resume

COMMIT = "a" * 40


@pytest.fixture
def client(store, monkeypatch, tmp_path):
    import mlflow
    monkeypatch.setenv(resume.ROOT_ENV, str(tmp_path / "cache"))
    return mlflow.MlflowClient(store)


def interrupted(client, status="KILLED", commit=COMMIT, dirty="false", **params):
    run = client.create_run("0")
    rid = run.info.run_id
    for name, value in {**{s: v for s, v in zip(("k", "subset", "limit"), ("2", "middle", "6"))}, **params}.items():
        client.log_param(rid, name, value)
    client.set_tag(rid, "git_commit", commit)
    client.set_tag(rid, "git_dirty", dirty)
    client.set_terminated(rid, status)
    return rid


def test_resume_reads_the_cache_of_the_same_commit_and_settings(client):
    rid = interrupted(client)
    s = RunSettings(k=2, subset="middle", limit=6, resume=rid)
    assert resume.check(client, s, COMMIT, dirty=False) == (s, resume.cache_dir(s, COMMIT, rid))
    assert resume.cache_dir(s, COMMIT, "new") == resume.root() / COMMIT / resume.settings_key(s) / rid
    assert resume.settings_key(s) == resume.settings_key(s.replace(resume=None, experiment="x"))
    assert resume.settings_key(s) != resume.settings_key(s.replace(k=3))


@pytest.mark.parametrize("change, says", [
    (dict(commit="b" * 40), "it ran at commit aaaaaaaaaaaa, this is bbbbbbbbbbbb; check out its commit"),
    (dict(dirty=True), "(dirty); check out its commit, clean, or start a new run"),
    (dict(k=3), "it ran with k=2; this run has k=3: leave them out to take its settings"),
    (dict(limit=8), "it ran with limit=6; this run has limit=8"),
    (dict(status="FINISHED"), "that run FINISHED; there is nothing to resume"),
])
def test_resuming_elsewhere_is_refused_in_one_line(client, change, says):
    rid = interrupted(client, status=change.pop("status", "KILLED"))
    commit, dirty = change.pop("commit", COMMIT), change.pop("dirty", False)
    s = RunSettings(**{"k": 2, "subset": "middle", "limit": 6, **change}, resume=rid)
    with pytest.raises(ConfigError) as e:
        resume.check(client, s, commit, dirty)
    assert says in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith(f"resume {rid}: ")


def test_a_resume_takes_the_interrupted_runs_settings_and_names_every_conflict(client, tmp_path):
    rid = interrupted(client, mode="delta", max_new_tokens="128")
    client.set_tag(rid, "include_path", str(tmp_path))
    s, cache = resume.check(client, RunSettings(resume=rid), COMMIT, False, given=frozenset({"resume"}))
    assert (s.k, s.subset, s.limit, s.mode, s.max_new_tokens, s.include_path, s.experiment) == \
           (2, "middle", 6, "delta", 128, (str(tmp_path),), "Default")
    assert cache == resume.cache_dir(s, COMMIT, rid)   # the interrupted run's: its settings' key
    mine = RunSettings(k=3, limit=8, mode="delta", resume=rid)
    with pytest.raises(ConfigError) as e:
        resume.check(client, mine, COMMIT, False, given=frozenset({"resume", "k", "limit", "mode"}))
    assert str(e.value) == (f"resume {rid}: it ran with k=2, limit=6; this run has k=3, limit=8: leave them out "
                            "to take its settings, or start a new run")
    # `mlflow run` gives every parameter (and has logged them): each that differs, with what to pass
    with pytest.raises(ConfigError) as e:
        resume.check(client, RunSettings(resume=rid), COMMIT, False, given=frozenset(x.name for x in SPECS),
                     under_mlflow=True)
    assert str(e.value) == (f"resume {rid}: it ran with k=2, subset=middle, mode=delta, limit=6, max_new_tokens=128; "
                            "this run has k=1, subset=first, mode=output, limit=none, max_new_tokens=256: pass its "
                            "values (-P k=2 -P subset=middle -P mode=delta -P limit=6 -P max_new_tokens=128), or "
                            f"resume with `reuse-exp run --resume {rid}`, which takes them itself")


def test_a_setting_that_shaped_only_the_interrupted_run_is_named_too(client):
    """Its drift shaped the adaptive run, not the fixed one asked for: both conflicts in one line."""
    rid = interrupted(client, policy="adaptive", mode="delta", drift="0.5")
    with pytest.raises(ConfigError) as e:
        resume.check(client, RunSettings(policy="fixed", drift=0.3, resume=rid), COMMIT, False,
                     given=frozenset({"resume", "policy", "drift"}))
    assert str(e.value) == (f"resume {rid}: it ran with policy=adaptive, drift=0.5; this run has policy=fixed, "
                            "drift=0.3: leave them out to take its settings, or start a new run")


def test_a_run_that_may_still_live_is_not_resumed(client):
    from reuse_exp.tracking.heartbeat import stamp
    rid = interrupted(client, status="RUNNING")
    s = RunSettings(k=2, subset="middle", limit=6, resume=rid)
    client.set_tag(rid, "reuse_exp.heartbeat", stamp(time.time() - 20))
    with pytest.raises(ConfigError, match=r"it is RUNNING and its heartbeat is 2\d s old, so it may still run"):
        resume.check(client, s, COMMIT, False)
    client.set_tag(rid, "reuse_exp.heartbeat", stamp(time.time() - 3600))   # dead: its process is gone
    assert resume.check(client, s, COMMIT, False)[1] == resume.cache_dir(s, COMMIT, rid)


def test_a_run_resumed_already_is_not_resumed_again(client):
    rid = interrupted(client)
    client.set_tag(rid, "resumed_by", "b" * 32)
    with pytest.raises(ConfigError, match=f"run {'b' * 32} resumed it already; resume that one "
                                          f"\\(`--resume {'b' * 32}`\\)"):
        resume.check(client, RunSettings(k=2, subset="middle", limit=6, resume=rid), COMMIT, False)


def test_an_unknown_run_is_refused(client):
    with pytest.raises(ConfigError, match="resume nosuchrun: no such run in this tracking store"):
        resume.check(client, RunSettings(resume="nosuchrun"), COMMIT, False)


# -- for real --------------------------------------------------------------------------------
RUN = ["--limit", "12", "--max-new-tokens", "128"]
RUN2 = ["--limit", "24", "--max-new-tokens", "128"]   # two ranks go twice as fast: more to kill mid-way


def cli(repo, store, cache_root, *args):
    env = {**subprocess_env(store), resume.ROOT_ENV: str(cache_root)}
    return subprocess.Popen([sys.executable, "-m", "reuse_exp.cli", "run", *args], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc) -> str:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    return out


def committed(run) -> int:
    """Requests the run's request cache holds (lm-eval's CachingLM: sqlite, one file per rank)."""
    import sqlite3
    folder = run.data.tags.get("request_cache")
    db = Path(folder) / "requests_rank0.db" if folder else None
    if db is None or not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1) as con:
            return con.execute("SELECT COUNT(*) FROM unnamed").fetchone()[0]
    except sqlite3.Error:   # not created yet, or being written
        return 0


def results(metrics: dict) -> dict:
    """Every metric that is a result, not a timing (those cover only what a run computed)."""
    from reuse_exp.evaluation.stats import computed_only
    return {k: v for k, v in metrics.items() if not computed_only(k) and k != "cached_requests"}


def artifact(client, run, name: str) -> str:
    return Path(client.download_artifacts(run.info.run_id, name)).read_text()


def outputs(client, run) -> dict:
    path = Path(client.download_artifacts(run.info.run_id, "samples_tiny_gsm.jsonl"))
    return {(r["doc_id"], r["filter"]): r["filtered_resps"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow
def test_a_killed_run_resumed_equals_an_uninterrupted_one(clean_repo, store, tmp_path):
    import mlflow
    client = mlflow.MlflowClient(store)
    cache_root = tmp_path / "cache"
    finish(cli(clean_repo, store, cache_root, *RUN))
    [whole] = client.search_runs(["0"])

    proc = cli(clean_repo, store, cache_root, *RUN)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:   # kill it once a request is in its cache
        runs = [r for r in client.search_runs(["0"]) if r.info.run_id != whole.info.run_id]
        if runs and committed(runs[0]) >= 1:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    killed = runs[0]
    refused = cli(clean_repo, store, cache_root, *RUN, "--resume", killed.info.run_id)
    _, err = refused.communicate(timeout=300)   # SIGKILL left it RUNNING, with a fresh heartbeat
    assert refused.returncode == 2 and "it is RUNNING and its heartbeat is" in err, err[-2000:]
    ended = subprocess.run([sys.executable, "-m", "reuse_exp.cli", "runs", "end", killed.info.run_id, "--force"],
                           cwd=clean_repo, env=subprocess_env(store), capture_output=True, text=True, timeout=300)
    assert ended.returncode == 0, ended.stderr
    cache = Path(client.get_run(killed.info.run_id).data.tags["request_cache"])
    assert cache.is_relative_to(cache_root) and list(cache.glob("requests_rank0.db")), "requests kept as they finished"

    # given no setting, the resume takes the run's own (conflicting ones: under mlflow run, below)
    said = finish(cli(clean_repo, store, cache_root, "--resume", killed.info.run_id)).splitlines()
    [resumed] = [r for r in client.search_runs(["0"]) if r.info.run_id not in (whole.info.run_id, killed.info.run_id)]
    assert said[2] == (f"resumed   {resumed.data.metrics['cached_requests']:.0f} request(s) came from run "
                       f"{killed.info.run_id}'s request cache, with their results and statistics; the speed covers "
                       "the rest"), said
    m, t = resumed.data.metrics, resumed.data.tags
    assert resumed.info.status == "FINISHED" and t["resumed_from"] == killed.info.run_id
    assert client.get_run(killed.info.run_id).data.tags["resumed_by"] == resumed.info.run_id
    # The same result as the run that was never interrupted ...
    assert outputs(client, resumed) == outputs(client, whole)
    assert m["accuracy"] == whole.data.metrics["accuracy"] > 0
    assert {k: v for k, v in m.items() if k.startswith("exact_match")} == \
           {k: v for k, v in whole.data.metrics.items() if k.startswith("exact_match")}
    # ... a whole run: every count and fraction over all 12 documents, every generation ...
    assert results(m) == results(whole.data.metrics)
    assert {"skipped_fraction", "tokens_per_forward", "reuse_steps", "forwards_prefill"} <= set(results(m))
    for name in ("generations.jsonl", "per_sample.jsonl"):
        assert artifact(client, resumed, name) == artifact(client, whole, name), name
    # ... from decoding only what was left, and naming the figures that cover only that.
    assert 0 < m["cached_requests"] < 12
    assert m["timed_batches"] == 12 - m["cached_requests"] < whole.data.metrics["timed_batches"]
    assert f"{12 - int(m['cached_requests'])} of 12 requests" in t["throughput_scope"]
    assert all(name in t["throughput_scope"] for name in ("tokens_per_second*", "timed_batches", "seconds"))
    assert not cache.exists(), "a finished run's cache is deleted"

    # A second resume of the run already resumed is refused, naming the run that resumed it; the
    # links stay both ways.
    twice = cli(clean_repo, store, cache_root, *RUN, "--resume", killed.info.run_id)
    _, err = twice.communicate(timeout=300)
    assert twice.returncode == 2 and f"run {resumed.info.run_id} resumed it already" in err, err[-2000:]
    assert client.get_run(killed.info.run_id).data.tags["resumed_by"] == resumed.info.run_id
    assert client.get_run(resumed.info.run_id).data.tags["resumed_from"] == killed.info.run_id
    assert len(client.search_runs(["0"])) == 3, "the refused resume opened no run"

    again = cli(clean_repo, store, cache_root, *RUN, "--resume", resumed.info.run_id)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 2 and "that run FINISHED; there is nothing to resume" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_two_ranks_killed_and_resumed_equal_one_uninterrupted_rank(clean_repo, store, tmp_path):
    """Each rank keeps its own shard's cache; the resumed 2-rank run reads both."""
    import mlflow

    from test_distributed import rank_pids
    client = mlflow.MlflowClient(store)
    cache_root = tmp_path / "cache"
    finish(cli(clean_repo, store, cache_root, *RUN2))
    [whole] = client.search_runs(["0"])

    proc = cli(clean_repo, store, cache_root, *RUN2, "--processes", "2")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        runs = [r for r in client.search_runs(["0"]) if r.info.run_id != whole.info.run_id]
        # as soon as some requests are done (and cached): progress is logged every few seconds
        if runs and runs[0].data.metrics.get("generated_tokens", 0) > 0:
            break
        time.sleep(0.1)
    pids = rank_pids(proc.pid)
    assert proc.poll() is None and 1 in pids, "the run ended before it could be killed"
    os.kill(pids[1], signal.SIGKILL)
    proc.communicate(timeout=120)
    killed = client.get_run(runs[0].info.run_id)
    assert killed.info.status == "KILLED"
    cache = Path(killed.data.tags["request_cache"])
    assert sorted(p.name for p in cache.glob("requests_rank*.db")) == ["requests_rank0.db", "requests_rank1.db"]

    finish(cli(clean_repo, store, cache_root, *RUN2, "--processes", "2", "--resume",
                   killed.info.run_id))
    [resumed] = [r for r in client.search_runs(["0"]) if r.data.tags.get("resumed_from") == killed.info.run_id]
    assert resumed.info.status == "FINISHED" and resumed.data.params["world_size"] == "2"
    assert outputs(client, resumed) == outputs(client, whole)
    assert resumed.data.metrics["accuracy"] == whole.data.metrics["accuracy"]
    assert 0 < resumed.data.metrics["cached_requests"] < 24


@pytest.mark.slow
def test_a_run_killed_under_mlflow_run_is_named_and_the_grid_resumes_it(clean_repo, store, tmp_path):
    """The OOM killer's way: SIGKILL of the evaluating process, MLflow's own child. MLflow marks
    the run FAILED with no word of why; the process the run left behind (tracking/aftercare.py)
    ends it KILLED with the reason, so `grid run` resumes it from its request cache (a refused
    `mlflow run -P resume=` of it before, with other settings, does not get in the way)."""
    import mlflow

    from test_lifecycle import command_line, descendants
    client = mlflow.MlflowClient(store)
    env = {**subprocess_env(store), resume.ROOT_ENV: str(tmp_path / "cache")}
    settings = {"k": 2, "subset": "middle", "limit": 6, "max_new_tokens": 128}   # killed after 1 of 6 requests
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "run", str(clean_repo), "--env-manager", "local",
                             *(a for k, v in settings.items() for a in ("-P", f"{k}={v}"))], cwd=clean_repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    runs = []
    while time.monotonic() < deadline and proc.poll() is None:   # once a request is in its cache
        runs = client.search_runs(["0"])
        if runs and committed(runs[0]) >= 1:
            break
        time.sleep(0.05)
    [evaluating] = [p for p in descendants(proc.pid) if "reuse_exp.cli run" in command_line(p)]
    os.kill(evaluating, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-2000:]
    rid = runs[0].info.run_id
    deadline = time.monotonic() + 120
    while "end_status" not in client.get_run(rid).data.tags and time.monotonic() < deadline:
        time.sleep(0.2)
    killed = client.get_run(rid)
    assert (killed.info.status, killed.data.tags.get("end_status")) == ("KILLED", "KILLED"), killed.data.tags
    assert killed.data.tags["reuse_exp.end_reason"].startswith("its process died without ending the run (killed by "
                                                               "SIGKILL: the OOM killer, or kill -9")

    # `mlflow run` passes every parameter: those unlike the run's are named at once, with what to pass
    refused = subprocess.run([sys.executable, "-m", "mlflow", "run", str(clean_repo), "--env-manager", "local",
                              "-P", f"resume={rid}"], cwd=clean_repo, env=env, capture_output=True, text=True,
                             timeout=600)
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert (f"reuse-exp: resume {rid}: it ran with k=2, subset=middle, limit=6, max_new_tokens=128; this run has k=1, "
            "subset=first, limit=none, max_new_tokens=256: pass its values (-P k=2 -P subset=middle -P limit=6 -P "
            f"max_new_tokens=128), or resume with `reuse-exp run --resume {rid}`") in refused.stderr, refused.stderr[-2000:]

    grid = subprocess.run([sys.executable, "-m", "reuse_exp.cli", "grid", "run", "--task", "tiny_gsm", "--k", "2",
                           "--subset", "middle", "--limit", "6", "-P", "max_new_tokens=128",
                           "--jobs-dir", str(tmp_path / "jobs")], cwd=clean_repo, env=env, capture_output=True,
                          text=True, timeout=900)
    assert grid.returncode == 0, grid.stdout[-3000:] + grid.stderr[-3000:]
    assert f"resume k2_middle: run {rid[:8]} was interrupted" in grid.stdout
    [resumed] = [r for r in client.search_runs(["0"]) if r.data.tags.get("resumed_from") == rid]
    m = resumed.data.metrics
    assert resumed.info.status == "FINISHED" and resumed.data.tags["resumed_from"] == rid
    assert 0 < m["cached_requests"] < 6 and m["n_samples"] == 6   # it went on from where it was killed
    assert f"resumed   {m['cached_requests']:.0f} request(s) came from run {rid}'s request cache" in grid.stdout

"""The CI guard: every reason it fails for, and that a clean grid passes."""
from __future__ import annotations

import re
import time

import pytest
from click.testing import CliRunner

from reuse_exp.cli import main
from reuse_exp.cli.study import audit_cmd
from reuse_exp.study.audit import audit
from reuse_exp.study.store import fetch_runs, git_head
from reuse_exp.tracking.heartbeat import parse_stamp, stamp
from reuse_exp.tracking.schema import END_REASON_TAG, HEARTBEAT_TAG, REFUSED_TAG
from services.fabricate import fabricate
from services import store as stores

store = stores.fabricated_store   # a Store of its own per test (services/store.py)

OLD, NEW = "a" * 40, "b" * 40


def clean_grid(store, commit: str, **kw) -> list[str]:
    return [fabricate(store.client, store.exp_id, k=k, subset=s, commit=commit, **kw)
            for k in (1, 2, 3) for s in ("first", "middle", "last")]


def findings(store, **kw):
    return audit(fetch_runs(store.client, store.exp_id), **kw)


def test_clean_grid_passes(store):
    clean_grid(store, OLD)
    clean_grid(store, NEW)            # a whole newer grid supersedes the old one: no mix
    assert findings(store) == []
    out = CliRunner(env=store.env).invoke(audit_cmd, [])
    assert out.exit_code == 0 and "audit ok: 18 run(s)" in out.output


def test_dirty_and_commitless_runs_fail(store):
    dirty = fabricate(store.client, store.exp_id, commit=NEW, dirty=True)
    unknown = fabricate(store.client, store.exp_id, k=2, commit="unknown")
    untagged = fabricate(store.client, store.exp_id, k=3, commit="")
    reasons = {f.run_id: f.reason for f in findings(store)}
    assert reasons[dirty].startswith("dirty")
    assert reasons[unknown].startswith("no git commit") and reasons[untagged].startswith("no git commit")
    out = CliRunner(env=store.env).invoke(audit_cmd, [])
    assert out.exit_code == 1
    assert f"{dirty}  dirty" in out.output and "audit failed: 3 finding(s)" in out.output


def test_a_dead_run_fails_naming_its_last_heartbeat(store):
    """RUNNING with a heartbeat older than --stale-after: a job killed without a word."""
    now = time.time()
    dead = fabricate(store.client, store.exp_id, commit=NEW, status="RUNNING", start_ms=int(now * 1000) - 3 * 3600_000,
                     tags={HEARTBEAT_TAG: stamp(now - 720)})
    alive = fabricate(store.client, store.exp_id, k=2, commit=NEW, status="RUNNING",
                      start_ms=int(now * 1000) - 3 * 3600_000, tags={HEARTBEAT_TAG: stamp(now - 20)})
    silent = fabricate(store.client, store.exp_id, k=3, commit=NEW, status="RUNNING",
                       start_ms=int(now * 1000) - 400_000)   # never beat: its start is its last sign
    found = {f.run_id: f.reason for f in findings(store)}   # the default: 5 minutes
    assert set(found) == {dead, silent}
    assert found[dead].startswith("dead: RUNNING with last heartbeat ") and "(12m ago)" in found[dead]
    assert f"`reuse-exp runs end {dead}`" in found[dead]
    assert found[silent].startswith("dead: RUNNING with no heartbeat, started ")
    assert {f.run_id for f in findings(store, stale_after_s=900)} == set()
    for flag, flagged in ((["--stale-after", "90s"], {dead, silent}), (["--stale-after", "10m"], {dead}),
                          (["--stale-after", "15"], {dead, silent, alive}), (["--stale-after", "15m"], set()),
                          ([], {dead, silent})):
        out = CliRunner(env=store.env).invoke(audit_cmd, flag)
        assert out.exit_code == (1 if flagged else 0), (flag, out.output)
        assert {line.split()[0] for line in out.output.splitlines() if "  dead:" in line} == flagged, flag


def test_stale_after_takes_durations_only(store):
    out = CliRunner(env=store.env).invoke(audit_cmd, ["--stale-after", "5y"])
    assert out.exit_code == 2 and "give a duration like 90s, 10m" in out.output


def test_refused_runs_are_counted_apart_never_findings(store):
    """A typo or a dirty tree refused before evaluating holds no result: not a finding."""
    for why in ("k=0: must be >= 1", "refusing to run from a dirty tree: x.py"):
        refused = fabricate(store.client, store.exp_id, commit=NEW, status="FAILED", dirty="dirty" in why,
                            tags={REFUSED_TAG: "true", "error": why})
    store.client.set_tag(refused, "git_commit", "unknown")           # outside git: no commit, still refused
    store.client.delete_run(refused)   # as a refusal leaves it: deleted with its record, counted all the same
    deleted_dirty = fabricate(store.client, store.exp_id, k=3, commit=NEW, dirty=True)
    store.client.delete_run(deleted_dirty)   # a user's deletion: out of the audit, not counted
    clean_grid(store, NEW)
    assert findings(store) == []
    out = CliRunner(env=store.env).invoke(audit_cmd, [])
    assert out.exit_code == 0, out.output
    assert "audit ok: 9 run(s)" in out.output and "2 refused run(s), ignored" in out.output
    # ...while a run that evaluated without a commit, or dirty, still fails it
    unknown = fabricate(store.client, store.exp_id, k=2, commit="unknown", status="FAILED")
    out = CliRunner(env=store.env).invoke(audit_cmd, [])
    assert out.exit_code == 1 and f"{unknown}  no git commit" in out.output
    assert f"1 finding(s) over 10 run(s) in grid ({store.uri}); 2 refused run(s), ignored" in out.output


def test_runs_end_marks_a_dead_run_killed_with_its_reason(store):
    now = time.time()
    dead = fabricate(store.client, store.exp_id, commit=NEW, status="RUNNING", start_ms=int(now * 1000) - 3600_000,
                     tags={HEARTBEAT_TAG: stamp(now - 600)})
    alive = fabricate(store.client, store.exp_id, k=2, commit=NEW, status="RUNNING",
                      tags={HEARTBEAT_TAG: stamp(now - 5)})
    cli = CliRunner(env=store.env)
    out = cli.invoke(main, ["runs", "end", alive])
    assert out.exit_code == 1 and "looks alive" in out.output and "--force" in out.output
    assert store.client.get_run(alive).info.status == "RUNNING"
    out = cli.invoke(main, ["runs", "end", dead])
    assert out.exit_code == 0 and f"ended {dead} KILLED" in out.output
    run = store.client.get_run(dead)
    assert run.info.status == "KILLED" and run.data.tags["end_status"] == "KILLED"
    assert run.data.tags[END_REASON_TAG].startswith("dead: last heartbeat ")
    out = cli.invoke(main, ["runs", "end", dead])
    assert out.exit_code == 1 and "already ended KILLED" in out.output
    out = cli.invoke(main, ["runs", "end", alive, "--force", "--reason", "node rebooted"])
    assert out.exit_code == 0 and store.client.get_run(alive).data.tags[END_REASON_TAG] == "node rebooted"
    assert findings(store) == []      # a clean KILLED run at a commit is no finding
    assert "no run nope" in cli.invoke(main, ["runs", "end", "nope"]).output


def test_grid_mixing_commits_fails_naming_every_run(store):
    """The study's failure: the newest run of each config came from three commits."""
    ids = clean_grid(store, OLD)
    newer = [fabricate(store.client, store.exp_id, k=2, subset=s, commit=NEW) for s in ("middle", "last")]
    found = findings(store)
    # the three k=1 runs are one configuration (k=1 computes every layer): the newest stands for it
    assert len(found) == 7 and all("mixes commits" in f.reason for f in found)
    assert {f.run_id for f in found} == set(ids[2:4] + newer + ids[6:])
    assert "aaaaaaa: 5 config(s), bbbbbbb: 2 config(s)" in found[0].reason


def test_other_settings_make_another_grid(store):
    clean_grid(store, OLD)
    fabricate(store.client, store.exp_id, k=2, subset="middle", commit=NEW, limit="8")
    assert findings(store) == []


def test_unknown_experiment_is_one_line(store):
    out = CliRunner(env=store.env).invoke(audit_cmd, ["--experiment", "nope"])
    assert out.exit_code == 1 and "no experiment 'nope'" in out.output


def test_audit_of_head_grid_from_git(store):
    """HEAD is a real commit: the grid's own convention for `git_commit`."""
    clean_grid(store, git_head())
    assert findings(store) == []


def test_a_comparison_over_several_commits_is_flagged(store):
    """compare --include-other-commits records `mixed:` on its parent run; the guard names it."""
    parent = store.client.create_run(store.exp_id, tags={"reuse_exp.role": "compare", "git_dirty": "false",
                                                          "git_commit": "mixed:aaaaaaa,bbbbbbb"}).info.run_id
    store.client.set_terminated(parent)
    found = findings(store)
    assert len(found) == 1 and found[0].run_id == parent
    assert "several commits (aaaaaaa,bbbbbbb)" in found[0].reason and f"--run-id {parent}" in found[0].reason


@pytest.mark.slow
def test_the_audits_command_ends_a_killed_run_as_printed_at_its_last_heartbeat(store, clean_repo, tmp_path):
    """A real run killed outright (SIGKILL): `audit --stale-after 3s` names it dead, and the
    `runs end` command it prints works exactly as printed, ending the run at its last heartbeat."""
    import os
    import shlex
    import signal
    import subprocess
    import sys

    from conftest import subprocess_env
    env = {**subprocess_env(store.uri), **store.env, "REUSE_EXP_HEARTBEAT_S": "1",
           "REUSE_EXP_CACHE_ROOT": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "reuse_exp.cli", "run", "--limit", "4"], cwd=clean_repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        runs = store.client.search_runs([store.exp_id])
        if runs and HEARTBEAT_TAG in runs[0].data.tags:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    [run] = store.client.search_runs([store.exp_id])
    assert run.info.status == "RUNNING"
    time.sleep(4.5)   # past --stale-after, with no heartbeat since the kill

    def cli(*args):   # as a user types `reuse-exp ARGS`
        return subprocess.run([sys.executable, "-m", "reuse_exp.cli", *args], cwd=clean_repo, env=env,
                              capture_output=True, text=True, timeout=300)
    out = cli("audit", "--stale-after", "3s")
    assert out.returncode == 1 and f"{run.info.run_id}  dead:" in out.stdout, out.stdout + out.stderr
    [printed] = [c for c in re.findall(r"`([^`]+)`", out.stdout) if c.startswith("reuse-exp runs end")]
    ended = cli(*shlex.split(printed)[1:])
    assert ended.returncode == 0 and f"ended {run.info.run_id} KILLED" in ended.stdout, ended.stdout + ended.stderr
    after = store.client.get_run(run.info.run_id)
    last = store.client.get_run(run.info.run_id).data.tags[HEARTBEAT_TAG]
    assert after.info.status == "KILLED"
    assert after.info.end_time == round(parse_stamp(last) * 1000), "it ended when it last beat, not now"
    assert cli("audit", "--stale-after", "3s").returncode == 0


def test_a_run_ended_before_it_began_holds_no_result(store):
    """MLflow's CLI opens the run before the package starts: killed then, the run has no code
    tags, but no result either; the audit counts it apart instead of failing forever."""
    run = store.client.create_run(store.exp_id)
    store.client.set_terminated(run.info.run_id, "KILLED")
    assert findings(store) == []
    out = CliRunner(env=store.env).invoke(audit_cmd, [])
    assert out.exit_code == 0 and "1 run(s) ended before they began, ignored" in out.output, out.output
    store.client.set_terminated(run.info.run_id, "FINISHED")   # a result with no code: a finding
    assert [f.run_id for f in findings(store)] == [run.info.run_id]
    # killed outright before it logged its code: dead, and nothing else to say of it
    silent = store.client.create_run(store.exp_id, start_time=int(time.time() * 1000) - 600_000).info.run_id
    assert [(f.run_id, f.reason.split(":")[0]) for f in findings(store) if f.run_id == silent] == [(silent, "dead")]

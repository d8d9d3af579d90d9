"""The CI guard: every reason it fails for, and that a clean grid passes."""
from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

from reuse_exp.study.audit import audit, audit_cmd
from reuse_exp.study.store import fetch_runs, git_head
from services.fabricate import fabricate
from services.store import new_store

OLD, NEW = "a" * 40, "b" * 40


@pytest.fixture
def store(tmp_path_factory, tmp_path):
    return new_store(tmp_path_factory.getbasetemp(), tmp_path)


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


def test_stuck_running_fails_after_the_timeout(store):
    now = int(time.time() * 1000)
    old = fabricate(store.client, store.exp_id, commit=NEW, status="RUNNING", start_ms=now - 3 * 3600_000)
    fresh = fabricate(store.client, store.exp_id, k=2, commit=NEW, status="RUNNING", start_ms=now - 60_000)
    found = {f.run_id: f.reason for f in findings(store, stuck_after_s=3600)}
    assert set(found) == {old} and found[old].startswith("stuck RUNNING for 3.0 h")
    out = CliRunner(env=store.env).invoke(audit_cmd, ["--stuck-after", "30"])
    assert out.exit_code == 1 and old in out.output and fresh in out.output


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

"""Refusals through a real `mlflow run`: a typo, a value the policy refuses, a dirty tree or a tree
outside git leaves the run MLflow opened FAILED and tagged refused, with the commit where there is
one, then deleted with that record once MLflow has ended it (out of the UI's runs table), and the CI
guard counts such runs apart instead of failing on them."""
from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import git, mlflow_run, run_cli, runs_of, subprocess_env

from reuse_exp.tracking.schema import REFUSED_TAG

pytestmark = pytest.mark.slow

# One of each way a value is refused: by MLflow's parameter type, by the setting's own parse, by the
# policy (layer 99, before the run evaluates). Every value's refusal is tested in process
# (tests/test_settings.py); each `mlflow run` here costs seconds of two shared cores.
BAD_VALUES = [("k", "abc"), ("mode", "bar"), ("subset", "3,99")]


def test_refused_runs_are_tagged_and_the_audit_ignores_them(clean_repo, store, tmp_path):
    head = git(["rev-parse", "HEAD"], clean_repo).strip()
    # the refusals at once: they are independent, and real processes sharing a new store
    with ThreadPoolExecutor(len(BAD_VALUES)) as pool:
        outs = list(pool.map(lambda nv: mlflow_run(clean_repo, store, {nv[0]: nv[1]}), BAD_VALUES))
    for (name, value), out in zip(BAD_VALUES, outs):
        assert out.returncode != 0
        assert (f"{name}={value}" in out.stderr or f"'--{name.replace('_', '-')}'" in out.stderr
                or "layer index 99 out of range" in out.stderr), out.stderr[-2000:]
        assert "Traceback" not in out.stderr

    dirty = tmp_path / "dirty"
    git(["clone", "-q", str(clean_repo), str(dirty)], tmp_path)
    (dirty / "notes.txt").write_text("a new file can change a result\n")
    out = mlflow_run(dirty, store, {"limit": 2})
    assert out.returncode != 0 and "refusing to run from a dirty tree: notes.txt" in out.stderr

    outside = tmp_path / "outside_git"
    shutil.copytree(clean_repo, outside, ignore=shutil.ignore_patterns(".git"))
    out = mlflow_run(outside, store, {"limit": 2})
    assert out.returncode != 0 and "the code is not a git commit" in out.stderr

    deadline = time.monotonic() + 120   # each run's aftercare deletes it once its `mlflow run` has exited
    while time.monotonic() < deadline:
        _, runs = runs_of(store)
        if all(r.info.lifecycle_stage == "deleted" for r in runs):
            break
        time.sleep(0.5)
    assert {r.info.lifecycle_stage for r in runs} == {"deleted"}, [r.data.tags.get("error") for r in runs]
    assert len(runs) == len(BAD_VALUES) + 2
    assert all(r.data.tags["mlflow.runName"].startswith("refused: ") for r in runs)
    assert {r.info.status for r in runs} == {"FAILED"}
    assert all(r.data.tags.get(REFUSED_TAG) == "true" and r.data.tags.get("error") for r in runs)
    commits = sorted(r.data.tags["git_commit"] for r in runs)
    assert commits == sorted([head] * (len(BAD_VALUES) + 1) + ["unknown"])   # the dirty clone is at HEAD too
    assert sum(r.data.tags["git_dirty"] == "true" for r in runs) == 2

    audit = run_cli(["audit"], subprocess_env(store), clean_repo)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "audit ok: 0 run(s) in Default" in audit.stdout and f"{len(BAD_VALUES) + 2} refused run(s), ignored" in audit.stdout

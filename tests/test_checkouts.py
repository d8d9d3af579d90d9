"""Two clones and one install, for real: the study's commands judge the checkout the user stands
in, and say which, never the one the package was installed from.

The install is this test session's own `reuse-exp` (installed from the working tree under test,
a third checkout); clone A sits at the snapshot commit, clone B one commit later. A grid done at
A's HEAD is done in A and stale in B; compare in B refuses A's runs by B's HEAD; `grid run` in B
runs B's code (a snapshot of B) and records B's commit; `audit` reads the store of the directory
it is typed in."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import git, subprocess_env

from services.checkout import GIT_ID, OFFLINE
from services.fabricate import fabricate
from services.store import new_store

pytestmark = pytest.mark.slow

GRID = ["--task", "tiny_gsm", "--k", "1", "--limit", "2", "-P", "max_new_tokens=16"]


def installed(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """The console script of this environment's install, as a user types it in `cwd`."""
    script = Path(sys.executable).with_name("reuse-exp")
    return subprocess.run([str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def clones(clean_repo, tmp_path_factory):
    root = tmp_path_factory.mktemp("clones")
    a, b = root / "a", root / "b"
    for clone in (a, b):
        git(["clone", "-q", str(clean_repo), str(clone)], root)
    (b / "NOTES.md").write_text("a later commit\n")
    subprocess.run(["git", "add", "NOTES.md"], cwd=b, check=True, env={**os.environ, **GIT_ID})
    subprocess.run(["git", "commit", "-qm", "later"], cwd=b, check=True, env={**os.environ, **GIT_ID})
    return {name: (path, git(["rev-parse", "HEAD"], path).strip()) for name, path in (("a", a), ("b", b))}


def test_the_grid_compare_and_audit_judge_the_checkout_they_are_typed_in(clones, tmp_path_factory, tmp_path):
    (a, head_a), (b, head_b) = clones["a"], clones["b"]
    store = new_store(tmp_path_factory.getbasetemp(), tmp_path)
    fabricate(store.client, store.exp_id, k=1, commit=head_a, limit="2", max_new_tokens="16")
    env = {**subprocess_env(store.uri), **store.env, **OFFLINE}

    in_a = installed(["grid", "status", *GRID], a, env)
    assert f"at HEAD {head_a[:7]} of {a}" in in_a.stdout and "done at HEAD 1/1" in in_a.stdout, in_a.stdout + in_a.stderr
    in_b = installed(["grid", "status", *GRID], b, env)
    assert f"at HEAD {head_b[:7]} of {b}" in in_b.stdout and "stale 1" in in_b.stdout, in_b.stdout + in_b.stderr

    refused = installed(["compare", *GRID, "--no-log"], b, env)
    assert refused.returncode == 1 and f"refusing runs not from clean {head_b[:7]}" in refused.stderr, refused.stderr

    ran = installed(["grid", "run", *GRID, "--jobs-dir", str(tmp_path / "jobs")], b, env)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert f"checkout {b} at {head_b[:7]}" in ran.stdout
    [new] = [r for r in store.client.search_runs([store.exp_id]) if r.data.tags["git_commit"] != head_a]
    assert (new.info.status, new.data.tags["git_commit"], new.data.tags["git_dirty"]) == ("FINISHED", head_b, "false")

    # audit reads the store of the directory it is typed in (MLflow's default: ./mlflow.db)
    bare = {k: v for k, v in env.items() if not k.startswith("MLFLOW_")}
    audit = installed(["audit"], a, bare)
    assert audit.returncode == 1 and f"no tracking store at {a / 'mlflow.db'}" in audit.stderr, audit.stderr

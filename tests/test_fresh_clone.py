"""The README's set-up as a newcomer runs it: `pip install -e .` in a fresh clone, then its
main command, `mlflow run . --env-manager local -P k=2 -P subset=middle`, four at once on
MLflow's default store, which does not exist yet. Real processes; the install is the
clone's distribution metadata (its pyproject's entry points) ahead of this Python's."""
from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest
from services.checkout import clean_checkout

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed_clone(tmp_path_factory) -> tuple[Path, dict]:
    """A fresh clone and the metadata `pip install -e` gives it (setuptools here cannot build
    an editable wheel offline): its entry points, found before this Python's own install."""
    root = tmp_path_factory.mktemp("clone")
    checkout = clean_checkout(root / "reuse_exp")
    project = tomllib.loads((checkout.root / "pyproject.toml").read_text())["project"]
    dist = root / "site" / f"{project['name']}-{project['version']}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = {**project.get("entry-points", {}), "console_scripts": project["scripts"]}
    (dist / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()) + "\n" for group, points in groups.items()))
    return checkout.root, checkout.env(PYTHONPATH=f"{root / 'site'}:{checkout.root}")


def test_the_readme_command_four_times_at_once_on_no_store_all_finish(installed_clone):
    """MLflow's CLI opens (creates, migrates) the default sqlite store before the package runs;
    four at once used to race in alembic there, and three of four died with a traceback."""
    repo, env = installed_clone
    assert not (repo / "mlflow.db").exists()
    cmd = ["mlflow", "run", ".", "--env-manager", "local", "-P", "k=2", "-P", "subset=middle",
           "-P", "limit=2", "-P", "max_new_tokens=32"]
    procs = [subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, stdin=subprocess.DEVNULL) for _ in range(4)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n\n".join(err[-2000:] for _, err in outs)
    assert not any("Traceback" in err for _, err in outs)
    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs(["0"])
    assert [r.info.status for r in runs] == ["FINISHED"] * 4
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True,
                          text=True).stdout == ""   # the store and its lock are ignored

"""Temporary sqlite tracking stores: one migrated template per test session, copied per test.

Creating and migrating MLflow's schema takes ~10 s; copying the migrated file takes
milliseconds, so every test gets a store of its own.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Store:
    uri: str
    client: object
    experiment: str
    exp_id: str

    @property
    def env(self) -> dict[str, str]:
        """What a CliRunner or subprocess needs to read and write this experiment."""
        return {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_EXPERIMENT_NAME": self.experiment}


def template(base: Path) -> Path:
    """A migrated, empty store under the session's temp root (the file itself is the cache)."""
    db = base / "mlflow-template" / "mlflow.db"
    if not db.exists():
        import mlflow
        building = base / "mlflow-template.building"
        building.mkdir(parents=True, exist_ok=True)
        mlflow.MlflowClient(f"sqlite:///{building / 'mlflow.db'}").search_experiments()
        building.rename(db.parent)
    return db


def new_store(base: Path, directory: Path, experiment: str = "grid") -> Store:
    import mlflow
    db = directory / "mlflow.db"
    shutil.copyfile(template(base), db)
    uri = f"sqlite:///{db}"
    cl = mlflow.MlflowClient(uri)
    # artifacts beside the store, not in the working directory's mlruns/
    exp_id = cl.create_experiment(experiment, artifact_location=(directory / "artifacts").as_uri())
    return Store(uri=uri, client=cl, experiment=experiment, exp_id=exp_id)


# Fixtures for the test files that read and write a fabricated store: import them there
# (`from services.store import fabricated_store, head`); `store` there is this Store, not
# conftest's bare URI.
@pytest.fixture(name="store")
def fabricated_store(tmp_path_factory, tmp_path) -> Store:
    return new_store(tmp_path_factory.getbasetemp(), tmp_path)


@pytest.fixture
def head() -> str:
    """Read per test: in a shared working tree another developer may commit meanwhile."""
    from reuse_exp.study.store import git_head
    return git_head()

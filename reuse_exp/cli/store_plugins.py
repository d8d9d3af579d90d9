"""MLflow's store builders for the schemes `mlflow run` opens before the package runs, as
`mlflow.tracking_store` plug-ins (pyproject.toml): each first asks whether the store can work
(tracking/store_init.py) and, where it cannot, ends MLflow's own command with that one line
(click's error, which MLflow's CLI prints as `Error: ...`), not MLflow's traceback after four
minutes of retries. The package's own commands ask the same question first (the answer is kept
per process), so within them these builders never refuse."""
from __future__ import annotations

import click

from ..tracking import store_init


def _checked(store_uri: str) -> None:
    why = store_init.unavailable(store_uri)
    if why:
        raise click.ClickException(why)


def sqlite_store(store_uri: str, artifact_uri: str | None = None):
    """MLflow's sqlite store, built under the store's lock (store_init.sqlite_store)."""
    _checked(store_uri)
    return store_init.sqlite_store(store_uri, artifact_uri)


def rest_store(store_uri: str, artifact_uri: str | None = None):
    """MLflow's client of a tracking server, once the server answers."""
    from mlflow.tracking._tracking_service.utils import _get_rest_store
    _checked(store_uri)
    return _get_rest_store(store_uri, artifact_uri=artifact_uri)


def database_store(store_uri: str, artifact_uri: str | None = None):
    """MLflow's store in a database server (PostgreSQL, MySQL), once the server answers."""
    from mlflow.tracking._tracking_service.utils import _get_sqlalchemy_store
    _checked(store_uri)
    return _get_sqlalchemy_store(store_uri, artifact_uri)

"""Opening the tracking store, one process at a time where that matters.

The first process to open a new sqlite store creates and migrates its tables (alembic);
two doing it at once collide, and one dies in alembic. Runs started together (a grid's
array job, a shell loop with `&`) hold a file lock next to the database while they open
the store and create their experiment. Other stores (a server) need no lock.

`mlflow run` opens the store itself before the package runs, so the lock must be taken
inside MLflow too: `sqlite_store` is MLflow's store builder for sqlite URIs under the same
lock, registered as an `mlflow.tracking_store` plug-in (pyproject.toml) by `pip install`.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote

from filelock import FileLock

LOCK_SUFFIX = "-lock"   # mlflow.db-lock: beside the database, and ignored with it (.gitignore)


def absolute_uri(uri: str) -> str:
    """The tracking URI a job elsewhere must use: a relative sqlite path made absolute."""
    m = re.match(r"^sqlite:///(?!/)(.*)$", uri)
    if m:
        return f"sqlite:///{Path(m.group(1)).resolve()}"
    if "://" not in uri:  # a bare directory is a file store
        return str(Path(uri).resolve())
    return uri


def sqlite_file(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = Path(unquote(uri[len("sqlite:///"):]).split("?")[0])
    if path.name in ("", ":memory:"):
        return None
    return path if path.is_absolute() else Path.cwd() / path


@contextmanager
def store_opening(uri: str):
    """Hold the store's lock (a sqlite store's; nothing for others) for the body."""
    db = sqlite_file(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with _lock(str(db.with_name(db.name + LOCK_SUFFIX))):
        yield


@lru_cache(maxsize=None)
def _lock(path: str) -> FileLock:
    """One lock object per file: re-entrant in a thread, so the plug-in's builder can run while
    `store_opening` holds the lock (a second FileLock on the same file would wait for itself)."""
    return FileLock(path)


def sqlite_store(store_uri: str, artifact_uri: str | None = None):
    """MLflow's own sqlite store, built (tables created and migrated) under the store's lock."""
    from mlflow.tracking._tracking_service.utils import _get_sqlalchemy_store
    db = sqlite_file(store_uri)
    if db is not None and db.parent.is_dir() and not os.access(db.parent, os.W_OK):
        return _get_sqlalchemy_store(store_uri, artifact_uri)   # read-only: no one creates it there, no lock
    with store_opening(store_uri):
        return _get_sqlalchemy_store(store_uri, artifact_uri)


def open_client(uri: str | None = None):
    """An MlflowClient whose store exists: created and migrated under the lock if it is new."""
    import mlflow
    uri = uri or mlflow.get_tracking_uri()
    with store_opening(uri):
        client = mlflow.MlflowClient(uri)
        client.search_experiments(max_results=1)   # opens (creates, migrates) the store
    return client

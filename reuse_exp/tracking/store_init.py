"""Opening the tracking store, one process at a time where that matters.

The first process to open a new sqlite store creates and migrates its tables (alembic);
two doing it at once collide, and one dies in alembic. Runs started together (a grid's
array job, a shell loop with `&`) hold a file lock next to the database while they open
the store and create their experiment. Other stores (a server) need no lock.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
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
    return path if path.is_absolute() else Path.cwd() / path


@contextmanager
def store_opening(uri: str):
    """Hold the store's lock (a sqlite store's; nothing for others) for the body."""
    db = sqlite_file(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(db.with_name(db.name + LOCK_SUFFIX)):
        yield


def open_client(uri: str | None = None):
    """An MlflowClient whose store exists: created and migrated under the lock if it is new."""
    import mlflow
    uri = uri or mlflow.get_tracking_uri()
    with store_opening(uri):
        client = mlflow.MlflowClient(uri)
        client.search_experiments(max_results=1)   # opens (creates, migrates) the store
    return client

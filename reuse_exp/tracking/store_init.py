"""Opening the tracking store, one process at a time where that matters.

The first process to open a new sqlite store creates and migrates its tables (alembic);
two doing it at once collide, and one dies in alembic. Runs started together (a grid's
array job, a shell loop with `&`) hold a file lock next to the database while they open
the store and create their experiment. Other stores (a server) need no lock.

`mlflow run` opens the store itself before the package runs, so the lock must be taken
inside MLflow too: `sqlite_store` is MLflow's store builder for sqlite URIs under the same
lock, registered as an `mlflow.tracking_store` plug-in (pyproject.toml, through cli/store_plugins.py)
by `pip install`.

A store that cannot work is said in one line before anything else (`unavailable`): a server
that does not answer (MLflow's own client retries for four minutes, then prints a traceback),
a sqlite file in a folder that does not exist, an address MLflow cannot open (`localhost:5000`
without `http://`), a database without its driver.
"""
from __future__ import annotations

import os
import re
import socket
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote, urlparse

from filelock import FileLock

from ..errors import StoreUnavailable

LOCK_SUFFIX = "-lock"   # mlflow.db-lock: beside the database, and ignored with it (.gitignore)


def absolute_uri(uri: str) -> str:
    """The tracking URI a job elsewhere must use: a relative sqlite path made absolute."""
    m = re.match(r"^sqlite:///(?!/)(.*)$", uri)
    if m:
        return f"sqlite:///{Path(m.group(1)).resolve()}"
    if "://" not in uri and not urlparse(uri).scheme:  # a bare directory is a file store
        return str(Path(uri).resolve())
    return uri


def tracking_uri() -> str:
    """The store this process logs to (MLFLOW_TRACKING_URI, else MLflow's default), absolute."""
    import mlflow
    return absolute_uri(mlflow.get_tracking_uri())


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
    if db is None or not db.parent.is_dir():   # no folder: `unavailable` says so
        yield
        return
    with _lock(str(db.with_name(db.name + LOCK_SUFFIX))):
        yield


# -- a store that cannot work, in one line ----------------------------------------------------
SERVER_TRIES, SERVER_TIMEOUT_S = 3, 5.0
DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}
FIX = "fix MLFLOW_TRACKING_URI (a sqlite:///PATH file, a server's http://HOST:PORT, or postgresql+psycopg2://...)"


@lru_cache(maxsize=None)
def unavailable(uri: str, must_exist: bool = False) -> str | None:
    """Why the store at `uri` cannot be used (one line naming the fix), or None. A server is
    asked whether it answers at all, a few times over seconds; TLS, credentials and the rest are
    MLflow's own client's business. `must_exist`: a sqlite file that is not there is no store (the
    audit reads a store, it must not make an empty one and pass)."""
    db = sqlite_file(uri)
    if db is not None:
        if must_exist and not db.is_file():
            return f"no tracking store at {db}: point MLFLOW_TRACKING_URI at the store to read"
        if not db.parent.is_dir():
            return f"no folder {db.parent} for the sqlite store {uri}: create it, or {FIX}"
        return None
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if scheme in DEFAULT_PORTS and parsed.hostname:
        why = _no_answer(parsed.hostname, parsed.port or DEFAULT_PORTS[scheme])
        if why:
            what = "tracking server" if scheme.startswith("http") else f"{scheme} server"
            return f"{uri}: the {what} does not answer ({why}, {SERVER_TRIES} tries): start it, or {FIX}"
    return None


def _no_answer(host: str, port: int) -> str | None:
    """Why no connection to host:port could be made, or None once one is."""
    why = None
    for attempt in range(SERVER_TRIES):
        try:
            socket.create_connection((host, port), timeout=SERVER_TIMEOUT_S).close()
            return None
        except socket.gaierror:
            return f"no host {host!r}"
        except OSError as e:
            why = e.strerror or type(e).__name__
        if attempt + 1 < SERVER_TRIES:
            time.sleep(0.5)
    return why.lower() if why else "no answer"


def require_store(uri: str, must_exist: bool = False) -> None:
    """StoreUnavailable (one line) unless the store at `uri` can be used."""
    why = unavailable(uri, must_exist)
    if why:
        raise StoreUnavailable(why)


def opening_failed(uri: str, e: Exception) -> StoreUnavailable:
    """What MLflow's own opening of a store raised, as one line."""
    from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException
    if isinstance(e, UnsupportedModelRegistryStoreURIException):
        hint = f" (a server is http://{uri})" if re.fullmatch(r"[\w.-]+:\d+/?", uri) else ""
        return StoreUnavailable(f"MLFLOW_TRACKING_URI={uri} is no store MLflow can open{hint}: {FIX}")
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, ImportError):
        return StoreUnavailable(f"the store {uri} needs a driver that is not installed ({first}): install it, "
                                "or name one (postgresql+psycopg2://...)")
    return StoreUnavailable(f"cannot open the tracking store {uri}: {first[:300]}")


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


def open_client(uri: str | None = None, must_exist: bool = False):
    """An MlflowClient whose store exists: created and migrated under the lock if it is new
    (unless `must_exist`). StoreUnavailable (one line) when it cannot be used."""
    import mlflow
    uri = uri or mlflow.get_tracking_uri()
    require_store(uri, must_exist)
    try:
        with store_opening(uri):
            client = mlflow.MlflowClient(uri)
            client.search_experiments(max_results=1)   # opens (creates, migrates) the store
    except Exception as e:   # MLflow's, SQLAlchemy's or a driver's: the store cannot be opened
        raise opening_failed(uri, e) from None
    return client

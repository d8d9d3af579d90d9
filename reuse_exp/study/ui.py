"""`reuse-exp ui`: the MLflow UI of a store, opened on the study's view of an experiment.

MLflow 3's UI keeps columns and its GenAI/model-training switch in the browser, so a fresh
browser opens an experiment on a traces overview with no result in sight. This gives every
experiment of the store the study's saved view (tracking/ui.py), starts `mlflow server` on the
store (none for a store that is a server already), and opens the experiment's runs table in that
view: the configuration, the commit and the result of every run, best first. It serves until
Ctrl-C (or SIGTERM), then stops the server it started.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import webbrowser
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from ..tracking.store_init import open_client
from ..tracking.ui import ensure_view, study_address
from .store import experiment_name

START_TIMEOUT_S = 120.0


def experiment_to_open(cl, name: str | None) -> str:
    """The named experiment, else MLFLOW_EXPERIMENT_NAME's, else the one of the store's newest run."""
    if name or os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        exp = cl.get_experiment_by_name(experiment_name(name))
        if exp is None:
            known = ", ".join(repr(e.name) for e in cl.search_experiments())
            raise ConfigError(f"no experiment {experiment_name(name)!r} in the store (it has {known})")
        return exp.experiment_id
    exps = [e.experiment_id for e in cl.search_experiments()]
    newest = cl.search_runs(exps, max_results=1, order_by=["attributes.start_time DESC"]) if exps else []
    return newest[0].info.experiment_id if newest else "0"


def serve(store: str, experiment: str | None = None, host: str = "127.0.0.1", port: int = 5000,
          browser: bool = True, echo: Callable[[str], None] = print) -> None:
    """Serve `store`'s UI (until interrupted) and open the study's view of an experiment."""
    cl = open_client(store, must_exist=True)
    for exp in cl.search_experiments():
        ensure_view(cl, exp.experiment_id)
    exp_id = experiment_to_open(cl, experiment)
    if store.startswith(("http://", "https://")):   # a server already: its UI is there
        _show(study_address(store, exp_id), browser, echo)
        return
    with mlflow_server(store, host, port) as (base, log):
        echo(f"serving {store} at {base} (its log: {log}); Ctrl-C stops it")
        _show(study_address(base, exp_id), browser, echo)
        _wait_for_a_signal()


def _show(address: str, browser: bool, echo: Callable[[str], None]) -> None:
    echo(f"open      {address}")
    # Only a graphical session: without one, Python's webbrowser would start a text browser in this terminal
    if browser and (sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or
                    os.environ.get("WAYLAND_DISPLAY")):
        webbrowser.open(address)


@contextmanager
def mlflow_server(store: str, host: str, port: int):
    """`mlflow server` on the store, in a session of its own (a Ctrl-C here stops it through us)."""
    base = f"http://{host}:{port}"
    with socket.socket() as probe:   # another server there would answer for ours
        if probe.connect_ex((host, port)) == 0:
            raise ConfigError(f"{base} is taken (another `mlflow ui`?): stop it, or pass --port N")
    log = Path(tempfile.mkdtemp(prefix="reuse_exp_ui_")) / "mlflow-server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
                                 "--host", host, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_until_healthy(proc, base, log)
        yield base, log
    finally:
        _stop(proc)


def _wait_until_healthy(proc: subprocess.Popen, base: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            last = (log.read_text(errors="replace").strip().splitlines() or ["(no output)"])[-1]
            raise ConfigError(f"mlflow server exited ({proc.returncode}) before it served {base}: {last[:300]} "
                              f"(its log: {log}); another port: --port N")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:   # not listening yet
            time.sleep(0.3)
    raise ConfigError(f"mlflow server did not answer at {base} within {START_TIMEOUT_S:.0f} s (its log: {log})")


def _wait_for_a_signal() -> None:
    """Until Ctrl-C or SIGTERM (either ends the wait; the caller stops the server)."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)   # SIGTERM as Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(proc: subprocess.Popen) -> None:
    """The server we started, and its workers (its process group)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)

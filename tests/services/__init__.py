"""Real services for the infrastructure tests, started in a temp dir on loopback.

Each helper starts its daemons, waits until they answer, and stops exactly the
processes it started. A missing binary makes the test skip, naming the package
that `.ci/services.sh` installs.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def missing(*binaries: str) -> list[str]:
    return [b for b in binaries if shutil.which(b) is None and not Path(b).exists()]


def wait_until(check, timeout: float, what: str, log: Path | None = None) -> None:
    """Poll `check()` until it is truthy; on timeout fail naming the log to read."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    tail = ""
    if log is not None and log.exists():
        tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s{tail}")


def port_open(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop one process we started (and its process group, which it leads)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def stop_pidfile(pidfile: Path, grace: float = 10.0) -> None:
    """Stop a daemon that forked itself, by the pid it wrote."""
    if not pidfile.exists():
        return
    pid = int(pidfile.read_text().split()[0])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def start(cmd: list[str], log: Path, **kw) -> subprocess.Popen:
    """A foreground daemon in its own process group, output to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kw)

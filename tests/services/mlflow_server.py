"""`mlflow server` on a loopback port over a given backend store (sqlite or PostgreSQL)."""
from __future__ import annotations

import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from . import LOOPBACK, free_port, start, stop, wait_until


@dataclass
class MlflowServer:
    port: int
    proc: subprocess.Popen

    @property
    def uri(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def stop(self) -> None:
        stop(self.proc, grace=20)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start_mlflow_server(backend_uri: str, artifacts: Path, log: Path, timeout: float = 120) -> MlflowServer:
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", LOOPBACK, "--port", str(port),
           "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts),
           "--workers", "2"]
    server = MlflowServer(port=port, proc=start(cmd, log))
    try:
        wait_until(lambda: server.proc.poll() is None and _healthy(server.uri) or server.proc.poll() is not None,
                   timeout, "mlflow server", log)
        if server.proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({server.proc.returncode}); see {log}")
    except BaseException:
        server.stop()
        raise
    return server

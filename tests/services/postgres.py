"""A throwaway PostgreSQL on a loopback port: initdb in a temp dir, postgres in the foreground.

PostgreSQL refuses to run as root, so under root the server runs as the `postgres`
system user that Debian's package creates.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import LOOPBACK, free_port, port_open, start, stop, wait_until

DB, USER = "mlflow", "mlflow"


def pg_bin(name: str) -> str | None:
    """Debian puts the server binaries under /usr/lib/postgresql/<version>/bin, off PATH."""
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def available() -> str | None:
    """None when usable, else why not (the skip reason)."""
    lacking = [b for b in ("initdb", "postgres", "psql") if pg_bin(b) is None]
    if lacking:
        return f"missing {', '.join(lacking)}: install postgresql (bash .ci/services.sh)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and no `postgres` user to run the server as"
    return None


@dataclass
class Postgres:
    port: int
    proc: subprocess.Popen

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg2://{USER}@{LOOPBACK}:{self.port}/{DB}"

    def stop(self) -> None:
        stop(self.proc, grace=20)


def _as_server_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def start_postgres(root: Path, timeout: float = 60) -> Postgres:
    reason = available()
    if reason:
        raise FileNotFoundError(reason)
    data = root / "pgdata"
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        for d in (root, *root.parents):  # the server user must reach its data dir
            if d == Path("/"):
                break
            d.chmod(d.stat().st_mode | 0o011)
        os.chown(root, user.pw_uid, user.pw_gid)
    subprocess.run(_as_server_user([pg_bin("initdb"), "-D", str(data), "-U", USER, "--auth=trust",
                                    "--no-sync", "-E", "UTF8"]),
                   check=True, capture_output=True, timeout=120)
    port = free_port()
    log = root / "postgres.log"
    if os.geteuid() == 0:
        log.touch()
        os.chown(log, pwd.getpwnam("postgres").pw_uid, -1)
    proc = start(_as_server_user([pg_bin("postgres"), "-D", str(data), "-h", LOOPBACK, "-p", str(port),
                                  "-k", str(root), "-c", "fsync=off", "-c", "max_connections=200"]), log)
    server = Postgres(port=port, proc=proc)
    try:
        wait_until(lambda: port_open(port), timeout, "postgres", log)
        subprocess.run([pg_bin("psql"), "-h", LOOPBACK, "-p", str(port), "-U", USER, "-d", "postgres",
                        "-c", f"CREATE DATABASE {DB}"], check=True, capture_output=True, timeout=30)
    except BaseException:
        server.stop()
        raise
    return server

"""Launching a grid's configurations: one local process after another, or one submitit
array job (Slurm, or concurrent local processes).

On SLURM every configuration is one array task running the tracked run; with
`cluster="local"` submitit runs the same tasks as concurrent local processes (what CI
uses where no Slurm can be started). Each job gets the tracking URI and experiment
explicitly, so it writes where the grid reads. A job that dies leaves its run FAILED,
KILLED, or RUNNING with a stopped heartbeat (dead after `--stale-after`): never FINISHED, so never done.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .cells import Cell, run_command
from .store import REPO_ROOT, store_error

DEFAULT_FOLDER = Path.home() / ".cache" / "reuse_exp" / "submitit"  # outside the checkout: keeps it clean


@dataclass(frozen=True)
class SubmititOptions:
    cluster: str = "slurm"            # slurm | local
    folder: Path = DEFAULT_FOLDER
    partition: str | None = None
    gpus: int | None = None
    time_min: int = 240
    account: str | None = None
    cpus: int | None = None

    def parameters(self, name: str) -> dict:
        p = {"timeout_min": self.time_min, "name": name}
        if self.gpus:
            p["gpus_per_node"] = self.gpus
        if self.cpus:
            p["cpus_per_task"] = self.cpus
        if self.cluster == "slurm":
            p.update({f"slurm_{k}": v for k, v in (("partition", self.partition), ("account", self.account))
                      if v})
        return p


def job_env(uri: str, experiment: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": experiment}


def run_local(cells: list[Cell], uri: str, experiment: str, allow_dirty: bool, echo=print) -> list[str]:
    """One process per configuration, in turn; returns the names of those that failed."""
    failed = []
    for i, cell in enumerate(cells, 1):
        echo(f"[{i}/{len(cells)}] {cell.name}")
        proc = subprocess.run(run_command(cell, allow_dirty), cwd=REPO_ROOT, env=job_env(uri, experiment),
                              stdin=subprocess.DEVNULL)
        if proc.returncode:
            echo(f"[{i}/{len(cells)}] {cell.name} failed (exit {proc.returncode})")
            failed.append(cell.name)
    return failed



class JobFailed(RuntimeError):
    """The tracked run of one configuration exited non-zero."""


def run_job(cmd: list[str], env: dict[str, str], cwd: str) -> int:
    """Body of one array task (top-level so submitit can pickle it)."""
    code = subprocess.run(cmd, cwd=cwd, env={**os.environ, **env}, stdin=subprocess.DEVNULL).returncode
    if code:
        raise JobFailed(f"the tracked run exited {code}")
    return code


def submit(cells: list[Cell], uri: str, experiment: str, allow_dirty: bool, opts: SubmititOptions,
           wait: bool, echo=print) -> tuple[list[str], str | None]:
    """Submit one array; with `wait`, return the names of the configurations whose job failed,
    and the one-line explanation when they failed on the sqlite store's concurrency limits."""
    import submitit
    folder = opts.folder if opts.folder.is_absolute() else Path.cwd() / opts.folder
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=opts.cluster)
    executor.update_parameters(**opts.parameters(f"reuse-grid-{cells[0].settings[0][1]}"))
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": experiment}
    if opts.cluster == "local" and "OMP_NUM_THREADS" not in os.environ:
        # N concurrent jobs on one machine: torch's default threads per job would fight
        # (seen: a tiny model's warm-up 18 s instead of 0.5 s on 2 cores)
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(cells)))
    if opts.cluster == "slurm" and uri.startswith("sqlite"):
        echo(f"warning: {uri} is a sqlite file; jobs on several nodes writing one file over a shared "
             "filesystem can corrupt or lock it: serve it with `mlflow server` (docs/grid.md)")
    cmds = [run_command(c, allow_dirty) for c in cells]
    jobs = executor.map_array(run_job, cmds, [env] * len(cells), [str(REPO_ROOT)] * len(cells))
    for cell, job in zip(cells, jobs):
        echo(f"submitted {cell.name}: job {job.job_id} ({opts.cluster}; logs in {folder / str(job.job_id)})")
    if not wait:
        echo("not waiting: follow with `reuse-exp grid status` (a dead job shows failed or missing)")
        return [], None
    failed, hint = [], None
    for cell, job in zip(cells, jobs):
        try:
            job.result()
        except Exception as e:  # submitit re-raises the job's error, or says how the job died
            failed.append(cell.name)
            log = job.stderr() or ""
            hint = hint or store_error(log, uri)
            echo(f"{cell.name}: job {job.job_id} failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}")
    return failed, hint

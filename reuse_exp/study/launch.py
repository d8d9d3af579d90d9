"""Launching a grid's configurations: local processes, or submitit jobs (Slurm, or local
processes through submitit).

On SLURM every configuration is one array task running the tracked run; with
`cluster="local"` submitit runs the same tasks as concurrent local processes (what CI
uses where no Slurm can be started). Each job gets the tracking URI and experiment
explicitly, so it writes where the grid reads. A job that dies leaves its run FAILED,
KILLED, or RUNNING with a stopped heartbeat (dead after `--stale-after`): never FINISHED, so never done.

Snapshots. Jobs run from a clean clone of the commit the grid was started at, in the checkout it
was started in (the current directory's, not the package's install: tracking/provenance.py) (shared
objects, so it takes a moment), never from the live checkout: a job waiting in a queue
while the checkout is edited or moves to another commit still runs, clean, the code that
was submitted, and its run records that commit. `--allow-dirty` grids run in the live tree,
since their uncommitted changes are the point.

GPUs. On a machine with GPUs the local and submitit-local executors give each concurrent
job its own GPU, or its own g GPUs (`--gpus g`, or the runs' `processes`), through
CUDA_VISIBLE_DEVICES, and run no more jobs at once than that allows. Nothing runs on the
CPU there unless the grid asks for it (`-P device=cpu`). On Slurm, the scheduler hands out
GPUs (`--gpus`).

Signals. SIGTERM or Ctrl-C to a local grid goes on to its running jobs, which end their
runs KILLED, and no further job starts.
"""
from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, GridStopped, JobFailed
from .cells import Cell, run_command
from .store import store_error

# Job scripts, logs and snapshots (FOLDER/snapshots/COMMIT): outside the checkout, which stays clean.
DEFAULT_FOLDER = Path.home() / ".cache" / "reuse_exp" / "submitit"


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
        if self.gpus and self.cluster == "slurm":   # submitit-local's own GPU choice is always GPU 0..g-1
            p["gpus_per_node"] = self.gpus
        if self.cpus:
            p["cpus_per_task"] = self.cpus
        if self.cluster == "slurm":
            p.update({f"slurm_{k}": v for k, v in (("partition", self.partition), ("account", self.account))
                      if v})
        return p


def job_env(uri: str, experiment: str) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": experiment}


# -- the code a job runs ------------------------------------------------------------------------
def snapshot(commit: str, folder: Path, repo: Path) -> Path:
    """A clean checkout of `repo`'s `commit` under `folder` (made once per commit, remade if touched)."""
    dest = folder / "snapshots" / commit
    if dest.is_dir() and _git(["status", "--porcelain"], dest) == "" and _git(["rev-parse", "HEAD"], dest) == commit:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{commit[:12]}-", dir=dest.parent))
    _git(["clone", "-q", "--shared", "--no-checkout", str(repo), str(tmp)], dest.parent)
    _git(["checkout", "-q", "--detach", commit], tmp)
    if dest.exists():
        shutil.rmtree(dest)
    try:
        tmp.rename(dest)
    except OSError:   # another grid made it meanwhile: the same commit, so the same files
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _git(args: list[str], cwd: Path) -> str | None:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    if out.returncode and args[0] in ("clone", "checkout"):
        raise ConfigError(f"cannot snapshot the commit for the jobs (git {args[0]}: {out.stderr.strip()})")
    return out.stdout.strip() if out.returncode == 0 else None


def workdir(commit: str, folder: Path, allow_dirty: bool, repo: Path) -> Path:
    """Where the jobs run: a snapshot of `repo`'s `commit`, or the live tree for a dirty grid."""
    return repo if allow_dirty else snapshot(commit, folder, repo)


# -- GPUs ---------------------------------------------------------------------------------------
def visible_gpus() -> list[str]:
    """This machine's GPUs as CUDA_VISIBLE_DEVICES names them."""
    import torch
    count = torch.cuda.device_count()
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is None:
        return [str(i) for i in range(count)]
    return [g.strip() for g in given.split(",") if g.strip()][:count]


def gpu_slots(gpus: list[str], per_job: int, device: str) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES of each concurrent job: one slot per `per_job` GPUs. None: the jobs
    run on the CPU, with no GPU to share out (none visible, or the grid asked for the CPU)."""
    if device == "cpu":
        return None
    if not gpus:
        if device.startswith("cuda"):
            raise ConfigError(f"the grid's runs ask for device {device} but no GPU is visible: "
                              "use -P device=cpu (or auto)")
        return None
    if device not in ("auto", "cuda"):
        raise ConfigError(f"-P device={device} pins every job to one GPU: use auto (or cuda) and each job "
                          "gets its own")
    if per_job > len(gpus):
        raise ConfigError(f"a job needs {per_job} GPU(s) but {len(gpus)} are visible: lower --gpus "
                          "(or the runs' processes)")
    return [",".join(gpus[i:i + per_job]) for i in range(0, len(gpus) - per_job + 1, per_job)]


def gpus_per_job(cells: list[Cell], gpus: int | None, visible: int) -> int:
    """--gpus, else what the runs' `processes` asks for (one rank per GPU; `auto`: every one of
    the `visible` GPUs), else 1."""
    if gpus:
        return gpus
    processes = cells[0].as_dict().get("processes", 1)
    return max(1, visible) if processes == "auto" else processes


def run_pool(jobs: list, slots: list[str], start: Callable[[object, str], object]) -> list:
    """start(job, slot) for every job, at most one job per slot at a time; results in job order."""
    free: queue.Queue[str] = queue.Queue()
    for s in slots:
        free.put(s)

    def one(job):
        slot = free.get()
        try:
            return start(job, slot)
        finally:
            free.put(slot)

    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        return list(pool.map(one, jobs))


# -- executors ----------------------------------------------------------------------------------
class JobProcesses:
    """A local grid's running jobs. While `forwarding()`, SIGTERM and SIGINT to the grid go on to
    them (each ends its run KILLED) and no new job starts."""

    def __init__(self):
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.RLock()   # the handler may run in the thread that holds it
        self.stopped_by: int | None = None

    def run(self, cmd: list[str], **popen_args) -> int | None:
        """The job's exit code; None when the grid was stopped before it could start."""
        with self._lock:
            if self.stopped_by is not None:
                return None
            proc = subprocess.Popen(cmd, **popen_args)
            self._running.add(proc)
            if self.stopped_by is not None:   # the handler ran, in this thread, during Popen
                proc.send_signal(self.stopped_by)
        try:
            return proc.wait()
        finally:
            with self._lock:
                self._running.discard(proc)

    def stop(self, signum: int, frame=None) -> None:
        with self._lock:
            self.stopped_by = signum
            for proc in list(self._running):
                proc.send_signal(signum)

    @contextmanager
    def forwarding(self):
        previous = {}
        if threading.current_thread() is threading.main_thread():   # where Python runs handlers
            previous = {s: signal.signal(s, self.stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def run_local(cells: list[Cell], uri: str, experiment: str, allow_dirty: bool, commit: str, echo=print,
              gpus: int | None = None, folder: Path = DEFAULT_FOLDER, resume: dict | None = None, *,
              repo: Path) -> list[str]:
    """One process per configuration, from `repo` (the checkout whose `commit` the grid judged): in
    turn, or one per GPU slot at once; returns the names of those that failed. `resume`: cell -> the
    interrupted run it finishes."""
    resume = resume or {}
    cwd = workdir(commit, folder, allow_dirty, repo)
    gpus_here = visible_gpus()
    slots = gpu_slots(gpus_here, gpus_per_job(cells, gpus, len(gpus_here)), cells[0].as_dict().get("device", "auto"))
    numbered = list(enumerate(cells, 1))

    jobs = JobProcesses()

    def start(item, slot: str | None) -> tuple[str, int | None]:
        i, cell = item
        if jobs.stopped_by is not None:
            return cell.name, None
        where = f" on GPU {slot}" if slot is not None else ""
        echo(f"[{i}/{len(cells)}] {cell.name}{where}")
        env = {**os.environ, **job_env(uri, experiment), **({"CUDA_VISIBLE_DEVICES": slot} if slot else {})}
        cmd = run_command(cell, allow_dirty, resume.get(cell))
        code = jobs.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL)
        if code:
            echo(f"[{i}/{len(cells)}] {cell.name} failed (exit {code})")
        return cell.name, code

    with jobs.forwarding():
        done = run_pool(numbered, slots, start) if slots else [start(item, None) for item in numbered]
    failed = [name for name, code in done if code]
    if jobs.stopped_by is not None:
        raise GridStopped(jobs.stopped_by, failed, [name for name, code in done if code is None])
    return failed


def run_job(cmd: list[str], env: dict[str, str], cwd: str) -> int:
    """Body of one submitit job (top-level so submitit can pickle it)."""
    code = subprocess.run(cmd, cwd=cwd, env={**os.environ, **env}, stdin=subprocess.DEVNULL).returncode
    if code:
        raise JobFailed(f"the tracked run exited {code}")
    return code


def submit(cells: list[Cell], uri: str, experiment: str, allow_dirty: bool, opts: SubmititOptions,
           wait: bool, commit: str, echo=print, resume: dict | None = None, *,
           repo: Path) -> tuple[list[str], str | None]:
    """Submit the configurations; with `wait`, return the names of those whose job failed, and
    the one-line explanation when they failed on the sqlite store's concurrency limits."""
    import submitit
    folder = opts.folder if opts.folder.is_absolute() else Path.cwd() / opts.folder
    cwd = str(workdir(commit, folder, allow_dirty, repo))
    # the snapshot's package first, then whatever the submitting shell had on its path
    path = os.pathsep.join(filter(None, [cwd, os.environ.get("PYTHONPATH")]))
    env = {**job_env(uri, experiment), "PYTHONPATH": path}
    slots = None
    if opts.cluster == "local":
        gpus_here = visible_gpus()
        slots = gpu_slots(gpus_here, gpus_per_job(cells, opts.gpus, len(gpus_here)),
                          cells[0].as_dict().get("device", "auto"))
        if "OMP_NUM_THREADS" not in os.environ:
            # N concurrent jobs on one machine: torch's default threads per job would fight
            # (seen: a tiny model's warm-up 18 s instead of 0.5 s on 2 cores)
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // min(len(cells), len(slots or cells))))
    if opts.cluster == "slurm" and not opts.gpus and cells[0].as_dict().get("device", "auto") != "cpu":
        echo("warning: no --gpus: Slurm gives the jobs no GPU, so they run on the CPU; give --gpus 1 "
             "(or -P device=cpu to say the CPU is meant)")
    if opts.cluster == "slurm" and uri.startswith("sqlite"):
        echo(f"warning: {uri} is a sqlite file; jobs on several nodes writing one file over a shared "
             "filesystem can corrupt or lock it: serve it with `mlflow server` (docs/grid.md)")
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=opts.cluster)
    executor.update_parameters(**opts.parameters(f"reuse-grid-{cells[0].settings[0][1]}"))
    cmds = [run_command(c, allow_dirty, (resume or {}).get(c)) for c in cells]
    if slots:
        if wait is False:
            raise ConfigError("submitit-local on GPUs hands each GPU its next job as one ends, so it waits: "
                              "drop --no-wait")
        return _submit_to_slots(executor, cells, cmds, env, cwd, slots, folder, echo)
    jobs = executor.map_array(run_job, cmds, [env] * len(cells), [cwd] * len(cells))
    for cell, job in zip(cells, jobs):
        echo(f"submitted {cell.name}: job {job.job_id} ({opts.cluster}; logs in {folder / str(job.job_id)})")
    if not wait:
        echo("not waiting: follow with `reuse-exp grid status` (a dead job shows failed or missing)")
        return [], None
    return _results(cells, jobs, uri, echo)


def _submit_to_slots(executor, cells, cmds, env, cwd, slots, folder, echo):
    """submitit-local on GPUs: one job per GPU slot at a time, the next as one ends."""
    def start(i: int, slot: str):
        job = executor.submit(run_job, cmds[i], {**env, "CUDA_VISIBLE_DEVICES": slot}, cwd)
        echo(f"submitted {cells[i].name}: job {job.job_id} (local, GPU {slot}; logs in {folder / str(job.job_id)})")
        job.wait()   # its slot is free again once it ends; its outcome is read below, with the others'
        return job

    jobs = run_pool(list(range(len(cells))), slots, start)
    return _results(cells, jobs, env["MLFLOW_TRACKING_URI"], echo)


def _results(cells, jobs, uri, echo) -> tuple[list[str], str | None]:
    failed, hint = [], None
    for cell, job in zip(cells, jobs):
        try:
            job.result()
        except Exception as e:  # submitit re-raises the job's error, or says how the job died
            failed.append(cell.name)
            log = job.stderr() or ""
            hint = hint or store_error(log, uri)
            said = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
            echo(f"{cell.name}: job {job.job_id} failed: {last_error(log) or said}")
    return failed, hint


def last_error(log: str) -> str | None:
    """The run's own last word on why it failed: its one-line `Error:` or a traceback's last line."""
    for line in reversed(log.splitlines()):
        if line.startswith("Error: ") or re.match(r"[\w.]+(Error|Exception|Interrupt)\b.*", line):
            return line.strip()[:500]
    return None

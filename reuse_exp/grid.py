"""The study's grid (k x subset, per task), read from and run against MLflow.

A configuration is *done* only when a FINISHED, clean run of it exists at the
current commit with the same settings. A summary file, or a run at another commit,
does not count: that is how the old shell runner put three commits in one table.

    reuse-exp grid status --task tiny_gsm --limit 4
    reuse-exp grid run    --task tiny_gsm --limit 4 [--k 1,2,3] [--subset first,last] [--dry-run]
    reuse-exp grid run    --task gsm8k --executor slurm --partition gpu --gpus 1 --time 240

For a loglikelihood task the grid is one run: reuse acts between the denoising
steps of generation, and scoring is one forward per request, so every k and subset
give the same result (the run tags say so too).
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from .config import ConfigError
from . import tracking
from .tracking import CONFIG_KEY_PARAMS, same_param

K_VALUES = (1, 2, 3)
SUBSETS = ("first", "middle", "last")
GENERATE, LOGLIKELIHOOD = "generate_until", "loglikelihood"
LOGLIKELIHOOD_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice")
GRID_AXES = ("k", "subset", "layers")      # what varies between the cells of one grid
# Run options whose default the run logs as given; dtype and device ("auto") are logged
# resolved, so a grid pins them only when told (-P dtype=... -P device=...).
DEFAULTED = ("model", "mode", "scope", "limit", "threshold", "block_size", "small_block_size", "max_new_tokens",
             "use_block_cache", "num_fewshot", "apply_chat_template", "fewshot_as_multiturn", "batch_size", "seed")
STUCK_AFTER_S = 24 * 3600   # a RUNNING run older than this is a dead job, not a slow one
REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_TASKS = Path(__file__).resolve().parent / "tasks"
# The study's tasks, so `grid status` need not index lm-eval's 10k task files (25 s).
KNOWN_KINDS = {"gsm8k": GENERATE, "minerva_math": GENERATE, "ifeval": GENERATE, "mmlu": LOGLIKELIHOOD,
               "gpqa_main_zeroshot": LOGLIKELIHOOD, "gpqa_diamond_zeroshot": LOGLIKELIHOOD,
               "gpqa_main_generative_n_shot": GENERATE}


# -- runs as the store holds them -------------------------------------------------------------
@dataclass(frozen=True)
class RunRecord:
    """The parts of an MLflow run the grid reads."""
    run_id: str
    status: str                    # RUNNING, SCHEDULED, FINISHED, FAILED, KILLED
    start_ms: int
    params: dict
    tags: dict
    metrics: dict

    @classmethod
    def from_run(cls, run) -> "RunRecord":
        return cls(run_id=run.info.run_id, status=run.info.status, start_ms=run.info.start_time or 0,
                   params=dict(run.data.params), tags=dict(run.data.tags), metrics=dict(run.data.metrics))

    @property
    def commit(self) -> str | None:
        c = self.tags.get("git_commit", "").strip()
        return None if c in ("", "unknown") else c

    @property
    def dirty(self) -> bool:
        return self.tags.get("git_dirty", "true").strip().lower() != "false"

    @property
    def role(self) -> str:
        return self.tags.get("reuse_exp.role", "run")

    @property
    def cell(self) -> tuple[str, str]:
        return (self.params.get("k", "?"), self.params.get("subset", "?"))

    def shaping(self) -> dict[str, str]:
        """The result-shaping settings other than the grid's axes (tracking's config_key, less k/layers)."""
        values = {**self.params, "device_type": self.params.get("device", "").split(":")[0]}
        return {n: norm(values.get(n)) for n in CONFIG_KEY_PARAMS if n not in GRID_AXES}

    @property
    def grid_key(self) -> str:
        """One grid, one key: runs that differ only in k and subset share it."""
        return hashlib.sha256(repr(sorted(self.shaping().items())).encode()).hexdigest()[:12]

    def short(self) -> str:
        return f"{self.run_id[:8]}@{(self.commit or 'no-commit')[:7]}{'+dirty' if self.dirty else ''}"


def norm(value) -> str:
    """One spelling per value, as params are strings in MLflow: None/''/'none' alike, bools lower."""
    s = "" if value is None else str(value).strip()
    if s.lower() in ("", "none", "null"):
        return ""
    if s.lower() in ("true", "false"):
        return s.lower()
    return s


# -- the store ------------------------------------------------------------------------------
SQLITE_RACES = re.compile(r"database is locked|UNIQUE constraint failed|already exists|"
                          r"Can't locate revision|alembic|Detected out-of-date database schema", re.I)


def store_error(text: str, uri: str) -> str | None:
    """One line for the sqlite store's known failures under concurrent writers, else None."""
    if not uri.startswith("sqlite") or not text:
        return None
    m = SQLITE_RACES.search(text)
    if not m:
        return None
    return (f"the sqlite store {uri} failed under concurrent runs ({m.group(0)}): serve it instead, "
            "e.g. `mlflow server --backend-store-uri postgresql+psycopg2://USER@HOST/DB --host 127.0.0.1`, "
            "then export MLFLOW_TRACKING_URI=http://127.0.0.1:5000 (docs/grid.md), or use --executor local")


def tracking_uri() -> str:
    import mlflow
    return absolute_uri(mlflow.get_tracking_uri())


def absolute_uri(uri: str) -> str:
    """The tracking URI a job elsewhere must use: a relative sqlite path made absolute."""
    m = re.match(r"^sqlite:///(?!/)(.*)$", uri)
    if m:
        return f"sqlite:///{Path(m.group(1)).resolve()}"
    if "://" not in uri:  # a bare directory is a file store
        return str(Path(uri).resolve())
    return uri


def client():
    import mlflow
    return mlflow.MlflowClient(tracking_uri())


def experiment_name(name: str | None) -> str:
    return name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"


def experiment_id(cl, name: str | None, create: bool = False) -> str | None:
    """The experiment's id; created only when asked (before concurrent jobs race to make it)."""
    name = experiment_name(name)
    exp = cl.get_experiment_by_name(name)
    if exp is None and create:
        return cl.create_experiment(name)
    return exp.experiment_id if exp else None


def fetch_runs(cl, exp_id: str | None, task: str | None = None) -> list[RunRecord]:
    if exp_id is None:
        return []
    filt = f"params.task = '{task}'" if task else ""
    out, token = [], None
    while True:
        page = cl.search_runs([exp_id], filter_string=filt, max_results=1000, page_token=token)
        out.extend(RunRecord.from_run(r) for r in page)
        token = page.token
        if not token:
            return out


def git_state() -> tracking.Provenance:
    """The checkout the package runs from, as the tracked run sees it (its store excluded)."""
    prov = tracking.provenance()
    if prov.commit == "unknown":
        raise ConfigError(f"{REPO_ROOT} is not a git checkout with a commit: the grid needs HEAD "
                          "to know what is done (run from a clone of the repository)")
    return prov


def git_head() -> str:
    return git_state().commit


# -- task kind ------------------------------------------------------------------------------
def task_kind(task: str, runs: list[RunRecord] = ()) -> str:
    """generate_until or loglikelihood, as cheaply as it can be known."""
    for r in runs:                                    # what a run of this task recorded
        if r.tags.get("task_kind") in (GENERATE, LOGLIKELIHOOD):
            return r.tags["task_kind"]
    bundled = BUNDLED_TASKS / f"{task}.yaml"
    if bundled.is_file():
        m = re.search(r"^output_type:\s*(\S+)", bundled.read_text(), re.M)
        return LOGLIKELIHOOD if m and m.group(1) in LOGLIKELIHOOD_TYPES else GENERATE
    if task in KNOWN_KINDS:
        return KNOWN_KINDS[task]
    return _lm_eval_kind(task)


def _lm_eval_kind(task: str) -> str:
    from lm_eval.tasks import TaskManager
    index = TaskManager().task_index

    def leaf_types(name: str, depth: int = 0) -> set[str]:
        entry = index.get(name)
        if entry is None or depth > 5:
            return set()
        cfg = entry.cfg or {}
        if "output_type" in cfg:
            return {cfg["output_type"]}
        subs = cfg.get("task", [])
        subs = [subs] if isinstance(subs, str) else subs
        return set().union(*(leaf_types(s if isinstance(s, str) else s.get("task", ""), depth + 1)
                             for s in subs)) if subs else {GENERATE}

    if task not in index:
        raise ConfigError(f"unknown task {task!r}: give an lm-eval task name or a bundled one "
                          f"({', '.join(sorted(p.stem for p in BUNDLED_TASKS.glob('*.yaml')))})")
    types = leaf_types(task)
    return LOGLIKELIHOOD if types and types <= set(LOGLIKELIHOOD_TYPES) else GENERATE


# -- the grid's cells ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One configuration: the settings passed to the tracked run, as strings."""
    k: int
    subset: str
    settings: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        return f"k{self.k}_{self.subset}"

    def as_dict(self) -> dict[str, str]:
        return dict(self.settings)

    def matches(self, run: RunRecord) -> bool:
        """Same settings: every setting this cell passes equals what the run logged."""
        return all(same_param(norm(run.params.get(n)), norm(v)) for n, v in self.settings)


@dataclass(frozen=True)
class GridRequest:
    task: str
    ks: tuple[int, ...] = K_VALUES
    subsets: tuple[str, ...] = SUBSETS
    settings: tuple[tuple[str, str], ...] = ()   # every other setting, defaults included

    def cells(self, kind: str) -> list[Cell]:
        if kind == LOGLIKELIHOOD:   # k and subset cannot change a score: one run stands for all
            pairs = [(1, self.subsets[0] if len(self.subsets) == 1 else "first")]
        else:
            pairs = [(k, s) for k in self.ks for s in self.subsets]
        return [Cell(k=k, subset=s, settings=(("task", self.task), ("k", str(k)), ("subset", s),
                                              *self.settings)) for k, s in pairs]


LOGLIKELIHOOD_WHY = ("{task} is a loglikelihood task: reuse acts between denoising steps of generation, "
                     "and scoring is one forward per request, so every k and subset give the same "
                     "result; the grid is one run (k=1, subset={subset})")


# -- status ---------------------------------------------------------------------------------
DONE, STALE, FAILED, RUNNING, MISSING = "done", "stale", "failed", "running", "missing"


@dataclass
class CellState:
    cell: Cell
    state: str
    runs: list[RunRecord] = field(default_factory=list)   # the runs behind the state, newest first
    note: str = ""

    def label(self) -> str:
        if self.state == STALE:
            return f"stale@{self.runs[0].commit[:7] if self.runs[0].commit else '?'}"
        return self.state


def classify(cell: Cell, runs: list[RunRecord], head: str, now_ms: int,
             stuck_after_s: float = STUCK_AFTER_S) -> CellState:
    """done at HEAD > running > failed (or stuck) at HEAD > stale (done elsewhere) > missing."""
    mine = sorted((r for r in runs if cell.matches(r) and r.role == "run"),
                  key=lambda r: r.start_ms, reverse=True)
    at_head = [r for r in mine if r.commit == head and not r.dirty]
    done = [r for r in at_head if r.status == "FINISHED"]
    if done:
        return CellState(cell, DONE, done)
    live = [r for r in at_head if r.status in ("RUNNING", "SCHEDULED")]
    fresh = [r for r in live if now_ms - r.start_ms <= stuck_after_s * 1000]
    if fresh:
        return CellState(cell, RUNNING, fresh)
    bad = [r for r in at_head if r.status in ("FAILED", "KILLED")] + [r for r in live if r not in fresh]
    if bad:
        stuck = [r for r in bad if r.status in ("RUNNING", "SCHEDULED")]
        note = f"{len(stuck)} stuck RUNNING past {stuck_after_s:.0f}s (a dead job)" if stuck else ""
        return CellState(cell, FAILED, bad, note)
    elsewhere = [r for r in mine if r.status == "FINISHED"]
    if elsewhere:
        note = "dirty tree" if all(r.commit == head for r in elsewhere) else ""
        return CellState(cell, STALE, elsewhere, note)
    return CellState(cell, MISSING)


def grid_status(request: GridRequest, runs: list[RunRecord], head: str, kind: str,
                now_ms: int | None = None, stuck_after_s: float = STUCK_AFTER_S) -> list[CellState]:
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return [classify(c, runs, head, now_ms, stuck_after_s) for c in request.cells(kind)]


def format_status(request: GridRequest, states: list[CellState], head: str, kind: str,
                  experiment: str) -> str:
    extra = " ".join(f"{n}={v}" for n, v in request.settings if v != "")
    lines = [f"grid {request.task} [{extra}] in experiment {experiment!r} at HEAD {head[:7]}"]
    if kind == LOGLIKELIHOOD:
        lines.append(LOGLIKELIHOOD_WHY.format(task=request.task, subset=states[0].cell.subset))
    by_cell = {(s.cell.k, s.cell.subset): s for s in states}
    subsets = [s for s in request.subsets if any(c[1] == s for c in by_cell)]
    ks = [k for k in request.ks if any(c[0] == k for c in by_cell)] or sorted({c[0] for c in by_cell})
    width = max(14, *(len(s.label()) + 2 for s in states))
    lines.append(" " * 6 + "".join(f"{s:<{width}}" for s in subsets))
    for k in ks:
        row = "".join(f"{by_cell[(k, s)].label() if (k, s) in by_cell else '':<{width}}" for s in subsets)
        lines.append(f"k={k:<4}{row}".rstrip())
    counts = {st: sum(s.state == st for s in states) for st in (DONE, STALE, FAILED, RUNNING, MISSING)}
    lines.append(f"done at HEAD {counts[DONE]}/{len(states)}, stale {counts[STALE]}, failed {counts[FAILED]}, "
                 f"running {counts[RUNNING]}, missing {counts[MISSING]}")
    for s in states:
        if s.state != MISSING:
            runs = ", ".join(r.short() + ("" if s.state != FAILED else f" {r.status}") for r in s.runs[:3])
            lines.append(f"  {s.cell.name:<10} {s.state:<8} {runs}{'  (' + s.note + ')' if s.note else ''}")
    return "\n".join(lines)


def todo(states: list[CellState], force: bool) -> list[Cell]:
    """What `grid run` launches: everything not done (or running), or everything with --force."""
    if force:
        return [s.cell for s in states]
    return [s.cell for s in states if s.state not in (DONE, RUNNING)]


# -- launching one configuration ----------------------------------------------------------------
def run_command(cell: Cell, allow_dirty: bool = False) -> list[str]:
    """The tracked run of one configuration, as a command line (`reuse-exp run --NAME VALUE ...`)."""
    args = [sys.executable, "-m", "reuse_exp.cli", "run"]
    for name, value in cell.settings:
        if value != "":
            args += [f"--{name.replace('_', '-')}", value]
    if allow_dirty:
        args.append("--allow-dirty")
    return args


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


# -- command line ---------------------------------------------------------------------------
def parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: give integers like 1,2,3") from None
    if not ks or any(k < 1 for k in ks):
        raise click.BadParameter(f"{text!r}: give integers >= 1 like 1,2,3")
    return ks


def parse_subsets(text: str) -> tuple[str, ...]:
    subsets = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in subsets if s not in SUBSETS]
    if not subsets or bad:
        raise click.BadParameter(f"{text!r}: give a comma list of {', '.join(SUBSETS)}")
    return subsets


def parse_params(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for p in pairs:
        name, sep, value = p.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{p!r}: write NAME=VALUE, e.g. -P threshold=0.8")
        out[name.strip()] = value.strip()
    return out


def build_request(task: str, ks: str, subsets: str, mode: str | None, limit: int | None, model: str | None,
                  params: tuple[str, ...]) -> GridRequest:
    settings = {**run_defaults(), **parse_params(params)}
    for name, value in (("mode", mode), ("limit", limit), ("model", model)):
        if value is not None:
            settings[name] = str(value)
    for axis in ("task", "k", "subset"):
        if axis in settings:
            raise click.BadParameter(f"-P {axis}=... : use --{axis} instead")
    return GridRequest(task=task, ks=parse_ks(ks), subsets=parse_subsets(subsets),
                       settings=tuple(sorted((n, norm(v)) for n, v in settings.items())))


def run_defaults() -> dict[str, str]:
    """The tracked run's own defaults for the settings a grid does not name, so an omitted
    setting matches what a run logs (a grid without --limit is the whole task, not limit 4)."""
    from .cli import run
    return {p.name: norm(tracking.param_str(p.default)) for p in run.params if p.name in DEFAULTED}


def grid_options(f):
    for opt in reversed([
        click.option("--task", required=True, help="lm-eval task name (or a bundled one: tiny_gsm, tiny_mc)"),
        click.option("--k", "ks", default=",".join(map(str, K_VALUES)), show_default=True,
                     help="comma list of k values"),
        click.option("--subset", "subsets", default=",".join(SUBSETS), show_default=True,
                     help="comma list of layer subsets"),
        click.option("--mode", default=None, help="reuse mode (output or delta); default: the run's"),
        click.option("--limit", type=int, default=None, help="samples per task; default: all"),
        click.option("--model", default=None, help="model for every run; default: the run's"),
        click.option("-P", "--param", "params", multiple=True, metavar="NAME=VALUE",
                     help="any other setting of the tracked run, for every configuration"),
        click.option("--experiment", default=None, help="MLflow experiment (default: MLFLOW_EXPERIMENT_NAME "
                     "or Default)"),
        click.option("--stuck-after", type=float, default=STUCK_AFTER_S, show_default=True,
                     help="seconds after which a RUNNING run counts as a dead job"),
    ]):
        f = opt(f)
    return f


@click.group("grid")
def grid() -> None:
    """The k x subset grid of a task: what is done at this commit, and running the rest."""


def _load(task, ks, subsets, mode, limit, model, params, experiment, stuck_after, create=False):
    try:
        request = build_request(task, ks, subsets, mode, limit, model, params)
        head = git_head()
        cl = client()
        exp_id = experiment_id(cl, experiment, create=create)
        runs = fetch_runs(cl, exp_id, task)
        kind = task_kind(task, runs)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    return request, head, exp_id, runs, kind, grid_status(request, runs, head, kind, None, stuck_after)


@grid.command("status")
@grid_options
def status_cmd(task, ks, subsets, mode, limit, model, params, experiment, stuck_after) -> None:
    """Print the grid: done at HEAD, stale (done only at another commit), failed, running, missing."""
    request, head, _, _, kind, states = _load(task, ks, subsets, mode, limit, model, params, experiment,
                                               stuck_after)
    click.echo(format_status(request, states, head, kind, experiment_name(experiment)))


@grid.command("run")
@grid_options
@click.option("--dry-run", is_flag=True, help="print what would run, run nothing")
@click.option("--force", is_flag=True, help="run every configuration, done or not")
@click.option("--allow-dirty", is_flag=True, help="pass allow_dirty to the runs (they never count as done)")
@click.option("--executor", type=click.Choice(["local", "slurm", "submitit-local"]), default="local",
              show_default=True, help="local: one process per configuration, in turn; slurm: an array job "
              "through submitit; submitit-local: the same array as local processes, concurrently")
@click.option("--partition", default=None, help="slurm: partition")
@click.option("--gpus", type=int, default=None, help="slurm: GPUs per job")
@click.option("--time", "time_min", type=int, default=240, show_default=True, help="slurm: minutes per job")
@click.option("--account", default=None, help="slurm: account")
@click.option("--cpus", type=int, default=None, help="slurm: CPUs per job")
@click.option("--jobs-dir", type=click.Path(file_okay=False), default=None,
              help="submitit's folder for job scripts and logs (default ~/.cache/reuse_exp/submitit, "
              "outside the checkout so the tree stays clean)")
@click.option("--wait/--no-wait", default=None, help="wait for submitted jobs (default: wait for "
              "submitit-local, not for slurm)")
def run_cmd(task, ks, subsets, mode, limit, model, params, experiment, stuck_after, dry_run, force,
            allow_dirty, executor, partition, gpus, time_min, account, cpus, jobs_dir, wait) -> None:
    """Run the configurations with no FINISHED run at this commit with the same settings."""
    dirty = git_state().dirty_files
    if dirty and not allow_dirty and not dry_run:
        raise click.ClickException(f"uncommitted changes ({', '.join(dirty[:5])}{' ...' if len(dirty) > 5 else ''}):"
                                   " commit them, or pass --allow-dirty (such runs never count as done)")
    request, head, _, _, kind, states = _load(task, ks, subsets, mode, limit, model, params, experiment,
                                               stuck_after, create=not dry_run)
    if kind == LOGLIKELIHOOD:
        click.echo(LOGLIKELIHOOD_WHY.format(task=task, subset=states[0].cell.subset))
    cells = todo(states, force)
    skipped = [s for s in states if s.cell not in cells]
    for s in skipped:
        click.echo(f"skip {s.cell.name}: {s.state} ({', '.join(r.short() for r in s.runs[:1])})")
    if not cells:
        click.echo(f"nothing to run: all {len(states)} configuration(s) done at {head[:7]}")
        return
    uri, exp = tracking_uri(), experiment_name(experiment)
    if dry_run:
        for c in cells:
            click.echo(f"would run {c.name}: {' '.join(run_command(c, allow_dirty)[3:])}")
        return
    hint = None
    if executor == "local":
        failed = run_local(cells, uri, exp, allow_dirty, echo=click.echo)
    else:
        from .slurm import SubmititOptions, submit
        opts = SubmititOptions(cluster="local" if executor == "submitit-local" else "slurm",
                               partition=partition, gpus=gpus, time_min=time_min,
                               account=account, cpus=cpus, **({"folder": Path(jobs_dir)} if jobs_dir else {}))
        failed, hint = submit(cells, uri, exp, allow_dirty, opts,
                        wait=(executor == "submitit-local") if wait is None else wait, echo=click.echo)
    if hint:
        raise click.ClickException(hint)
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(cells)} configuration(s) failed: {', '.join(failed)}"
                                   " (they stay failed or missing in `reuse-exp grid status`)")

"""One tracked run: provenance, the dirty guard, lm-eval, and everything logged to MLflow.

The run attaches to the MLflow run that `mlflow run` opened (MLFLOW_RUN_ID) or, called
directly (`reuse-exp run`), opens one. It never leaves a run RUNNING: success ends it
FINISHED, an error FAILED, Ctrl-C or SIGTERM KILLED, each with what was logged so far.

Schema (issue 5's grid, compare and audit read these names; change them together)
---------------------------------------------------------------------------------
params (as the code used them, from the resolved objects, not from the command line)
    k, subset, layers (comma-separated layer indices), mode, scope, task,
    limit ("none" or the number), model (as given: a directory, a hub id, `bundled`,
    `random:<shape>`), model_revision (hub revision, `local`, `random`), model_hash,
    dtype, threshold, block_size, small_block_size, max_new_tokens, use_block_cache,
    num_fewshot, apply_chat_template, fewshot_as_multiturn ("true"/"false"), seed,
    batch_size, device (cpu, cuda, cuda:N), path (decoding path that ran: eager, ...),
    version_<lib> for python, reuse_exp, torch, cuda, transformers, lm_eval, mlflow.
    `mlflow run` logs its -P parameters itself, before this code runs; where a name is
    both, the code's value must equal it (else the run fails naming the parameter).
tags
    git_commit (sha, or "unknown" outside git), git_branch, git_dirty ("true"/"false"),
    git_dirty_files (newline-separated, capped), source_hash (the package's files),
    config_key (hash of the result-shaping params: CONFIG_KEY_PARAMS; the grid groups by
    config_key + git_commit), task_kind (generate_until | loglikelihood), reuse_note,
    accuracy_metric (which lm-eval metric `accuracy` is), allow_dirty, model_path,
    device_name, reuse_exp.role ("run"), error (the one line of a failed run),
    end_status (FAILED or KILLED as this code ended it: under `mlflow run`, MLflow 3.17's
    wrapper re-marks any run whose command exits non-zero FAILED, KILLED included, because
    its "already terminated?" check compares a status string with integer codes).
metrics
    accuracy (the task's primary metric: exact_match after strict-match, else acc);
    every lm-eval metric of the task as METRIC or METRIC/FILTER, with METRIC_stderr
    (subtasks of a group prefixed SUBTASK/); generated_tokens (up to and including the
    stop token, never pad), seconds (timed decoding or scoring, warm-up excluded),
    tokens_per_second (generated tokens/s; for loglikelihood scored tokens/s),
    tokens_per_forward (per sample forward), skipped_fraction (skipped layer evaluations;
    0 for loglikelihood), forwards_<kind> (per-sample forwards: prefill, full_block,
    small_block, finalize, masked), batch_forwards_<kind>, warmup_seconds, wall_seconds,
    scored_tokens (loglikelihood); on a GPU gpu_peak_memory_mb, gpu_util_mean,
    gpu_util_max, gpu_power_mean_w, gpu_energy_j (NVML, sampled from before the model
    loads to the end of the evaluation: the whole run's cost, not only the timed part),
    torch_peak_memory_mb (the allocator's peak); MLflow's system/* metrics. During the run, generated_tokens/seconds are logged per batch.
artifacts
    summary.json (the study's per-config summary), lm_eval_results.json,
    samples_<task>.jsonl (lm-eval's per-sample records), generations.jsonl (each prompt
    as fed, the raw and the returned text), reuse_trace.json, pip_freeze.txt,
    dirty.diff (allow_dirty runs of a dirty tree), error.txt (failed runs).
Values of secret-looking environment variables (HF_TOKEN, *_TOKEN, *_KEY, ...) are
replaced in everything logged.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from .config import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_KEY_PARAMS = ("k", "layers", "mode", "scope", "task", "limit", "model_hash", "model_revision", "dtype",
                     "threshold", "block_size", "small_block_size", "max_new_tokens", "use_block_cache",
                     "num_fewshot", "apply_chat_template", "fewshot_as_multiturn", "seed", "batch_size",
                     "device_type", "path")
VERSIONED = ("torch", "transformers", "lm_eval", "mlflow", "reuse_exp")
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL|AUTH", re.I)
MAX_DIRTY_FILES_TAG = 50


class RunFailed(Exception):
    """The run ended FAILED or KILLED; `line` is what the user reads, `code` the exit status."""

    def __init__(self, line: str, code: int):
        super().__init__(line)
        self.line, self.code = line, code


class Terminated(BaseException):
    """SIGTERM (scancel, `kill`, a cancelled mlflow run): end the run KILLED."""


class DirtyTree(ConfigError):
    pass


# -- provenance --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Provenance:
    commit: str                    # HEAD's sha, or "unknown" outside git
    branch: str
    dirty: bool
    dirty_files: tuple[str, ...]   # tracked changes and untracked-not-ignored files, the store excluded
    root: Path | None              # the checkout the package was imported from
    source_hash: str


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def source_hash(pkg: Path = PACKAGE_DIR) -> str:
    """Content hash of the package's files (code, tasks, bundled weights), bytecode excluded."""
    h = hashlib.sha256()
    for f in sorted(p for p in pkg.rglob("*") if p.is_file()):
        if "__pycache__" in f.parts or f.suffix == ".pyc":
            continue
        h.update(f.relative_to(pkg).as_posix().encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def store_paths(tracking_uri: str | None = None) -> list[Path]:
    """Files and folders of a local tracking store: changes there are not the code's."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    paths = [Path.cwd() / "mlruns"]
    if uri.startswith("sqlite:///"):
        db = Path(unquote(uri[len("sqlite:///"):]))
        db = db if db.is_absolute() else Path.cwd() / db
        paths += [db.with_name(db.name + suffix) for suffix in ("", "-journal", "-wal", "-shm")]
    elif uri.startswith("file:") or "://" not in uri:
        paths.append(Path(unquote(urlparse(uri).path) if uri.startswith("file:") else uri))
    return [p.resolve() for p in paths]


def _porcelain_paths(out: str) -> list[str]:
    """Paths of `git status --porcelain -z` (a rename's source entry skipped)."""
    entries, files, skip = out.split("\0"), [], False
    for e in entries:
        if skip:
            skip = False
            continue
        if len(e) > 3:
            files.append(e[3:])
            skip = e[0] in "RC"
    return files


def provenance(exclude: list[Path] | None = None, pkg: Path = PACKAGE_DIR) -> Provenance:
    """Where the running code came from. Outside git: commit `unknown`, dirty."""
    digest = source_hash(pkg)
    top = _git(["rev-parse", "--show-toplevel"], pkg)
    if top is None:
        return Provenance("unknown", "unknown", True, (f"{pkg} is not in a git checkout",), None, digest)
    root = Path(top.strip())
    commit = (_git(["rev-parse", "HEAD"], root) or "unknown").strip()
    branch = (_git(["rev-parse", "--abbrev-ref", "HEAD"], root) or "unknown").strip()
    status = _git(["status", "--porcelain=v1", "-z", "--untracked-files=all"], root)
    if status is None:
        return Provenance(commit, branch, True, ("git status failed",), root, digest)
    excluded = [p.resolve() for p in (exclude if exclude is not None else store_paths())]
    files = []
    for rel in _porcelain_paths(status):
        full = (root / rel).resolve()
        if not any(full == x or x in full.parents for x in excluded):
            files.append(rel)
    return Provenance(commit, branch, bool(files) or commit == "unknown", tuple(files), root, digest)


def check_clean(prov: Provenance, allow_dirty: bool) -> None:
    """The dirty guard: refuse a run whose code is not a commit, unless told otherwise."""
    if not prov.dirty or allow_dirty:
        return
    shown = ", ".join(prov.dirty_files[:10]) + (f" and {len(prov.dirty_files) - 10} more"
                                                 if len(prov.dirty_files) > 10 else "")
    if prov.commit == "unknown":
        raise DirtyTree(f"refusing to run: the code is not a git commit ({shown}); "
                        "run from a git checkout, or pass --allow-dirty (-P allow_dirty=true)")
    raise DirtyTree(f"refusing to run from a dirty tree: {shown}; commit (or ignore) them, "
                    "or pass --allow-dirty (-P allow_dirty=true) to run anyway, tagged dirty")


def dirty_diff(prov: Provenance, max_bytes: int = 5 << 20) -> str:
    """`git diff HEAD` plus every untracked file as an addition, for the dirty.diff artifact."""
    if prov.root is None:
        return "\n".join(prov.dirty_files) + "\n"
    parts = [_git(["diff", "HEAD"], prov.root) or ""]
    tracked = set((_git(["ls-files"], prov.root) or "").splitlines())
    for rel in prov.dirty_files:
        if rel not in tracked and (prov.root / rel).is_file():
            out = subprocess.run(["git", "diff", "--no-index", "--", "/dev/null", rel], cwd=prov.root,
                                 capture_output=True, text=True, errors="replace", timeout=60)
            parts.append(out.stdout)
    text = "".join(parts)
    return text if len(text) <= max_bytes else text[:max_bytes] + "\n[diff truncated]\n"


# -- values that must never be logged ------------------------------------------------------------
def secret_values(environ=None) -> list[str]:
    env = os.environ if environ is None else environ
    return sorted({v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= 6}, key=len, reverse=True)


def redact(text: str, secrets: list[str] | None = None) -> str:
    for s in secret_values() if secrets is None else secrets:
        text = text.replace(s, "[redacted]")
    return text


# -- settings, params, keys ----------------------------------------------------------------------
@dataclass(frozen=True)
class RunSettings:
    """What `reuse-exp run` was asked for (the MLproject parameters and a few more)."""
    task: str = "tiny_gsm"
    model: str = "bundled"
    k: int = 1
    subset: str = "first"
    mode: str = "output"
    scope: str = "block"
    limit: int | float | None = None
    threshold: float = 0.9
    block_size: int = 32
    small_block_size: int = 8
    max_new_tokens: int = 256
    use_block_cache: bool = True
    decode_path: str = "auto"
    num_fewshot: int = 0
    apply_chat_template: bool = True
    fewshot_as_multiturn: bool = True
    batch_size: int = 1
    seed: int = 1234
    dtype: str = "auto"
    device: str = "auto"
    revision: str | None = None
    tokenizer: str | None = None
    include_path: tuple[str, ...] = ()
    experiment: str | None = None
    allow_dirty: bool = False


def param_str(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return str(value)


def same_param(a: str, b: str) -> bool:
    """One value, two spellings? (`mlflow run` logs -P values as typed and shell-quoted.)"""
    a, b = a.strip().strip("'\""), b.strip().strip("'\"")
    if a.lower() == b.lower():
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def config_key(params: dict) -> str:
    """Hash of the settings that shape a result; commit, seed-free noise and paths excluded."""
    shaping = {k: param_str(params.get(k)) for k in CONFIG_KEY_PARAMS}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    out = {"version_python": platform.python_version()}
    for lib in VERSIONED:
        try:
            out[f"version_{lib}"] = md.version(lib.replace("_", "-"))
        except md.PackageNotFoundError:
            out[f"version_{lib}"] = "none"
    import torch
    out["version_cuda"] = torch.version.cuda or "none"
    return out


def pip_freeze() -> str:
    """Installed distributions as name==version, like `pip freeze` (without needing pip)."""
    dists = {(d.metadata["Name"] or "?").lower(): d.version for d in md.distributions()}
    return "".join(f"{n}=={v}\n" for n, v in sorted(dists.items()))


def metric_name(key: str) -> str:
    """lm-eval's `acc,none` / `exact_match,strict-match` as MLflow names: `acc`, `exact_match/strict-match`."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}/{filt}"


def lm_eval_metrics(results: dict, task: str) -> dict[str, float]:
    out = {}
    for name, res in results.get("results", {}).items():
        prefix = "" if name == task else f"{name}/"
        for key, value in res.items():
            if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[prefix + metric_name(key)] = float(value)
    return out


# -- the MLflow run ------------------------------------------------------------------------------
@dataclass
class Tracker:
    """The MLflow run of one configuration, attached or opened; logs by run id."""
    run_id: str
    secrets: list[str]
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="reuse_exp_")))
    last_progress: float = 0.0
    step: int = 0            # of the last metrics logged: per-batch progress, then the final values
    sampler: object = None   # the GpuSampler, once started
    lm: object = None        # the harness model, once loaded: its stats are logged even on failure

    @classmethod
    def start(cls, settings: RunSettings) -> "Tracker":
        import mlflow
        mlflow.set_system_metrics_sampling_interval(2)
        mlflow.set_system_metrics_samples_before_logging(1)
        run_id = os.environ.get("MLFLOW_RUN_ID") or None
        if run_id is None and settings.experiment:
            mlflow.set_experiment(settings.experiment)
        run = mlflow.start_run(run_id=run_id, log_system_metrics=True)
        return cls(run.info.run_id, secret_values())

    @property
    def client(self):
        import mlflow
        return mlflow.MlflowClient()

    def _clean(self, text: str) -> str:
        return redact(text, self.secrets)

    def tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag
        self.client.log_batch(self.run_id, tags=[RunTag(k, self._clean(param_str(v))[:5000])
                                                 for k, v in tags.items()])

    def params(self, params: dict) -> None:
        """Log params; one already logged (by `mlflow run`) must hold the same value."""
        from mlflow.entities import Param
        logged = self.client.get_run(self.run_id).data.params
        new = []
        for k, v in params.items():
            v = self._clean(param_str(v))[:6000]
            if k in logged:
                if not same_param(logged[k], v):
                    raise ConfigError(f"parameter {k}: mlflow run logged {logged[k]!r} but the code used {v!r}; "
                                      f"pass the concrete value (-P {k}={v})")
                continue
            new.append(Param(k, v))
        if new:
            self.client.log_batch(self.run_id, params=new)

    def metrics(self, metrics: dict, step: int | None = None) -> None:
        """Log metrics; without a step, after every progress step (MLflow shows the latest step)."""
        from mlflow.entities import Metric
        if step is None:
            self.step += 1
            step = self.step
        now = int(time.time() * 1000)
        clean = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and v == v]  # v == v: NaN is not logged
        if clean:
            self.client.log_batch(self.run_id, metrics=clean)

    def progress(self, stats) -> None:
        """Per-batch progress, at most every 2 s: a failed or killed run keeps what it had."""
        now = time.monotonic()
        if now - self.last_progress < 2.0:
            return
        self.last_progress = now
        m = stats.metrics()
        self.step = max(self.step, len(stats.decode) + stats.scoring.batch_forwards)
        self.metrics({k: m[k] for k in ("generated_tokens", "seconds", "scored_tokens") if k in m}, step=self.step)

    def artifact_text(self, name: str, text: str) -> None:
        path = self.workdir / name
        path.write_text(self._clean(text))
        self.client.log_artifact(self.run_id, str(path))

    def artifact_json(self, name: str, obj) -> None:
        self.artifact_text(name, json.dumps(obj, indent=2, default=str) + "\n")

    def artifact_jsonl(self, name: str, rows: list) -> None:
        self.artifact_text(name, "".join(json.dumps(r, default=str) + "\n" for r in rows))

    def end(self, status: str) -> None:
        """End the run (and MLflow's system-metrics thread with it)."""
        import mlflow
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status=status)
        else:
            self.client.set_terminated(self.run_id, status)


def end_outside_run(status: str, line: str) -> None:
    """A run `mlflow run` opened, ending before we attached (a refusal): say why, close it."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    import mlflow
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "error", redact(line))
    client.set_tag(run_id, "end_status", status)
    client.set_terminated(run_id, status)


# -- failure -------------------------------------------------------------------------------------
def classify(e: BaseException) -> tuple[str, int, str]:
    """(MLflow status, exit code, the one line) of what ended a run."""
    import torch
    if isinstance(e, KeyboardInterrupt):
        return "KILLED", 130, "interrupted (Ctrl-C): the run ended KILLED with what it had logged"
    if isinstance(e, Terminated):
        return "KILLED", 143, "terminated (SIGTERM): the run ended KILLED with what it had logged"
    if isinstance(e, torch.OutOfMemoryError):
        return "FAILED", 3, ("CUDA out of memory: lower --batch-size or --max-new-tokens, "
                             "or use a GPU with more memory")
    if isinstance(e, ValueError) and type(e).__module__.startswith("reuse_exp."):  # ConfigError & co
        return "FAILED", 2, str(e)
    text = f"{type(e).__name__}: {e}"
    if re.search(r"gated|401 Client Error|GatedRepo", text, re.I):
        return "FAILED", 2, ("the data set is gated on the hub: accept its terms there, then set HF_TOKEN "
                             "(or run `hf auth login`)")
    return "FAILED", 1, f"{text.splitlines()[0] if text else type(e).__name__} (traceback: the run's error.txt)"


def _raise_terminated(signum, frame):
    raise Terminated()


# -- the run -------------------------------------------------------------------------------------
def run(settings: RunSettings) -> str:
    """Evaluate one configuration, tracked. Returns the run id; raises RunFailed."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    tracker = None
    try:
        from . import harness  # lm-eval and torch: imported once the arguments are known good
        prov = provenance()
        check_clean(prov, settings.allow_dirty)       # before anything heavy, and before any model
        harness.check_gated(settings.task)
        task_manager = harness.task_manager_for(settings.task, settings.include_path)
        tracker = Tracker.start(settings)
        _log_start(tracker, settings, prov)
        _evaluate(tracker, settings, task_manager)
        tracker.end("FINISHED")
        return tracker.run_id
    except BaseException as e:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the ending short
        status, code, line = classify(e)
        line = redact(line)
        if tracker is None:
            end_outside_run(status, line)
            if code == 1:  # an unexpected error with no run to keep its traceback: show it
                traceback.print_exception(e, file=sys.stderr)
        else:
            _log_failure(tracker, status, line, e)
        raise RunFailed(line, code) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _log_start(tracker: Tracker, s: RunSettings, prov: Provenance) -> None:
    tracker.tags({"git_commit": prov.commit, "git_branch": prov.branch, "git_dirty": prov.dirty,
                  "git_dirty_files": "\n".join(prov.dirty_files[:MAX_DIRTY_FILES_TAG]),
                  "source_hash": prov.source_hash, "allow_dirty": s.allow_dirty, "reuse_exp.role": "run",
                  "mlflow.runName": f"k{s.k}_{s.subset if isinstance(s.subset, str) else 'custom'}_{s.task}"})
    tracker.params({"task": s.task, "limit": s.limit, "num_fewshot": s.num_fewshot,
                    "apply_chat_template": s.apply_chat_template, "fewshot_as_multiturn": s.fewshot_as_multiturn,
                    "seed": s.seed, **library_versions()})
    if prov.dirty and prov.root is not None:
        tracker.artifact_text("dirty.diff", dirty_diff(prov))


def _evaluate(tracker: Tracker, s: RunSettings, task_manager) -> None:
    import torch
    from . import harness
    from .gpu_stats import GpuSampler
    device = harness.resolve_device(s.device)
    dtype = s.dtype if s.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    if device.startswith("cuda"):
        tracker.sampler = GpuSampler(torch.device(device).index or 0).start()
    lm = harness.FastDLLMv2LM(
        pretrained=s.model, k=s.k, subset=s.subset, mode=s.mode, scope=s.scope, dtype=dtype, device=device,
        batch_size=s.batch_size, threshold=s.threshold, block_size=s.block_size,
        small_block_size=s.small_block_size, max_new_tokens=s.max_new_tokens,
        use_block_cache=s.use_block_cache, revision=s.revision, tokenizer=s.tokenizer, seed=s.seed,
        decode_path=s.decode_path)
    tracker.lm = lm
    lm.on_batch = tracker.progress
    params = lm.params()
    tracker.params(params)
    all_params = {**params, "task": s.task, "limit": s.limit, "num_fewshot": s.num_fewshot,
                  "apply_chat_template": s.apply_chat_template, "fewshot_as_multiturn": s.fewshot_as_multiturn,
                  "seed": s.seed, "device_type": torch.device(device).type}
    tracker.tags({"config_key": config_key(all_params),
                  "model_path": lm.loaded.path or "", "device_name": _device_name(device)})

    t0 = time.perf_counter()
    results = harness.evaluate(lm, s.task, task_manager, limit=s.limit, num_fewshot=s.num_fewshot,
                               apply_chat_template=s.apply_chat_template,
                               fewshot_as_multiturn=s.fewshot_as_multiturn, seed=s.seed)
    wall = time.perf_counter() - t0
    samples = results.pop("samples", {})
    task_results = results["results"].get(s.task, {})
    primary = harness.primary_metric(task_results)
    kind = lm.stats.task_kind
    metrics = {**lm_eval_metrics(results, s.task), **lm.stats.metrics(), "wall_seconds": wall}
    if primary is not None:
        metrics["accuracy"] = primary[1]
    metrics |= _gpu_metrics(tracker, device)
    tracker.metrics(metrics)
    tracker.tags({"task_kind": kind, "accuracy_metric": primary[0] if primary else "none",
                  "reuse_note": harness.LOGLIKELIHOOD_NOTE if kind == "loglikelihood"
                  else f"reuse k={lm.policy.k} on layers {list(lm.policy.layers)} of small-block forwards"})
    _log_artifacts(tracker, s, results, samples, lm, metrics, all_params, primary, kind)


def _device_name(device: str) -> str:
    import torch
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def _gpu_metrics(tracker: Tracker, device: str) -> dict:
    out = tracker.sampler.stop() if tracker.sampler is not None else {}
    if device.startswith("cuda"):
        import torch
        out["torch_peak_memory_mb"] = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    return out


def _log_artifacts(tracker, s, results, samples, lm, metrics, params, primary, kind) -> None:
    from lm_eval.utils import handle_non_serializable
    tags = tracker.client.get_run(tracker.run_id).data.tags
    tracker.artifact_text("lm_eval_results.json",
                          json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    for task, rows in samples.items():
        tracker.artifact_text(f"samples_{task}.jsonl", "".join(
            json.dumps(r, default=handle_non_serializable) + "\n" for r in rows))
    tracker.artifact_jsonl("generations.jsonl", lm.stats.generations)
    tracker.artifact_json("reuse_trace.json", {"policy": asdict(lm.policy), **lm.stats.trace()})
    tracker.artifact_text("pip_freeze.txt", pip_freeze())
    tracker.artifact_json("summary.json", {
        "config": f"k{lm.policy.k}_{lm.policy.subset}", "task": s.task, "task_kind": kind,
        "k": lm.policy.k, "subset": lm.policy.subset, "layers": list(lm.policy.layers), "mode": lm.policy.mode,
        "accuracy": metrics.get("accuracy"), "accuracy_metric": primary[0] if primary else None,
        "tokens_per_second": metrics.get("tokens_per_second"), "generated_tokens": metrics.get("generated_tokens"),
        "total_time_seconds": metrics.get("seconds"), "wall_seconds": metrics.get("wall_seconds"),
        "skipped_fraction": metrics.get("skipped_fraction"), "tokens_per_forward": metrics.get("tokens_per_forward"),
        "commit": tags.get("git_commit"), "dirty": tags.get("git_dirty") == "true",
        "config_key": tags.get("config_key"), "mlflow_run_id": tracker.run_id,
        "params": {k: param_str(v) for k, v in params.items()}, "metrics": metrics})


def _log_failure(tracker: Tracker, status: str, line: str, e: BaseException) -> None:
    """Whatever the run had, then its end: a second Ctrl-C or a broken store still ends it."""
    try:
        tracker.tags({"error": line, "end_status": status})
        lm = tracker.lm
        device = str(lm.device) if lm is not None else "cpu"
        partial = lm.stats.metrics() if lm is not None else {}
        tracker.metrics({**partial, **_gpu_metrics(tracker, device)})
        if status == "FAILED":
            tracker.artifact_text("error.txt", "".join(traceback.format_exception(e)))
    finally:
        tracker.end(status)

"""What a tracked run logs to MLflow, by name, and the helpers that spell it.

Schema (the grid, compare and audit read these names: change them together)
---------------------------------------------------------------------------------
params
    every setting of reuse_exp/settings.py as given, in its one spelling (`none`,
    `true`/`false`, layer lists as 8,9,10): k, subset, mode, scope, task, limit, model,
    threshold, scoring, ..., dtype and device (`auto` included); then what they resolved to:
    layers (comma-separated layer indices), resolved_dtype, resolved_device (cpu, cuda:N),
    path (decoding path that ran: eager, static, cuda-graph, or +compile where layers were compiled), model_revision (hub
    revision, `local`, `random`), model_hash, world_size (data-parallel ranks) and
    rank_devices (each rank's device, in rank order: cuda:0,cuda:1); version_<lib> for
    python, reuse_exp, torch, cuda, transformers, lm_eval, mlflow.
    `mlflow run` logs its -P parameters itself, before this code runs; where a name is
    both, the code's value must equal it (else the run fails naming the parameter).
tags
    git_commit (sha, or "unknown" outside git), git_branch, git_dirty ("true"/"false"),
    git_dirty_files (newline-separated, capped), source_hash (the package's files),
    config_key (hash of the params that carry the settings shaping the run: those
    shaping_settings (below) names, e.g. at k=1 no layers; runs of one computation share
    it), task_kind (generate_until |
    loglikelihood), reuse_note, accuracy_metric (which lm-eval metric `accuracy` is), allow_dirty, model_path,
    device_name (the GPU or CPU model), rank_devices (`0: cuda:0 (NVIDIA H200); ...`),
    cuda_visible_devices (GPU runs only),
    request_cache (the folder of its per-request cache), resumed_from / resumed_by (a
    resumed run and the run it resumed), throughput_scope (a resumed run: what its
    throughput covers), reuse_exp.role ("run"), error (the one line of a failed run),
    end_status (FAILED or KILLED as this code ended it), reuse_exp.heartbeat (UTC time,
    rewritten every 30 s while the process lives: a RUNNING run with an old one is dead),
    reuse_exp.refused ("true": refused before evaluating, e.g. a bad value or a dirty tree;
    the audit counts these apart), reuse_exp.end_reason (why `reuse-exp runs end` ended it),
    reuse_exp.any_environment ("true": made by `grid run --any-environment`), gpu_metrics (a CPU
    run: why it has no gpu_* metrics), timing_quality (`clean`, or `contended: <reasons>`: how
    fair the machine was to the timed part, tracking/timing.py; compare, the frontier and
    `audit --speed` read it).
    The environment (tracking/environment.py), env.<name>, in two parts:
      shapes a result (the grid, `compare` and the audit compare these; env_key hashes them):
        env.torch, env.cuda, env.cudnn, env.transformers, env.lm_eval (the libraries that
        compute and build the prompts), env.device (the GPU model of the ranks, or the CPU
        model on CPU), env.dtype, env.path (the decoding path taken), env.world_size;
      does not (it describes the machine and the speed): env.mlflow, env.reuse_exp (the commit
        says the code), env.python, env.cpu, env.cpu_cores, env.torch_threads and
        env.omp_num_threads (measured: 1 and 2 threads decode the bundled model's tokens
        identically; they change only the speed), env.hostname, and on GPUs only
        env.gpu_count and env.gpu_driver; peak RSS is a metric and in environment.json.
    The data (tracking/data.py), per task: data.<task>.version (lm-eval's), .config_hash (the
    task's configuration as it ran), .digest (the evaluated documents: ids, text, prompt,
    target); data_digest over every task (compared like the environment's shaping part).
metrics
    accuracy (the task's primary metric: exact_match after strict-match, else acc),
    accuracy_stderr (lm-eval's stderr of it), n_samples (documents scored);
    every lm-eval metric of the task as METRIC or METRIC/FILTER, with METRIC_stderr
    (subtasks of a group prefixed SUBTASK/); generated_tokens (up to and including the
    stop token, never pad), seconds (timed decoding or scoring, warm-up excluded),
    tokens_per_second (generated tokens/s; for loglikelihood scored tokens/s),
    tokens_per_second_median / _p25 / _p75 (over the timed batches' own tokens/s),
    timed_batches, tokens_per_forward (per sample forward), skipped_fraction (skipped
    layer evaluations; 0 for loglikelihood), forwards_<kind> (per-sample forwards: prefill, full_block,
    small_block, finalize, masked, and replay: a step that ran no forward), batch_forwards_<kind>,
    reuse_steps (per-sample steps that stood in cached layers or replayed),
    unchanged_reuse_steps and unchanged_reuse_fraction (layer-reuse steps whose logits were
    bit for bit those of the sample's last computed step), replayed_fraction (denoising
    steps fully replayed), adaptive_refreshes and mean_refresh_drift (adaptive policy: the
    drift that made a group recompute), warmup_seconds, wall_seconds,
    scored_tokens, loglikelihood_ties (documents whose best choices tie; loglikelihood);
    on a GPU gpu_peak_memory_mb, gpu_util_mean, gpu_util_max, gpu_power_mean_w,
    gpu_energy_j (NVML, sampled from before the model loads to the end of the evaluation: the whole run's cost, not only the timed part),
    torch_peak_memory_mb (the allocator's peak), gpu_sm_clock_mean_mhz / _min_mhz / _limit_mhz,
    gpu_throttle_reasons (NVML's reason bits seen, or-ed) and gpu_throttled_fraction (samples
    slowed by heat or a hardware brake); MLflow's system/* metrics.
    How far tokens/s can be trusted (tracking/timing.py, over the evaluation): timing_quality
    (1 clean, 0 contended), tokens_per_second_noise (relative), probe_seconds_before / _after,
    probe_spread, probe_drift (the fixed probe, tracking/probe.py), timing_cpu_wait_fraction
    (its threads' wait for a CPU), timing_cpu_fraction, timing_host_busy_cores,
    timing_other_busy_cores, timing_steal_fraction, timing_host_load_1m_max, timing_cores,
    timing_torch_threads, timing_process_threads_max, timing_involuntary_switches,
    timing_cpu_freq_mhz_mean / _min / timing_cpu_freq_max_mhz, timing_wall_seconds; several
    ranks: each rank's as rankR/<name>, the run's the largest of them.
    Several ranks: seconds is the slowest rank's, tokens_per_second all ranks' tokens over
    it, the median and quartiles all ranks' (a batch's rate times the ranks decoding at once;
    compare reads timings.json so too), beside each rank's rankR/generated_tokens,
    rankR/seconds, rankR/tokens_per_second, rankR/tokens_per_second_median (_p25, _p75);
    the gpu_* metrics cover every GPU (peaks the highest, energy and power summed,
    utilisation averaged), each rank's as rankR/gpu_*. peak_rss_mb (this process's peak
    resident memory: rank 0's with several ranks). A resumed run: cached_requests (the
    requests its request cache answered, with their statistics: every count and fraction covers
    all requests; the figures its throughput_scope tag names count only the rest). During the run, generated_tokens/seconds are logged per batch.
artifacts
    summary.json (the study's per-config summary), lm_eval_results.json,
    samples_<task>.jsonl (lm-eval's per-sample records), per_sample.jsonl (per document:
    task, doc_id, score, correct, output hash), timings.json (per timed batch: tokens,
    seconds), generations.jsonl (each prompt as fed, the raw and the returned text),
    reuse_trace.json, pip_freeze.txt, environment.json (the env.* values in their two parts,
    peak RSS, each task's data fingerprint), dirty.diff (allow_dirty runs of a dirty tree),
    error.txt (failed runs), timing_quality.json (every rank's timing record: its samples, the
    busiest other processes, the probe's repetitions).
Values of secret-looking environment variables (HF_TOKEN, *_TOKEN, *_KEY, ...) are
replaced in everything logged.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import platform

from ..errors import SettingError
from ..settings import DEFAULTS, REUSE, SPECS, policy_class, spec, to_text as param_str

HEARTBEAT_TAG = "reuse_exp.heartbeat"
REFUSED_TAG = "reuse_exp.refused"
END_REASON_TAG = "reuse_exp.end_reason"
ANY_ENVIRONMENT_TAG = "reuse_exp.any_environment"
GPU_METRICS_TAG = "gpu_metrics"   # why a run has no gpu_* metrics
NO_GPU_NOTE = "none: this run computed on the CPU; the gpu_* metrics are NVML's readings of a GPU"
VERSIONED = ("torch", "transformers", "lm_eval", "mlflow", "reuse_exp")


def unquoted(value: str) -> str:
    """A param as its value: `mlflow run` logs -P values as typed and shell-quoted (`-P limit=` as '')."""
    return value.strip().strip("'\"").strip()


def same_param(a: str, b: str) -> bool:
    """One value, two spellings? (`2.0` and `2`, `'true'` and `true`; empty and `none` alike.)"""
    a, b = ("" if v.lower() == "none" else v for v in (unquoted(a), unquoted(b)))
    if a.lower() == b.lower():
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False


# -- which settings shape a run: the one place; the run's key, the grid's cells, compare, resume and
# the audit ask here ---------------------------------------------------------------------------------
def shaping_settings(values) -> tuple[str, ...]:
    """The settings that shape a run of `values` (typed, by name; a missing one at its default):
    every setting declared `key`, less the REUSE settings its policy does not compute at these
    values (k=1 computes no subset; the fixed policy reads no drift). Runs that agree on these
    computed the same thing. ConfigError where the policy cannot be found here."""
    cls = policy_class(values.get("policy") or DEFAULTS.policy)
    computed = set(cls.computes(**{n: values[n] if n in values else getattr(DEFAULTS, n) for n in cls.reads}))
    return tuple(s.name for s in SPECS if s.key and (s.grid != REUSE or s.name in computed))


def logged_values(params) -> dict[str, object]:
    """The typed values of the settings among a run's params (MLflow keeps text); a value that no
    longer parses is kept as its text."""
    out = {}
    for s in SPECS:
        if s.name in params:
            try:
                out[s.name] = s.parse(params[s.name])
            except SettingError:
                out[s.name] = params[s.name]
    return out


def config_key(params: dict) -> str:
    """Hash of what shapes a result: the params carrying each setting shaping_settings names
    (resolved ones where declared: layers, model_hash, resolved_dtype, ...); commit and paths excluded."""
    shaping = {p: param_str(params.get(p)) for n in shaping_settings(logged_values(params))
               for p in spec(n).key_params}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def config_name(s) -> str:
    """The configuration's short name, from its policy (a run's name is it and the task)."""
    cls = policy_class(s.policy)
    return cls.run_name(**{n: getattr(s, n) for n in cls.reads})


DIRTY_MARK = "*dirty"


def run_name(s, dirty: bool) -> str:
    """A run's name: its configuration and task (`k2_middle_tiny_gsm`), marked when it ran from
    uncommitted changes (`k2_middle_tiny_gsm*dirty`), so the two never share a name."""
    return f"{config_name(s)}_{s.task}" + (DIRTY_MARK if dirty else "")


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

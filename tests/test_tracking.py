"""Provenance, the dirty guard, redaction, and the end-to-end `mlflow run` into a temporary store."""
from __future__ import annotations

import json
import re
import shutil
import sys
import time
import types
from pathlib import Path

import pytest
from conftest import REPO, SECRET, bundled_or, git, mlflow_run, runs_of

from reuse_exp.engine.loading import BUNDLED_MODEL_DIR
from reuse_exp.errors import ConfigError
from reuse_exp.settings import RunSettings
from reuse_exp.tracking.gpu_stats import GpuSampler
from reuse_exp.tracking import provenance as provmod
from reuse_exp.tracking import lifecycle as tracked
from reuse_exp.tracking import schema
from reuse_exp.tracking.heartbeat import Heartbeat, interval_s, parse_stamp
from reuse_exp.tracking.schema import HEARTBEAT_TAG, REFUSED_TAG
from reuse_exp.tracking.probe import BURSTS
from reuse_exp.tracking.timing import NOISE_FLOOR


# -- provenance and the guard ------------------------------------------------------------------
@pytest.fixture
def repo(tmp_path) -> Path:
    """A small git repository with a package directory, a .gitignore and one commit."""
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("x = 1\n")
    (root / ".gitignore").write_text("ignored.txt\n")
    git(["init", "-q", "-b", "main"], root)
    git(["add", "-A"], root)
    git(["-c", "user.name=t", "-c", "user.email=t@e", "commit", "-q", "-m", "one"], root)
    return root


def test_clean_checkout(repo):
    prov = provmod.provenance(exclude=[], pkg=repo / "pkg")
    assert prov.commit == git(["rev-parse", "HEAD"], repo).strip()
    assert prov.branch == "main" and not prov.dirty and prov.dirty_files == ()
    provmod.check_clean(prov, allow_dirty=False)


def test_dirty_files_are_tracked_changes_and_untracked_but_not_ignored_or_the_store(repo):
    (repo / "pkg" / "a.py").write_text("x = 2\n")
    (repo / "pkg" / "new.py").write_text("y = 1\n")
    (repo / "ignored.txt").write_text("noise\n")
    (repo / "store").mkdir()
    (repo / "store" / "mlflow.db").write_text("not code\n")
    prov = provmod.provenance(exclude=[repo / "store"], pkg=repo / "pkg")
    assert prov.dirty
    assert sorted(prov.dirty_files) == ["pkg/a.py", "pkg/new.py"]
    with pytest.raises(provmod.DirtyTree, match=r"pkg/a\.py, pkg/new\.py"):
        provmod.check_clean(prov, allow_dirty=False)
    provmod.check_clean(prov, allow_dirty=True)
    diff = provmod.dirty_diff(prov)
    assert "-x = 1" in diff and "+x = 2" in diff and "+y = 1" in diff


def test_store_paths_of_a_sqlite_uri_are_excluded(repo, monkeypatch):
    monkeypatch.chdir(repo)
    (repo / "mlflow.db").write_text("db\n")
    (repo / "mlflow.db-journal").write_text("db\n")
    prov = provmod.provenance(exclude=provmod.store_paths("sqlite:///mlflow.db"), pkg=repo / "pkg")
    assert not prov.dirty, prov.dirty_files


def test_outside_git_the_commit_is_unknown_and_dirty(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    prov = provmod.provenance(exclude=[], pkg=tmp_path / "pkg")
    assert prov.commit == "unknown" and prov.dirty
    with pytest.raises(provmod.DirtyTree, match="not a git commit"):
        provmod.check_clean(prov, allow_dirty=False)


def test_source_hash_follows_the_files(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    h1 = provmod.source_hash(tmp_path)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "a.pyc").write_bytes(b"\0")
    assert provmod.source_hash(tmp_path) == h1
    (tmp_path / "a.py").write_text("x = 2\n")
    assert provmod.source_hash(tmp_path) != h1


# -- values ------------------------------------------------------------------------------------
def test_secrets_are_redacted():
    env = {"HF_TOKEN": "hf_abcdef123456", "AWS_SECRET_ACCESS_KEY": "s3cr3tvalue", "HOME": "/root", "X": "hf_abcdef"}
    secrets = provmod.secret_values(env)
    assert "/root" not in secrets and "hf_abcdef" not in secrets
    assert provmod.redact("token hf_abcdef123456 and s3cr3tvalue", secrets) == "token [redacted] and [redacted]"


def test_config_key_follows_result_shaping_settings_only():
    from reuse_exp.settings import SPECS
    base = {p: "1" for s in SPECS for p in s.key_params} | {"policy": "fixed", "mode": "output", "scope": "block"}
    assert schema.config_key(base) == schema.config_key(dict(base, model_path="/elsewhere", git_commit="abc"))
    assert schema.config_key(base) != schema.config_key(dict(base, k="2"))
    assert schema.config_key(base) == schema.config_key(dict(base, layers="8,9,10"))   # k=1 computes every layer
    at_k2 = dict(base, k="2")
    assert schema.config_key(at_k2) != schema.config_key(dict(at_k2, layers="8,9,10"))


def test_param_spellings():
    assert schema.same_param("0.90", "0.9") and schema.same_param("'true'", "true")
    assert schema.same_param("2", "2") and not schema.same_param("2", "3")
    # `mlflow run -P limit=` logs the limit as '' (shell-quoted empty): the whole task, as `none`
    assert schema.same_param("''", "none") and not schema.same_param("''", "4")
    from reuse_exp.study.store import norm
    assert norm("''") == norm("none") == norm(None) == "" and norm("'4'") == "4"
    assert schema.param_str(True) == "true" and schema.param_str(None) == "none"


def test_lm_eval_metric_names():
    results = {"results": {"t": {"alias": "t", "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.1,
                                 "acc,none": 1.0},
                           "t_sub": {"acc,none": 0.25}}}
    assert schema.lm_eval_metrics(results, "t") == {
        "exact_match/strict-match": 0.5, "exact_match_stderr/strict-match": 0.1, "acc": 1.0, "t_sub/acc": 0.25}


def test_gpu_sampler_without_a_gpu_returns_nothing():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert GpuSampler().start().stop() == {}


class FakeNVML(types.ModuleType):
    """`pynvml` with one GPU whose `failing` call raises (NVMLError_NotSupported, as on MIG)."""

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    def __init__(self, failing: str | None, error: type[Exception] | None = None):
        super().__init__("pynvml")
        self.failing, self.error = failing, error or self.NVMLError_NotSupported
        self.calls: dict[str, int] = {}
        self.energy_mj = 1000

    def _call(self, name: str, value):
        self.calls[name] = self.calls.get(name, 0) + 1
        if name == self.failing:
            raise self.error("Not Supported")
        return value

    def nvmlInit(self):
        return self._call("nvmlInit", None)

    def nvmlShutdown(self):
        return self._call("nvmlShutdown", None)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self._call("nvmlDeviceGetHandleByIndex", f"handle{i}")

    def nvmlDeviceGetName(self, h):
        return self._call("nvmlDeviceGetName", "Fake GPU")

    def nvmlDeviceGetMemoryInfo(self, h):
        return self._call("nvmlDeviceGetMemoryInfo", types.SimpleNamespace(used=3 * 2**20))

    def nvmlDeviceGetUtilizationRates(self, h):
        return self._call("nvmlDeviceGetUtilizationRates", types.SimpleNamespace(gpu=50))

    def nvmlDeviceGetPowerUsage(self, h):
        return self._call("nvmlDeviceGetPowerUsage", 100_000)

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        self.energy_mj += 500
        return self._call("nvmlDeviceGetTotalEnergyConsumption", self.energy_mj)

    def nvmlDeviceGetClockInfo(self, h, clock):
        return self._call("nvmlDeviceGetClockInfo", 1500)

    def nvmlDeviceGetMaxClockInfo(self, h, clock):
        return self._call("nvmlDeviceGetMaxClockInfo", 1980)

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return self._call("nvmlDeviceGetCurrentClocksEventReasons", self.reasons)

    reasons = 0x1   # idle: not a slowing reason


CLOCK_METRICS = {"gpu_sm_clock_mean_mhz", "gpu_sm_clock_min_mhz"}
THROTTLE_METRICS = {"gpu_throttle_reasons", "gpu_throttled_fraction"}
ALL_GPU_METRICS = {"gpu_peak_memory_mb", "gpu_util_mean", "gpu_util_max", "gpu_power_mean_w", "gpu_energy_j",
                   "gpu_sm_clock_limit_mhz", *CLOCK_METRICS, *THROTTLE_METRICS}
LOST_WITH = {  # what each failing call costs: nothing else
    None: set(), "nvmlDeviceGetName": set(), "nvmlShutdown": set(),
    "nvmlInit": ALL_GPU_METRICS, "nvmlDeviceGetHandleByIndex": ALL_GPU_METRICS,
    "nvmlDeviceGetMemoryInfo": {"gpu_peak_memory_mb"},
    "nvmlDeviceGetUtilizationRates": {"gpu_util_mean", "gpu_util_max"},
    "nvmlDeviceGetPowerUsage": {"gpu_power_mean_w"},     # energy still comes from the counter
    "nvmlDeviceGetTotalEnergyConsumption": set(),         # energy integrated from power instead
    "nvmlDeviceGetClockInfo": CLOCK_METRICS,
    "nvmlDeviceGetMaxClockInfo": {"gpu_sm_clock_limit_mhz"},
    "nvmlDeviceGetCurrentClocksEventReasons": THROTTLE_METRICS,
}


@pytest.mark.parametrize("error", ["NotSupported", "RuntimeError"])
@pytest.mark.parametrize("failing", list(LOST_WITH))
def test_gpu_sampler_drops_only_the_field_nvml_cannot_read(monkeypatch, caplog, failing, error):
    fake = FakeNVML(failing, None if error == "NotSupported" else RuntimeError)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    sampler = GpuSampler(0, interval=0.005).start()
    time.sleep(0.2)
    metrics = sampler.stop()
    assert set(metrics) == ALL_GPU_METRICS - LOST_WITH[failing]
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == (failing is not None), [r.getMessage() for r in warnings]
    if failing in ("nvmlDeviceGetMemoryInfo", "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetPowerUsage",
                   "nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetClockInfo",
                   "nvmlDeviceGetCurrentClocksEventReasons"):
        assert fake.calls[failing] == 1, "a field that failed is not asked again"
    if metrics:  # the other fields kept coming, sample after sample
        assert fake.calls["nvmlDeviceGetMemoryInfo" if failing != "nvmlDeviceGetMemoryInfo"
                          else "nvmlDeviceGetPowerUsage"] > 3
        assert metrics.get("gpu_peak_memory_mb", 3) == 3 and metrics.get("gpu_util_max", 50) == 50
        assert metrics["gpu_energy_j"] > 0


# -- end to end: `mlflow run` into a temporary store ------------------------------------------
SCHEMA_PARAMS = ("k", "subset", "layers", "mode", "scope", "task", "limit", "model", "model_revision", "model_hash",
                 "dtype", "resolved_dtype", "resolved_device", "threshold", "block_size", "small_block_size", "max_new_tokens", "num_fewshot",
                 "apply_chat_template", "fewshot_as_multiturn", "seed", "batch_size", "device", "path",
                 "version_torch", "version_lm_eval", "version_mlflow", "version_transformers")
SCHEMA_TAGS = ("git_commit", "git_branch", "git_dirty", "source_hash", "config_key", "task_kind", "reuse_note",
               "timing_quality")
SCHEMA_METRICS = ("accuracy", "accuracy_stderr", "n_samples", "tokens_per_second", "tokens_per_second_median",
                  "tokens_per_second_p25", "tokens_per_second_p75", "timed_batches", "generated_tokens", "seconds",
                  "skipped_fraction", "tokens_per_forward", "forwards_full_block", "forwards_small_block",
                  "forwards_finalize", "timing_quality", "tokens_per_second_noise", "timing_cpu_fraction",
                  "timing_other_busy_cores", "timing_torch_threads", "probe_seconds_before", "probe_seconds_after")
ARTIFACTS = ("summary.json", "lm_eval_results.json", "generations.jsonl", "per_sample.jsonl", "timings.json",
             "reuse_trace.json", "pip_freeze.txt", "timing_quality.json")


@pytest.mark.slow
def test_mlflow_run_end_to_end(clean_repo, store, tiny_ckpt, tasks_dir):
    settings = bundled_or(tiny_ckpt, tasks_dir)
    out = mlflow_run(clean_repo, store, {"k": 2, "subset": "middle", "limit": 4, "max_new_tokens": 64,
                                         "batch_size": 2, **settings})
    assert out.returncode == 0, out.stderr[-3000:]
    client, runs = runs_of(store)
    assert len(runs) == 1, "one run per configuration: the one `mlflow run` opened"
    run = runs[0]
    p, t, m = run.data.params, run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED"
    assert [k for k in SCHEMA_PARAMS if k not in p] == []
    assert (p["k"], p["subset"], p["mode"], p["limit"], p["threshold"], p["block_size"]) == \
           ("2", "middle", "output", "4", "0.9", "32")
    assert p["layers"] and p["dtype"] == "auto" and p["device"] == "auto"
    assert p["resolved_dtype"] == "float32" and p["resolved_device"] == "cpu"
    assert [k for k in SCHEMA_TAGS if k not in t] == []
    assert t["git_commit"] == git(["rev-parse", "HEAD"], clean_repo).strip()
    assert t["git_dirty"] == "false" and t["task_kind"] == "generate_until"
    assert t["source_hash"] == provmod.source_hash(clean_repo / "reuse_exp")
    assert [k for k in SCHEMA_METRICS if k not in m] == []
    assert m["generated_tokens"] > 0 and m["seconds"] > 0
    assert m["tokens_per_second"] == pytest.approx(m["generated_tokens"] / m["seconds"])
    assert 0 < m["skipped_fraction"] < 1
    assert any(k.startswith("exact_match") and "stderr" in k for k in m)
    assert any(k.startswith("system/") for k in m), "MLflow's system metrics are on"
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert [a for a in ARTIFACTS if a not in names] == []
    assert any(n.startswith("samples_") for n in names) and "dirty.diff" not in names
    local = Path(client.download_artifacts(run.info.run_id, "summary.json"))
    summary = json.loads(local.read_text())
    assert summary["config"] == "k2_middle" and summary["commit"] == t["git_commit"]
    assert summary["generated_tokens"] == m["generated_tokens"]
    records = Path(client.download_artifacts(run.info.run_id, "per_sample.jsonl")).read_text().splitlines()
    assert len(records) == m["n_samples"] == 4 and {"doc_id", "correct", "output"} <= set(json.loads(records[0]))
    timings = json.loads(Path(client.download_artifacts(run.info.run_id, "timings.json")).read_text())
    assert len(timings["batches"]) == m["timed_batches"] == 2   # 4 documents, batch size 2
    assert sum(t for t, _ in timings["batches"]) == m["generated_tokens"]
    # how fair its timing was: the verdict as tag and metric, the noise, every rank's record
    assert t["timing_quality"] == "clean" or t["timing_quality"].startswith("contended: ")
    assert m["timing_quality"] == float(t["timing_quality"] == "clean")
    assert m["tokens_per_second_noise"] >= NOISE_FLOOR and m["probe_seconds_before"] > 0
    assert m["timing_torch_threads"] >= 1 and not any(k.startswith("gpu_") for k in m)   # no GPU, no GPU verdict
    fairness = json.loads(Path(client.download_artifacts(run.info.run_id, "timing_quality.json")).read_text())
    assert len(fairness) == 1 and len(fairness[0]["probe_before"]) == len(fairness[0]["probe_after"]) == BURSTS
    assert fairness[0]["noise"] == pytest.approx(m["tokens_per_second_noise"])
    said = re.search(r"^timing    (clean|contended: .+) \(noise ±(\d+)%\)$", out.stdout, re.M)
    assert said and said[1] == t["timing_quality"], out.stdout
    # every decoded sample's unmasking schedule: the run replays as a benchmark trajectory
    from reuse_exp.engine.trajectory import Trajectory
    replayable = Trajectory.load(str(client.download_artifacts(run.info.run_id, "reuse_trace.json")))
    assert len(replayable.samples) == 4 and replayable.tokens_per_step >= 1
    # The secret never lands: neither in the database nor in any artifact.
    store_dir = Path(store.removeprefix("sqlite:///")).parent
    hits = [f for f in store_dir.rglob("*") if f.is_file() and SECRET.encode() in f.read_bytes()]
    assert hits == []


@pytest.mark.slow
def test_dirty_tree_is_refused_before_the_model_loads(clean_repo, store, tmp_path):
    repo = tmp_path / "dirty"
    git(["clone", "-q", str(clean_repo), str(repo)], tmp_path)
    (repo / "notes.txt").write_text("a new file can change a result\n")
    with open(repo / "README.md", "a") as f:
        f.write("\nedited\n")
    # A model that does not exist: the refusal must come first, so it never gets that far.
    out = mlflow_run(repo, store, {"model": str(tmp_path / "no_such_model"), "limit": 2})
    assert out.returncode != 0
    assert "dirty tree" in out.stderr and "notes.txt" in out.stderr and "README.md" in out.stderr
    assert "no_such_model" not in out.stderr.split("dirty tree")[1]
    _, runs = runs_of(store)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "dirty tree" in runs[0].data.tags["error"]

    # allow_dirty runs anyway: tagged dirty, the diff logged; then a checkpoint without weights fails it
    # (a model that is not there at all is refused before the run opens, as a typo is).
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(BUNDLED_MODEL_DIR / "config.json", no_weights / "config.json")
    out = mlflow_run(repo, store, {"model": str(no_weights), "limit": 2, "allow_dirty": "true"})
    assert out.returncode != 0
    assert "no_weights has neither" in out.stderr and "Traceback" not in out.stderr
    client, runs = runs_of(store)
    latest = max(runs, key=lambda r: r.info.start_time)
    assert latest.info.status == "FAILED" and latest.data.tags["git_dirty"] == "true"
    assert latest.data.tags["mlflow.runName"] == "k1_all_tiny_gsm*dirty"   # never the name of a clean run of it
    assert "notes.txt" in latest.data.tags["git_dirty_files"]
    assert "has neither" in latest.data.tags["error"]
    assert latest.data.tags[REFUSED_TAG] == "true", "refused before evaluating: the weights are not there"
    diff = Path(client.download_artifacts(latest.info.run_id, "dirty.diff")).read_text()
    assert "+edited" in diff and "+a new file" in diff
    assert all(r.info.status != "RUNNING" for r in runs)


def test_a_param_the_code_changed_fails_the_run(store, monkeypatch):
    """`mlflow run` logs its -P values first; a code value that differs must not pass silently."""
    import mlflow
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    client = mlflow.MlflowClient(store)
    run = client.create_run("0")
    client.log_param(run.info.run_id, "k", "2")
    tracker = tracked.Tracker(run.info.run_id, [])
    tracker.params({"k": 2, "subset": "middle"})  # same value, another spelling: fine
    with pytest.raises(ConfigError, match="parameter k: mlflow run logged '2' but the code used '1'"):
        tracker.params({"k": 1})
    assert client.get_run(run.info.run_id).data.params == {"k": "2", "subset": "middle"}


# -- the heartbeat -----------------------------------------------------------------------------
def test_the_heartbeat_beats_without_progress_and_stops_with_the_run(store, monkeypatch):
    """A tracked run rewrites its heartbeat every interval by itself (here 0.2 s, 30 s in a
    real run), while the evaluation logs nothing; it stops when the run ends."""
    import mlflow
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("REUSE_EXP_HEARTBEAT_S", "0.2")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    tracker = tracked.Tracker.start(RunSettings())
    client = mlflow.MlflowClient(store)
    seen = []
    for _ in range(15):      # 1.5 s of nothing but waiting
        seen.append(client.get_run(tracker.run_id).data.tags.get(HEARTBEAT_TAG))
        time.sleep(0.1)
    assert seen[0] is not None, "the run beats from its first moment"
    assert len(set(seen)) >= 4
    stamps = sorted(parse_stamp(s) for s in set(seen))
    assert all(0.1 < b - a < 1.0 for a, b in zip(stamps, stamps[1:]))
    tracker.end("FINISHED")
    last = client.get_run(tracker.run_id).data.tags[HEARTBEAT_TAG]
    time.sleep(0.6)
    assert client.get_run(tracker.run_id).data.tags[HEARTBEAT_TAG] == last


def test_a_failing_heartbeat_is_said_once_and_keeps_beating(caplog):
    calls = []

    def beat(stamp: str) -> None:
        calls.append(stamp)
        if len(calls) <= 3:
            raise ConnectionError("store unreachable")

    hb = Heartbeat(beat, 0.05).start()
    time.sleep(0.5)
    hb.stop()
    assert len(calls) >= 6
    assert [r.getMessage()[:30] for r in caplog.records] == ["heartbeat not written (Connect"]


def test_a_bad_heartbeat_interval_is_one_line(monkeypatch):
    monkeypatch.setenv("REUSE_EXP_HEARTBEAT_S", "soon")
    with pytest.raises(ConfigError, match="REUSE_EXP_HEARTBEAT_S='soon': give the heartbeat interval in seconds"):
        interval_s()


# -- every documented value, through `mlflow run` ---------------------------------------------
def documented_values(tiny_ckpt, tasks_dir) -> list[dict]:
    """The README's settings table, spelled as a user types them, over two runs."""
    return [
        {"k": "2.0", "subset": "1,3", "dtype": "auto", "device": "auto", "limit": "0.05", "task": "tiny_gsm",
         "model": "bundled", "mode": "output", "scope": "block", "decode_path": "auto", "use_block_cache": "true",
         "apply_chat_template": "true", "fewshot_as_multiturn": "true", "revision": "none", "tokenizer": "none",
         "allow_dirty": "false"},
        {"k": "3", "subset": "last", "mode": "delta", "scope": "refresh", "dtype": "float32", "device": "cpu",
         "limit": "", "task": "t_gen", "include_path": str(tasks_dir), "model": "random:tiny",   # `-P limit=`: all
         "tokenizer": str(REPO / "reuse_exp" / "tiny" / "model"), "max_new_tokens": "32", "threshold": "0.8",
         "block_size": "16", "small_block_size": "4", "decode_path": "eager", "use_block_cache": "false",
         "apply_chat_template": "false", "fewshot_as_multiturn": "false", "num_fewshot": "0", "batch_size": "4",
         "seed": "7"},
    ]


@pytest.mark.slow
@pytest.mark.parametrize("which", [0, 1])
def test_every_documented_value_works_through_mlflow_run(clean_repo, store, tiny_ckpt, tasks_dir, which):
    """Each value the README documents is taken as written: `-P k=2.0`, `dtype=auto`, `device=auto`,
    `limit=none` or a fraction, a subset as a layer list, a random model. The run prints its
    summary, and nothing else that would alarm a newcomer."""
    values = documented_values(tiny_ckpt, tasks_dir)[which]
    out = mlflow_run(clean_repo, store, values)
    assert out.returncode == 0, out.stderr[-3000:]
    client, [run] = runs_of(store)
    p = run.data.params
    assert run.info.status == "FINISHED"
    for name, value in values.items():
        if name != "include_path":
            assert schema.same_param(p[name], value), (name, p[name], value)   # as given
    assert p["resolved_dtype"] == "float32" and p["resolved_device"] == "cpu"
    assert run.data.tags["gpu_metrics"].startswith("none: this run computed on the CPU")
    assert not any(name.startswith("gpu_") for name in run.data.metrics)
    if which == 1:
        assert p["limit"] == "''" and run.data.metrics["n_samples"] == 8   # MLflow's spelling of empty: the whole task
    assert p["layers"] == ("1,3" if which == 0 else "5,6,7")
    head = git(["rev-parse", "HEAD"], clean_repo).strip()
    said = out.stdout.splitlines()[:-2]   # the UI's addresses: tests/test_services_ui.py opens them
    assert said[-7].startswith("accuracy  ") and " ± " in said[-7] and "(n=" in said[-7], out.stdout
    assert said[-6].startswith("speed     ") and "tokens/s" in said[-6] and "s of decoding" in said[-6]
    assert re.fullmatch(r"timing    (clean|contended: .+) \(noise ±\d+%\)", said[-5]), said[-5]
    assert said[-4] == f"code      {head[:12]} (clean)"
    assert said[-3] == f"run       {run.info.run_id} in experiment 'Default'"
    assert said[-2] == f"store     {store}"
    assert said[-1] == f"ui        reuse-exp ui --store {store}"
    done = re.findall(r"^decoding: (\d+)/(\d+) requests \[", out.stderr, re.M)
    assert done[0][0] == "0" and done[-1][0] == done[-1][1] != "0", out.stderr[-3000:]   # progress, start to end
    for noise in ("instantiate a model of type", "Custom kwargs can be passed", "Skip logging GPU metrics",
                  "Traceback", "Warning", "WARNING"):
        assert noise not in out.stderr, (noise, out.stderr[-3000:])


def test_a_store_that_cannot_work_is_said_in_one_line(tmp_path):
    """Before MLflow's client retries for minutes or creates a store where none was meant."""
    from services import free_port

    from reuse_exp.errors import StoreUnavailable
    from reuse_exp.tracking.store_init import open_client, unavailable
    db = tmp_path / "mlflow.db"
    assert unavailable(f"sqlite:///{db}") is None   # a new store in a folder that exists: the first run makes it
    assert unavailable(f"sqlite:///{tmp_path}/typo/mlflow.db").startswith(f"no folder {tmp_path}/typo for the sqlite")
    assert unavailable(f"sqlite:///{db}", must_exist=True) == \
        f"no tracking store at {db}: point MLFLOW_TRACKING_URI at the store to read"
    port = free_port()
    assert unavailable(f"postgresql+psycopg2://u@127.0.0.1:{port}/db").startswith(
        f"postgresql+psycopg2://u@127.0.0.1:{port}/db: the postgresql server does not answer (connection refused")
    assert "(no host 'no-such-host.invalid'" in unavailable("https://no-such-host.invalid")
    with pytest.raises(StoreUnavailable, match=r"^MLFLOW_TRACKING_URI=localhost:5000 is no store MLflow can open "
                                               r"\(a server is http://localhost:5000\)"):
        open_client("localhost:5000")
    assert not db.exists(), "nothing was created on the way"


def test_the_store_lock_lets_one_process_open_a_new_store_at_a_time(tmp_path):
    """While one opener holds a sqlite store's lock, another waits for it; other stores take none."""
    import threading

    from reuse_exp.tracking.store_init import store_opening
    uri, order = f"sqlite:///{tmp_path}/mlflow.db", []

    def second():
        with store_opening(uri):
            order.append("second")

    with store_opening(uri):
        waiter = threading.Thread(target=second)
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive()
        order.append("first")
    waiter.join(10)
    assert order == ["first", "second"]
    with store_opening("http://localhost:5000"), store_opening("http://localhost:5000"):
        pass

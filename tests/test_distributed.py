"""Data parallel runs: N gloo ranks on CPU give the 1-rank run's outputs byte for byte, in one
MLflow run; a rank that fails, is killed or hangs ends the whole run FAILED or KILLED."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import subprocess_env

from reuse_exp.errors import ConfigError
from reuse_exp.engine.instrument import DecodeReport, LayerCounts, SampleStats
from reuse_exp.evaluation import placement as placement_mod
from reuse_exp.evaluation.placement import Placement, resolve
from reuse_exp.evaluation.stats import HarnessStats, world_metrics
from reuse_exp.settings import RunSettings
from reuse_exp.tracking.gpu_stats import combine

# The bundled model and task; 5 documents over 2 ranks: rank 1's shard is padded by lm-eval.
RUN = ["--limit", "5", "--max-new-tokens", "128"]


# -- the pieces ----------------------------------------------------------------------------
def test_processes_resolve_to_ranks_and_refuse_what_cannot_run():
    cpu = {"WORLD_SIZE": "1"}
    assert resolve(RunSettings(processes="auto", device="cpu"), cpu).processes == 1
    assert resolve(RunSettings(processes=3, device="cpu"), cpu).to_launch == 3
    with pytest.raises(ConfigError, match="torch sees no CUDA device"):
        resolve(RunSettings(processes=2, device="cuda:1"), cpu)
    assert resolve(RunSettings(device="cpu", processes=2), {"WORLD_SIZE": "2", "RANK": "1"}).device == "cpu"
    with pytest.raises(ConfigError, match="each rank takes its own GPU"):
        placement_mod._rank_device("cuda:1", 1, 2, 1)
    with pytest.raises(ConfigError, match="each rank takes its own GPU; use --device cuda"):
        placement_mod._processes(2, "cuda:1")
    with pytest.raises(ConfigError, match=r"--processes 2 but 0 GPU\(s\) visible"):
        placement_mod._processes(2, "cuda")


def test_a_rank_refuses_a_world_it_was_not_asked_for():
    env = {"WORLD_SIZE": "2", "RANK": "0"}
    assert resolve(RunSettings(processes=2, device="cpu"), env).to_launch == 1   # already a rank: launch none
    assert resolve(RunSettings(processes="auto", device="cpu"), env).to_launch == 1
    with pytest.raises(ConfigError, match="launched as 2 ranks but --processes 3: pass --processes 2"):
        resolve(RunSettings(processes=3, device="cpu"), env)


def test_placement_is_resolved_once_and_handed_down(monkeypatch, tiny_ckpt):
    """The model uses the placement it is given: it resolves nothing itself."""
    from reuse_exp.evaluation import lm as lm_mod
    calls = []
    monkeypatch.setattr(lm_mod, "resolve_placement", lambda s: calls.append(s))
    monkeypatch.setattr(placement_mod.torch.cuda, "is_available", lambda: False)
    given = Placement("cpu", "float32")
    lm = lm_mod.FastDLLMv2LM(RunSettings(model=str(tiny_ckpt), device="cpu", max_new_tokens=32), given)
    assert lm.placement is given and calls == []
    assert (str(lm.device), str(lm.model.dtype), lm.params()["resolved_dtype"]) == ("cpu", "torch.float32", "float32")


def test_settings_travel_to_the_ranks_as_options(tmp_path):
    from click.testing import CliRunner

    from reuse_exp.cli import run as run_cmd
    folders = tuple(str(tmp_path / name) for name in ("a", "b"))   # include_path must name folders that exist
    for folder in folders:
        Path(folder).mkdir()
    s = RunSettings(k=2, subset=(8, 9), limit=0.5, include_path=folders, processes="auto", threshold=0.75)
    ctx = run_cmd.make_context("run", s.to_args())
    values = dict(ctx.params)
    values["include_path"] = tuple(p for group in values["include_path"] for p in group)
    assert RunSettings(**values) == s
    assert CliRunner().invoke(run_cmd, ["--processes", "0"]).exit_code == 2


def _shard(tokens: list[int], seconds: float) -> HarnessStats:
    samples = [SampleStats(generated_tokens=t, forwards=Counter({"small_block": t})) for t in tokens]
    return HarnessStats(decode=[DecodeReport(samples, seconds, LayerCounts(2))])


def test_tokens_per_second_is_all_tokens_over_the_slowest_rank():
    m = world_metrics([_shard([30, 10], 2.0), _shard([20], 4.0)])
    assert m["generated_tokens"] == 60 and m["seconds"] == 4.0
    assert m["tokens_per_second"] == pytest.approx(60 / 4.0)
    assert m["rank0/tokens_per_second"] == pytest.approx(20.0) and m["rank1/tokens_per_second"] == 5.0
    assert m["forwards_small_block"] == 60
    assert world_metrics([_shard([30], 2.0)]) == _shard([30], 2.0).metrics()


def test_the_median_and_quartiles_are_all_ranks_like_tokens_per_second():
    """Two ranks decoding at once: the run's median counts both (a batch's rate times two),
    beside each rank's own, so it reads on the scale of tokens_per_second."""
    m = world_metrics([_shard([30], 2.0), _shard([40], 2.0)])
    assert m["tokens_per_second"] == pytest.approx(35.0)
    assert m["tokens_per_second_median"] == pytest.approx(35.0)
    assert (m["tokens_per_second_p25"], m["tokens_per_second_p75"]) == (pytest.approx(32.5), pytest.approx(37.5))
    assert m["rank0/tokens_per_second_median"] == 15.0 and m["rank1/tokens_per_second_median"] == 20.0


def test_gpu_statistics_cover_every_gpu():
    a = {"gpu_peak_memory_mb": 100.0, "gpu_util_mean": 50.0, "gpu_util_max": 90.0, "gpu_power_mean_w": 300.0,
         "gpu_energy_j": 10.0, "torch_peak_memory_mb": 80.0}
    b = {**a, "gpu_peak_memory_mb": 120.0, "gpu_util_mean": 70.0, "gpu_energy_j": 30.0}
    m = combine([a, b])
    assert (m["gpu_peak_memory_mb"], m["gpu_util_mean"], m["gpu_energy_j"], m["gpu_power_mean_w"]) == \
           (120.0, 60.0, 40.0, 600.0)
    assert m["rank1/gpu_energy_j"] == 30.0 and combine([a]) == a


# -- real ranks ------------------------------------------------------------------------------
def run_proc(repo, store, *args, env=None):
    return subprocess.Popen([sys.executable, "-m", "reuse_exp.cli", "run", *args], cwd=repo,
                            env={**subprocess_env(store), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def rank_pids(entry: int) -> dict[int, int]:
    """RANK -> pid of the ranks launched under the entry process."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(children.get(entry, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
        except OSError:
            continue
        if "TORCHELASTIC_RUN_ID" in env and "RANK" in env:
            found[int(env["RANK"])] = pid
    return found


def artifacts(client, run) -> tuple[dict, dict]:
    """Per document: lm-eval's filtered responses, and the generation's raw text."""
    samples = Path(client.download_artifacts(run.info.run_id, "samples_tiny_gsm.jsonl")).read_text()
    gens = Path(client.download_artifacts(run.info.run_id, "generations.jsonl")).read_text()
    by_doc = {}
    for line in samples.splitlines():
        row = json.loads(line)
        by_doc.setdefault(row["doc_id"], {})[row["filter"]] = row["filtered_resps"]
    raw = [json.loads(line) for line in gens.splitlines()]
    assert len({g["doc_id"] for g in raw}) == len(raw), "each document decoded once"
    return by_doc, {g["doc_id"]: g["raw"] for g in raw}


@pytest.mark.slow
def test_two_gloo_ranks_give_the_one_rank_outputs_in_one_run(clean_repo, store):
    import mlflow
    client = mlflow.MlflowClient(store)
    for processes in ("1", "2"):
        proc = run_proc(clean_repo, store, *RUN, "--processes", processes)
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0 and out.count("accuracy ") == 1, err[-3000:]   # one summary, not one a rank
        assert "(n=5, tiny_gsm" in out, out   # a count, as the integer it is
    one, two = sorted(client.search_runs(["0"]), key=lambda r: r.data.params["world_size"])
    assert len(client.search_runs(["0"])) == 2, "one MLflow run per `reuse-exp run`, whatever its ranks"
    assert (one.info.status, two.info.status) == ("FINISHED", "FINISHED")
    p, t, m = two.data.params, two.data.tags, two.data.metrics
    assert (p["processes"], p["world_size"], p["rank_devices"]) == ("2", "2", "cpu,cpu")
    assert t["rank_devices"].startswith("0: cpu") and "1: cpu" in t["rank_devices"]
    # The same documents, the same text, byte for byte; so the same accuracy and token count.
    assert artifacts(client, one) == artifacts(client, two)
    assert sorted(artifacts(client, two)[0]) == [0, 1, 2, 3, 4]
    assert m["accuracy"] == one.data.metrics["accuracy"] > 0
    assert m["generated_tokens"] == one.data.metrics["generated_tokens"]
    # Each rank decoded its own shard; throughput is the whole over the slowest rank.
    shares = [m["rank0/generated_tokens"], m["rank1/generated_tokens"]]
    assert all(s > 0 for s in shares) and sum(shares) == m["generated_tokens"]
    assert m["seconds"] == max(m["rank0/seconds"], m["rank1/seconds"])
    assert m["tokens_per_second"] == pytest.approx(m["generated_tokens"] / m["seconds"])
    assert m["tokens_per_second_median"] > max(m["rank0/tokens_per_second_median"], m["rank1/tokens_per_second_median"])
    assert m["forwards_prefill"] == one.data.metrics["forwards_prefill"] == 5, "padding is not decoded twice"
    # Every document's record and hash, the padded document's (rank 1's last) too, and every metric
    # that is not a timing: the same for 1 and 2 ranks, so `compare` sees no change across world sizes.
    per_sample = [Path(client.download_artifacts(r.info.run_id, "per_sample.jsonl")).read_text() for r in (one, two)]
    assert per_sample[0] == per_sample[1]
    from reuse_exp.evaluation.stats import computed_only
    results = [{k: v for k, v in r.data.metrics.items() if not computed_only(k) and not k.startswith("rank")}
               for r in (one, two)]
    assert results[0] == results[1] and "skipped_fraction" in results[0]


def wait_for_progress(client, proc, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        runs = client.search_runs(["0"])
        if runs and "generated_tokens" in runs[0].data.metrics:
            return runs[0]
        time.sleep(0.5)
    raise AssertionError(proc.communicate()[1][-3000:] if proc.poll() is not None else "no progress")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_killed_and_stops_the_others(clean_repo, store):
    import mlflow
    client = mlflow.MlflowClient(store)
    proc = run_proc(clean_repo, store, "--limit", "40", "--processes", "2")
    wait_for_progress(client, proc)
    pids = rank_pids(proc.pid)
    assert sorted(pids) == [0, 1]
    os.kill(pids[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 137, err[-3000:]
    assert "rank 1 of 2 was killed (SIGKILL)" in err and "Traceback" not in err
    assert not alive(pids[0]), "the launcher stopped rank 0"
    [run] = client.search_runs(["0"])
    assert run.info.status == "KILLED" and run.data.tags["end_status"] == "KILLED"
    assert "rank 1 of 2 was killed (SIGKILL)" in run.data.tags["error"]
    assert run.data.metrics["generated_tokens"] > 0, "what rank 0 had logged stays"
    assert "accuracy" not in run.data.metrics


def odd_doc_fails(tasks: Path) -> None:
    """tiny_gsm whose scoring raises on document 1 only: a fault in rank 1's shard alone."""
    import shutil

    from reuse_exp.evaluation.harness import bundled_tasks_dir
    src = bundled_tasks_dir()
    shutil.copytree(src / "data", tasks / "data")
    shutil.copy(src / "tiny_tasks.py", tasks)
    doc1 = json.loads((src / "data" / "tiny_gsm_test.jsonl").read_text().splitlines()[1])["question"]
    (tasks / "boom.py").write_text(
        f"DOC1 = {doc1!r}\n\n\n"
        "def process_results(doc, results):\n"
        "    if doc['question'] == DOC1:\n"
        "        raise RuntimeError('scoring broke on document 1')\n"
        "    return {'exact_match': 0.0}\n")
    text = (src / "tiny_gsm.yaml").read_text().replace("task: tiny_gsm", "task: tiny_boom")
    (tasks / "tiny_boom.yaml").write_text(text + "process_results: !function boom.process_results\n")


@pytest.mark.slow
def test_a_failed_rank_ends_the_run_failed_with_its_reason(clean_repo, store, tmp_path):
    import mlflow
    tasks = tmp_path / "tasks"
    odd_doc_fails(tasks)
    proc = run_proc(clean_repo, store, "--task", "tiny_boom", "--include-path", str(tasks), "--limit", "4",
                    "--max-new-tokens", "32", "--processes", "2")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-3000:]
    assert "rank 1 of 2: RuntimeError: scoring broke on document 1" in err
    client = mlflow.MlflowClient(store)
    [run] = client.search_runs(["0"])
    assert run.info.status == "FAILED" and run.data.tags["end_status"] == "FAILED"
    assert "rank 1 of 2: RuntimeError: scoring broke on document 1" in run.data.tags["error"]
    trace = Path(client.download_artifacts(run.info.run_id, "error.txt")).read_text()
    assert "boom.py" in trace and "scoring broke on document 1" in trace, "rank 1's traceback"


@pytest.mark.slow
def test_a_hung_rank_fails_the_run_instead_of_waiting_forever(clean_repo, store):
    import mlflow
    client = mlflow.MlflowClient(store)
    proc = run_proc(clean_repo, store, "--limit", "6", "--max-new-tokens", "64", "--processes", "2",
                    env={"REUSE_EXP_COLLECTIVE_TIMEOUT_S": "20", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "5"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(rank_pids(proc.pid)) < 2:
        time.sleep(0.2)
    pids = rank_pids(proc.pid)
    os.kill(pids[1], signal.SIGSTOP)   # hangs from here on: rank 0 reaches a collective alone
    try:
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=300)
    finally:
        if alive(pids[1]):
            os.kill(pids[1], signal.SIGKILL)
    assert proc.returncode not in (0, None), err[-3000:]
    assert "rank 0 of 2" in err and time.monotonic() - t0 < 200
    [run] = client.search_runs(["0"])
    assert run.info.status == "FAILED" and "rank 0 of 2" in run.data.tags["error"]
    assert not alive(pids[0]) and not alive(pids[1])


@pytest.mark.slow
def test_lm_eval_under_torchrun_shards_through_the_model(tmp_path):
    """lm-eval's own CLI under torch's launcher: each rank evaluates its documents, rank 0 writes."""
    from reuse_exp.evaluation.harness import bundled_tasks_dir
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"out{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               "-m", "reuse_exp.cli", "lm-eval", "run", "--model", "fast_dllm_v2",
               "--model_args", "pretrained=bundled,max_new_tokens=64", "--tasks", "tiny_gsm",
               "--include_path", str(bundled_tasks_dir()), "--limit", "5", "--log_samples", "--output_path", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        [samples] = list(out.rglob("samples_tiny_gsm_*.jsonl"))
        rows = [json.loads(line) for line in samples.read_text().splitlines()]
        outs[n] = {(r["doc_id"], r["filter"]): r["filtered_resps"] for r in rows}
    assert sorted({d for d, _ in outs[2]}) == [0, 1, 2, 3, 4]
    assert outs[1] == outs[2]


@pytest.mark.slow
def test_sigterm_to_the_launching_process_stops_every_rank_and_ends_killed(clean_repo, store):
    """What scancel or `kill` does to `reuse-exp run --processes 2`: the launcher passes the signal
    on to the ranks, and the run ends KILLED with what it had."""
    import mlflow
    client = mlflow.MlflowClient(store)
    proc = run_proc(clean_repo, store, "--limit", "40", "--processes", "2")
    wait_for_progress(client, proc)
    pids = rank_pids(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM: the ranks were stopped and the run ended KILLED" in err and "Traceback" not in err
    # one line for the one signal: not one a rank, nor torch's launcher narrating the shutdown
    said = [line for line in err.splitlines() if not line.startswith("decoding: ")]
    assert said == ["reuse-exp: SIGTERM: the ranks were stopped and the run ended KILLED with what it had logged"], err
    assert not any(alive(p) for p in pids.values())
    [run] = client.search_runs(["0"])
    assert run.info.status == "KILLED" and run.data.metrics["generated_tokens"] > 0

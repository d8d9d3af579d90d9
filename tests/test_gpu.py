"""On a CUDA GPU: the fast path (CUDA graphs of batch-invariant Triton kernels, the default)
decodes the same tokens for a sample alone and in a batch, in bf16, with and without reuse;
it agrees with the eager path on the bundled model's accuracy; a skipped group is skipped on
the device; graphs after a batch is trimmed; tracked runs with real NVML statistics. Skipped
without CUDA."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import REPO, subprocess_env
from reuse_exp.engine.config import ModelConfig
from reuse_exp.engine.decoding import DecodeConfig, generate
from reuse_exp.engine.fast import FastRunner
from reuse_exp.engine.loading import decode_config_for, load_model, load_tokenizer, random_model
from reuse_exp.engine.policies import get as get_policy
from reuse_exp.engine.policies.fixed import FixedPolicy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2)
DEC = DecodeConfig(mask_id=63, stop_id=62, pad_id=61, max_new_tokens=64, threshold=0.9)
PROMPTS = [[5, 6, 7, 8] * 10, [9, 10, 11, 12, 13] * 3 + [14] * 4, list(range(1, 26)) * 3]


def bundled_prompts(tok, n: int, offset: int = 0) -> list[list[int]]:
    from reuse_exp.tiny import data as tiny_data
    docs = tiny_data.read_task_docs("tiny_gsm_test.jsonl")[offset:offset + n]
    return [tok(tiny_data.gsm_prompt(tok, d), add_special_tokens=False)["input_ids"] for d in docs]


def policies(num_layers: int):
    return {"k=1": None, "k=2 first": FixedPolicy.create(num_layers, k=2, subset="first"),
            "k=3 last delta": FixedPolicy.create(num_layers, k=3, subset="last", mode="delta"),
            "adaptive delta 0.5": get_policy("adaptive").create(num_layers, drift=0.5, max_reuse=4, mode="delta"),
            "depth delta 0.5": get_policy("depth").create(num_layers, drift=0.5, max_reuse=4, mode="delta")}


def same_decode(a: list[int], b: list[int], finished_a: bool, finished_b: bool) -> bool:
    """The same tokens as far as both budgets reach (a sample's budget counts from the longest
    prompt of its batch), and the same length where either stopped."""
    n = min(len(a), len(b))
    return a[:n] == b[:n] and (not (finished_a or finished_b) or len(a) == len(b))


@pytest.fixture(scope="module")
def bundled():
    model, ckpt = load_model(REPO / "reuse_exp/tiny/model", dtype="bfloat16", device="cuda")
    tok = load_tokenizer(ckpt)
    return model, tok


@pytest.mark.parametrize("name", list(policies(8)))
def test_a_sample_decodes_the_same_alone_and_in_batches_of_8_and_32(bundled, name):
    """The bundled model in bf16, 32 tiny_gsm questions, 128 new tokens, the default GPU path:
    solo == batch 8 == batch 32, bit for bit, for every sample."""
    model, tok = bundled
    prompts, dec = bundled_prompts(tok, 32), decode_config_for(tok, max_new_tokens=128)
    policy = policies(model.num_layers)[name]
    runner = FastRunner(model)
    assert runner.name == "cuda-graph+triton"
    solo = [generate(model, [p], dec, policy, runner=runner) for p in prompts]
    for size in (8, 32):
        parts = [generate(model, prompts[i:i + size], dec, policy, runner=runner) for i in range(0, 32, size)]
        tokens = [t for r in parts for t in r.tokens]
        finished = [s.finished for r in parts for s in r.report.samples]
        differ = [i for i, s in enumerate(solo) if not same_decode(s.tokens[0], tokens[i], s.report.samples[0].finished,
                                                                   finished[i])]
        assert not differ, f"{name}, batch {size}: samples {differ} differ from their solo decode"
    if policy is not None and name != "k=1":
        assert sum(r.report.skipped_fraction for r in solo) > 0


def test_the_fast_path_has_eager_s_accuracy_on_the_bundled_model(bundled):
    """All 200 tiny_gsm questions in bf16, batches of 32, strict-match exact match: the fast
    path's accuracy within one standard error of the eager path's; the rate at which their
    tokens agree is printed (they round differently: some decodes part)."""
    from reuse_exp.tiny import data as tiny_data
    model, tok = bundled
    docs = tiny_data.read_task_docs("tiny_gsm_test.jsonl")
    prompts, dec = bundled_prompts(tok, len(docs)), decode_config_for(tok, max_new_tokens=192)
    runner, scores, outs = FastRunner(model), {}, {}
    for path, run in (("eager", None), ("fast", runner)):
        tokens = [t for i in range(0, len(prompts), 32) for t in generate(model, prompts[i:i + 32], dec, runner=run).tokens]
        texts = [tok.decode(t, skip_special_tokens=True) for t in tokens]
        scores[path] = [tiny_data.strict_answer(x) == tiny_data.target_number(d) for x, d in zip(texts, docs)]
        outs[path] = tokens
    n = len(docs)
    acc = {p: sum(v) / n for p, v in scores.items()}
    stderr = (acc["eager"] * (1 - acc["eager"]) / (n - 1)) ** 0.5
    same = sum(a == b for a, b in zip(outs["eager"], outs["fast"]))
    agree = sum(x == y for a, b in zip(outs["eager"], outs["fast"]) for x, y in zip(a, b)) / \
        sum(max(len(a), len(b)) for a, b in zip(outs["eager"], outs["fast"]))
    # What the vendor kernels' batch dependence does to the eager path (docs/engine.md cites it).
    batch = generate(model, prompts[:32], dec)
    solo = [generate(model, [p], dec) for p in prompts[:32]]
    eager_invariant = sum(same_decode(r.tokens[0], t, r.report.samples[0].finished, f.finished)
                          for r, t, f in zip(solo, batch.tokens, batch.report.samples))
    figures = {"accuracy": acc, "stderr": stderr, "identical_samples": same, "samples": n, "token_agreement": agree,
               "eager_solo_equals_batch32": f"{eager_invariant} of 32"}
    print(json.dumps(figures))
    if os.environ.get("REUSE_EXP_GPU_FIGURES"):   # the device script keeps them beside the log
        Path(os.environ["REUSE_EXP_GPU_FIGURES"]).write_text(json.dumps(figures, indent=1))
    assert abs(acc["fast"] - acc["eager"]) <= max(stderr, 1 / n), acc


def test_a_group_every_row_reuses_is_skipped_on_the_device():
    """The 7B shape's small-block forward at batch 1 with k=2 first's layers reused is faster
    than with none reused (the group's kernels return at once), and nothing is read back."""
    from reuse_exp.engine.model import ForwardKind
    from reuse_exp.engine.reuse import told_plan
    model = random_model("7b", "bfloat16", device="cuda", seed=0)
    runner = FastRunner(model)
    policy = FixedPolicy.create(model.num_layers, k=2, subset="first")
    cache, rc = runner.new_cache(1, 512, 32), runner.new_reuse_cache(policy, 1, 32)
    tokens = torch.randint(0, 1000, (1, 288), device="cuda")
    runner(tokens[:, :256], ForwardKind.PREFILL, cache)
    blk = tokens[:, 256:]
    runner(blk, ForwardKind.FULL_BLOCK, cache, 0, told_plan(policy.layers, [False], rc, 0, "cuda",
                                                            ForwardKind.FULL_BLOCK, runner.buffer))
    times = {}
    for reuse in (False, True):
        plan = told_plan(policy.layers, [reuse], rc, 8, "cuda", buffer=runner.buffer)
        for _ in range(3):
            runner(blk[:, 8:16], ForwardKind.SMALL_BLOCK, cache, 8, plan)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            runner(blk[:, 8:16], ForwardKind.SMALL_BLOCK, cache, 8, plan)
        end.record()
        end.synchronize()
        times[reuse] = start.elapsed_time(end) / 10
    del model
    assert times[True] < 0.8 * times[False], times   # 12 of 28 layers: about 40 % less


def _early_stop_token(model, runner):
    runs = [generate(model, [p], replace(DEC, ignore_stop=True), runner=runner).tokens[0] for p in PROMPTS]
    others = set(runs[0]) | set(runs[2])
    for t in runs[1][:20]:
        if t not in others and t not in (DEC.mask_id, DEC.pad_id):
            return t
    pytest.skip("random model gave no token unique to one prompt; the scenario needs one")


def test_graphs_replay_after_the_batch_is_trimmed():
    """One sample stops early and leaves the batch: the trimmed batch gets graphs of its own
    shape and caches, and the samples decode as they do alone."""
    model = random_model(CFG, "bfloat16", device="cuda", seed=0, std=0.2)
    runner = FastRunner(model)
    dec = replace(DEC, stop_id=_early_stop_token(model, runner))
    for name, policy in list(policies(8).items())[:3]:
        fast = generate(model, PROMPTS, dec, policy, runner=runner)
        for i, p in enumerate(PROMPTS):
            solo = generate(model, [p], dec, policy, runner=runner)
            assert same_decode(solo.tokens[0], fast.tokens[i], solo.report.samples[0].finished,
                               fast.report.samples[i].finished), (name, i)
        assert fast.report.samples[1].finished and not all(s.finished for s in fast.report.samples)
    batches = {key[1] for key in runner.graphs}
    assert {3, 2} <= batches, batches  # graphs of the full and of the trimmed batch were replayed


def test_kernels_are_counted_inside_a_graph_replay():
    """The benchmark's kernel count: a graph of three element-wise kernels replays three."""
    from reuse_exp.engine.kernels import kernels_per_call
    x = torch.ones(1024, device="cuda")
    y = torch.empty_like(x)

    def three():
        torch.mul(x, 2, out=y)
        y.add_(1)
        y.sqrt_()
    three()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        three()
    counted = kernels_per_call(graph.replay, x.device, calls=4)
    assert counted["kernels"] == 3 and counted["kernel_us"] > 0, counted


# -- tracked runs ---------------------------------------------------------------------------
def tracked(store: str, *args: str, timeout: int = 900) -> dict:
    """`reuse-exp run` on the GPU into `store`; the run's status, params and metrics."""
    import mlflow
    out = subprocess.run([sys.executable, "-m", "reuse_exp.cli", "run", "--device", "cuda", "--allow-dirty", "true",
                          *args], cwd=REPO, env=subprocess_env(store), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    client = mlflow.MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return {"status": runs[0].info.status, "params": runs[0].data.params, "metrics": runs[0].data.metrics}


def test_tracked_run_logs_real_nvml_statistics(store):
    run = tracked(store, "--limit", "4", "--batch-size", "2", "--max-new-tokens", "64", "--k", "2")
    p, m = run["params"], run["metrics"]
    assert run["status"] == "FINISHED"
    assert (p["resolved_device"], p["resolved_dtype"], p["path"]) == ("cuda", "bfloat16", "cuda-graph+triton")
    assert m["gpu_peak_memory_mb"] > 100 and m["gpu_power_mean_w"] > 10 and m["gpu_energy_j"] > 0
    assert 0 <= m["gpu_util_mean"] <= m["gpu_util_max"] <= 100 and m["gpu_util_max"] > 0
    assert any(k.startswith("system/gpu") for k in m), sorted(m)


def test_tracked_random_7b_run(store):
    run = tracked(store, "--model", "random:7b", "--limit", "4", "--batch-size", "4", "--max-new-tokens", "64",
                  "--k", "2", "--subset", "first")
    p, m = run["params"], run["metrics"]
    assert run["status"] == "FINISHED"
    assert (p["model"], p["resolved_dtype"], p["path"]) == ("random:7b", "bfloat16", "cuda-graph+triton")
    assert m["generated_tokens"] > 0 and m["tokens_per_second"] > 0 and 0 < m["skipped_fraction"] < 1
    assert m["gpu_peak_memory_mb"] > 15_000  # 15.2 GB of bf16 weights were on the GPU

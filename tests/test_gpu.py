"""On a CUDA GPU: the fast path (CUDA graphs, the default; with compiled layers, the `compiled`
path; bf16 attention) against the eager path, graphs after a batch is trimmed, and tracked runs with real NVML statistics.
Skipped without CUDA."""
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from conftest import REPO, subprocess_env
from reuse_exp.engine.policies import get as get_policy
from reuse_exp.engine.config import ModelConfig
from reuse_exp.engine.decoding import DecodeConfig, generate
from reuse_exp.engine.fast import FastRunner
from reuse_exp.engine.static_forward import attend_static
from reuse_exp.engine.loading import decode_config_for, load_model, load_tokenizer, random_model
from reuse_exp.engine.policies.fixed import FixedPolicy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2)
DEC = DecodeConfig(mask_id=63, stop_id=62, pad_id=61, max_new_tokens=64, threshold=0.9)
PROMPTS = [[5, 6, 7, 8] * 10, [9, 10, 11, 12, 13] * 3 + [14] * 4, list(range(1, 26)) * 3]
POLICIES = [None, (2, "first"), (2, "middle"), (3, "last"), "adaptive delta", "depth delta"]


def bundled_prompts(tok, n: int) -> list[list[int]]:
    rows = [json.loads(line) for line in
            (REPO / "reuse_exp/evaluation/tasks/data/tiny_gsm_test.jsonl").read_text().splitlines()[:n]]
    return [tok(f"Question: {r['question']}\nAnswer:")["input_ids"] for r in rows]


COMPILED_BF16 = pytest.mark.xfail(strict=False, reason=(
    "measured on the H200 (2026-11-30): with compiled layers, one sample of the tiny shape's batch parts "
    "from the eager path at token 103 under k=2 first; the compiled layer rounds bf16 intermediates "
    "differently from eager (graphs without compilation gave identical tokens)"))


@pytest.mark.parametrize("which, compile_layers", [pytest.param("tiny shape", True, marks=COMPILED_BF16),
                                                   ("tiny shape", False),
                                                   pytest.param("bundled", True, marks=COMPILED_BF16),
                                                   ("bundled", False)])
def test_fast_path_decodes_the_eager_tokens_in_bf16(which, compile_layers):
    """In bf16, a batch of prompts: graphs (the default GPU path) give the eager path's tokens, with
    and without reuse; with compiled layers (the `compiled` path) they do not yet (xfail). The tiny shape with random weights (peaked predictions), and the
    bundled tiny model on six of its questions."""
    if which == "tiny shape":
        model, prompts, dec = random_model(CFG, "bfloat16", device="cuda", seed=0, std=0.2), PROMPTS, DEC
    else:
        model, ckpt = load_model(REPO / "reuse_exp/tiny/model", dtype="bfloat16", device="cuda")
        tok = load_tokenizer(ckpt)
        prompts, dec = bundled_prompts(tok, 6), decode_config_for(tok, max_new_tokens=64)
    runner = FastRunner(model, compile_layers=compile_layers) if compile_layers else FastRunner(model)
    for spec in POLICIES if which == "tiny shape" else POLICIES[:2]:
        if spec in ("adaptive delta", "depth delta"):  # the segmented forward: a graph per group
            policy = get_policy(spec.split()[0]).create(model.num_layers, drift=0.5, max_reuse=3, mode="delta")
        else:
            policy = FixedPolicy.create(model.num_layers, k=spec[0], subset=spec[1]) if spec else None
        eager = generate(model, prompts, dec, policy)
        fast = generate(model, prompts, dec, policy, runner=runner)
        first = [next((i for i, (a, b) in enumerate(zip(e, f)) if a != b), None)
                 for e, f in zip(eager.tokens, fast.tokens)]
        assert fast.tokens == eager.tokens, f"{spec}: first differing token per sample {first}"
    assert runner.stats["captures"] > 0
    assert runner.name == ("cuda-graph+compile" if compile_layers else "cuda-graph")


def _early_stop_token(model):
    runs = [generate(model, [p], replace(DEC, ignore_stop=True)).tokens[0] for p in PROMPTS]
    others = set(runs[0]) | set(runs[2])
    for t in runs[1][:20]:
        if t not in others and t not in (DEC.mask_id, DEC.pad_id):
            return t
    pytest.skip("random model gave no token unique to one prompt; the scenario needs one")


def test_graphs_replay_after_the_batch_is_trimmed():
    """One sample stops early and leaves the batch: the trimmed batch gets graphs of its own
    shape and caches, and still decodes what the eager path does."""
    model = random_model(CFG, "float32", device="cuda", seed=0, std=0.2)
    dec = replace(DEC, stop_id=_early_stop_token(model))
    runner = FastRunner(model, compile_layers=False)  # the graphs are under test here
    for spec in POLICIES[:4]:   # the fixed policies
        policy = FixedPolicy.create(8, k=spec[0], subset=spec[1]) if spec else None
        eager = generate(model, PROMPTS, dec, policy)
        fast = generate(model, PROMPTS, dec, policy, runner=runner)
        assert fast.tokens == eager.tokens, spec
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


def test_bf16_static_attention_matches_float64():
    torch.manual_seed(0)
    B, H, KV, T, D, S, kv_len = 2, 28, 4, 8, 128, 512, 300
    q = torch.randn(B, H, T, D, device="cuda")
    k, v = torch.randn(B, KV, T, D, device="cuda"), torch.randn(B, KV, T, D, device="cuda")
    k_buf, v_buf = torch.randn(B, KV, S, D, device="cuda"), torch.randn(B, KV, S, D, device="cuda")
    positions = torch.arange(100, 100 + T, device="cuda")
    mask = torch.where(torch.arange(S, device="cuda") < kv_len, 0.0, float("-inf"))
    out = attend_static(q.bfloat16(), k.bfloat16(), v.bfloat16(), k_buf.bfloat16(), v_buf.bfloat16(), positions,
                        mask.bfloat16(), None)
    K, V = k_buf.double().clone(), v_buf.double().clone()
    K[:, :, 100:100 + T], V[:, :, 100:100 + T] = k.double(), v.double()
    K, V = K[:, :, :kv_len].repeat_interleave(H // KV, 1), V[:, :, :kv_len].repeat_interleave(H // KV, 1)
    ref = torch.softmax(q.double() @ K.transpose(-1, -2) / D ** 0.5, -1) @ V
    err = float((out.double() - ref).norm() / ref.norm())
    assert err < 1e-2, err


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
    return {"status": runs[0].info.status, "params": runs[0].data.params, "metrics": runs[0].data.metrics,
            "tags": runs[0].data.tags}


def test_tracked_run_logs_real_nvml_statistics(store):
    run = tracked(store, "--limit", "4", "--batch-size", "2", "--max-new-tokens", "64", "--k", "2")
    p, m = run["params"], run["metrics"]
    assert run["status"] == "FINISHED"
    assert (p["resolved_device"], p["resolved_dtype"], p["path"]) == ("cuda", "bfloat16", "cuda-graph")
    assert m["gpu_peak_memory_mb"] > 100 and m["gpu_power_mean_w"] > 10 and m["gpu_energy_j"] > 0
    assert 0 <= m["gpu_util_mean"] <= m["gpu_util_max"] <= 100 and m["gpu_util_max"] > 0
    assert any(k.startswith("system/gpu") for k in m), sorted(m)
    assert "gpu_metrics" not in run["tags"]   # only a CPU run says why it has none


def test_tracked_random_7b_run(store):
    run = tracked(store, "--model", "random:7b", "--limit", "4", "--batch-size", "4", "--max-new-tokens", "64",
                  "--k", "2", "--subset", "first")
    p, m = run["params"], run["metrics"]
    assert run["status"] == "FINISHED"
    assert (p["model"], p["resolved_dtype"], p["path"]) == ("random:7b", "bfloat16", "cuda-graph")
    assert m["generated_tokens"] > 0 and m["tokens_per_second"] > 0 and 0 < m["skipped_fraction"] < 1
    assert m["gpu_peak_memory_mb"] > 15_000  # 15.2 GB of bf16 weights were on the GPU

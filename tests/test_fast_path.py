"""The static-shape fast path gives the eager path's tokens (CPU here; CUDA graphs on a GPU)."""
from dataclasses import replace

import pytest
import torch

from reuse_exp.engine.policies.drift import DriftPolicy
from reuse_exp.engine.config import ConfigError, ModelConfig
from reuse_exp.engine.decoding import DecodeConfig, generate
from reuse_exp.engine.fast import FastRunner
from reuse_exp.engine.ops import TORCH_OPS
from reuse_exp.engine.loading import random_model
from reuse_exp.engine.policies.fixed import FixedPolicy

CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2)
DEC = DecodeConfig(mask_id=63, stop_id=62, pad_id=61, max_new_tokens=64, threshold=0.9)
PROMPTS = [[5, 6, 7, 8] * 10, [9, 10, 11, 12, 13] * 3 + [14] * 4, list(range(1, 26)) * 3]
# Five rows: the rows a forward runs are padded to a power of two, and they disagree on reuse.
FIVE = PROMPTS + [[3, 4] * 9, [20, 21, 22] * 12]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES)
def model(request):
    return random_model(CFG, "float32", device=request.param, seed=0, std=0.2)


@pytest.mark.parametrize("policy_args", [None, (2, "middle", "output"), (3, "last", "delta"), (2, "last", "output"),
                                         (2, "first", "delta"), (2, "first", "replay"), "adaptive-replay"])
def test_fast_path_tokens_equal_eager(model, policy_args):
    if policy_args == "adaptive-replay":
        policy = DriftPolicy.create(8, drift=0.8, max_reuse=3, mode="replay")
    else:
        policy = FixedPolicy.create(8, k=policy_args[0], subset=policy_args[1], mode=policy_args[2]) if policy_args else None
    eager = generate(model, FIVE, DEC, policy)
    runner = FastRunner(model)
    fast = generate(model, FIVE, DEC, policy, runner=runner)
    assert fast.tokens == eager.tokens
    assert fast.report.path.startswith("cuda-graph" if model.device.type == "cuda" else "static")
    assert runner.stats["static"] > 0
    assert fast.report.summary()["layer_evals_skipped"] == eager.report.summary()["layer_evals_skipped"]


def test_runner_reuses_its_caches_and_graphs_across_calls(model):
    runner = FastRunner(model)
    first = generate(model, [PROMPTS[0]], DEC, FixedPolicy.create(8, k=2, subset="middle"), runner=runner)
    built = len(runner.graphs)
    again = generate(model, [PROMPTS[0]], DEC, FixedPolicy.create(8, k=2, subset="middle"), runner=runner)
    assert again.tokens == first.tokens
    assert len(runner.graphs) == built  # a second call of the same shape builds nothing


@pytest.mark.parametrize("policy", [FixedPolicy.create(8, k=2, subset="last"), DriftPolicy.create(8, drift=2.0, max_reuse=3, mode="delta")],
                         ids=["fixed", "adaptive-delta"])
def test_skipped_layers_are_absent_from_the_static_forward(model, policy):
    """Count the layer computations the static forward runs (the prefill's among them: it is
    static too), as the hooks do for eager."""
    from reuse_exp.engine.static_forward import layer_step
    calls = []

    def counting_step(*args, **kwargs):
        calls.append(1)
        return layer_step(*args, **kwargs)

    runner = FastRunner(model, use_graphs=False, ops=TORCH_OPS)   # a GPU's kernels skip on the device: see test_gpu
    runner.step = counting_step
    res = generate(model, [PROMPTS[0]], DEC, policy, runner=runner)
    assert res.report.samples[0].layer_evals_skipped > 0
    assert len(calls) == sum(8 - len(r["skipped"]) for r in res.report.trace)


def test_shadow_mode_needs_the_eager_path(model):
    with pytest.raises(ConfigError, match="shadow mode runs on the eager path"):
        generate(model, [PROMPTS[0]], DEC, FixedPolicy.create(8, k=2, subset="last"), shadow=True, runner=FastRunner(model))


def test_harness_picks_the_fast_path_on_a_gpu_only(model):
    from reuse_exp.evaluation.models import make_runner
    assert make_runner(model, "eager").name == "eager"
    assert make_runner(model, "fast").name == ("cuda-graph+triton" if model.device.type == "cuda" else "static")
    assert make_runner(model, "auto").name == ("cuda-graph+triton" if model.device.type == "cuda" else "eager")
    from reuse_exp.settings import RunSettings
    with pytest.raises(ConfigError, match="decode_path=turbo: use one of auto, eager, fast"):
        RunSettings.parse({"decode_path": "turbo"})


def test_random_model_is_built_in_its_dtype():
    m = random_model(CFG, "bfloat16", seed=0)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert float(m.model.norm.weight.float().mean()) == 1.0


def test_a_layer_no_row_computes_is_not_computed_and_one_some_rows_compute_runs_for_all(model):
    """Rows out of step: a layer that every row of a forward reuses is not computed; one that
    some rows compute goes through the layer for all the forward's rows (those that reuse it
    take the stand-in). The layer computations the static forward runs are exactly the
    batch's (LayerCounts), fewer than every layer of every forward."""
    from reuse_exp.engine.static_forward import layer_step
    rows = []

    def counting_step(x, *args, **kwargs):
        rows.append(x.shape[0])
        return layer_step(x, *args, **kwargs)

    runner = FastRunner(model, use_graphs=False, ops=TORCH_OPS)   # a GPU's kernels skip on the device: see test_gpu
    runner.step = counting_step
    res = generate(model, PROMPTS, DEC, FixedPolicy.create(8, k=2, subset="first"), runner=runner)
    computed = sum(c for c, _ in res.report.layer_counts.totals())
    assert len(rows) == computed < 8 * sum(res.report.batch_forwards.values())
    samples = res.report.summary()
    assert samples["layer_evals_skipped"] > sum(r for _, r in res.report.layer_counts.totals())  # some were mixed


def test_row_counts_are_padded_to_a_power_of_two_and_decode_the_same(model):
    from reuse_exp.engine.static_inputs import entries
    assert entries([False, True, False, True, True, False, False, False]) == [1, 3, 4, 0]
    assert entries([True, False, True]) == [0, 2]
    assert entries([True] * 5 + [False]) == [0, 1, 2, 3, 4, 5]
    prompts = PROMPTS + [[20, 21, 22] * 9, [30, 31] * 20, [40, 41, 42, 43, 44] * 8]
    policy = FixedPolicy.create(8, k=2, subset="middle")
    runner = FastRunner(model)
    fast = generate(model, prompts, DEC, policy, runner=runner)
    assert runner.stats["padded"] > 0
    assert fast.tokens == generate(model, prompts, DEC, policy).tokens


@pytest.mark.parametrize("device", DEVICES)
def test_static_attention_in_bf16_matches_float64(device):
    """The fast path's attention on this device (PyTorch's SDPA over the static buffer, grouped
    queries stacked; the Triton kernel on a GPU) in bf16 against plain attention in float64 over
    the valid keys, and the K/V write of the rows that write."""
    from reuse_exp.engine.ops import ops_for
    ops = ops_for(torch.device(device))
    gen = torch.Generator().manual_seed(0)
    B, H, KV, T, D, S, kv_len = 2, 8, 2, 8, 64, 256, 160

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)
    qkv, k_buf, v_buf = rand(B, T, (H + 2 * KV) * D), rand(B + 1, KV, S, D), rand(B + 1, KV, S, D)
    positions = torch.arange(100, 100 + T, device=device)
    cos, sin = torch.ones(T, D, device=device), torch.zeros(T, D, device=device)   # no rotation
    rows = torch.tensor([2, 0], device=device)
    bf = [t.bfloat16() for t in (qkv, k_buf, v_buf)]
    before = bf[1].clone()
    q = ops.rope_kv(bf[0], cos.bfloat16(), sin.bfloat16(), H, KV, bf[1], bf[2], rows, positions,
                    torch.tensor([True, False], device=device))
    out = ops.attention(q, bf[1], bf[2], rows, positions, torch.tensor([kv_len], device=device), S)
    k_new = bf[0][..., H * D:(H + KV) * D].reshape(B, T, KV, D).transpose(1, 2)
    assert torch.equal(bf[1][2, :, 100:100 + T], k_new[0])            # row 2 wrote its keys
    assert torch.equal(bf[1][[0, 1]], before[[0, 1]])                  # row 0 did not, nor row 1
    ref_rows = []
    for e, r in enumerate((2, 0)):
        K, V = bf[1][r].double()[:, :kv_len], bf[2][r].double()[:, :kv_len]
        K, V = K.repeat_interleave(H // KV, 0), V.repeat_interleave(H // KV, 0)
        qe = q[e].double()
        ref_rows.append((torch.softmax(qe @ K.transpose(-1, -2) / D ** 0.5, -1) @ V).transpose(0, 1).reshape(T, H * D))
    ref = torch.stack(ref_rows)
    err = float((out.double() - ref).norm() / ref.norm())
    assert err < 1e-2, err


def test_only_small_block_forwards_reuse(model):
    """A plan that asks a full-block forward to reuse is not obeyed: every layer computes."""
    from reuse_exp.engine.model import ForwardKind
    from reuse_exp.engine.reuse import REUSED, told_plan
    dev = model.device
    runner = FastRunner(model, use_graphs=False)
    policy = FixedPolicy.create(8, k=2, subset="middle")
    cache, rc = runner.new_cache(1, 64, 32), runner.new_reuse_cache(policy, 1, 32)
    tokens = torch.randint(0, 60, (1, 32), device=dev)
    full = told_plan(policy.layers, [True], rc, 0, dev, ForwardKind.FULL_BLOCK)
    runner(tokens, ForwardKind.FULL_BLOCK, cache, 0, full)
    assert not bool(full.log[REUSED].any())
    small = told_plan(policy.layers, [True], rc, 8, dev)
    runner(tokens[:, 8:16], ForwardKind.SMALL_BLOCK, cache, 8, small)
    assert bool(small.log[REUSED].all())


@pytest.mark.parametrize("threshold", [0.0, 0.5, 2.0])
def test_adaptive_delta_on_the_fast_path_decodes_the_eager_tokens(model, threshold):
    """The segmented forward: same tokens, same skips and the same refresh drifts as the eager
    path, in a batch whose rows disagree (mixed and padded row sets)."""
    policy = DriftPolicy.create(8, drift=threshold, max_reuse=3, mode="delta")
    eager = generate(model, FIVE, DEC, policy)
    runner = FastRunner(model)
    fast = generate(model, FIVE, DEC, policy, runner=runner)
    assert fast.tokens == eager.tokens
    assert [s.layer_evals_skipped for s in fast.report.samples] == [s.layer_evals_skipped for s in eager.report.samples]
    assert fast.report.refresh_drifts == pytest.approx(eager.report.refresh_drifts, rel=1e-4, abs=1e-6)
    if threshold == 0.0:
        assert fast.tokens == generate(model, FIVE, DEC, None, runner=runner).tokens  # k=1's
    if threshold == 0.5:
        assert runner.stats["padded"] > 0, runner.stats
        trace = generate(model, FIVE, DEC, policy, runner=runner, trace_sample=None).report
        assert 0 < sum(r for _, r in trace.layer_counts.totals()) < sum(s.layer_evals_skipped for s in trace.samples)


def test_adaptive_delta_fast_path_batch_equals_solo(model):
    policy = DriftPolicy.create(8, drift=0.5, max_reuse=3, mode="delta")
    runner = FastRunner(model)
    batch = generate(model, FIVE, DEC, policy, runner=runner)
    longest = max(len(p) for p in FIVE) // 32
    # alone, a prompt gets the blocks it gets in the batch (the budget counts from the longest prompt)
    solo = [generate(model, [p], replace(DEC, max_new_tokens=DEC.max_new_tokens + 32 * (longest - len(p) // 32)),
                     policy, runner=runner) for p in FIVE]
    assert batch.tokens == [s.tokens[0] for s in solo]
    assert [s.layer_evals_skipped for s in batch.report.samples] == \
           [s.report.samples[0].layer_evals_skipped for s in solo]

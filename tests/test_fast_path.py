"""The static-shape fast path gives the eager path's tokens (CPU here; CUDA graphs on a GPU)."""
from dataclasses import replace

import pytest
import torch

from reuse_exp.engine.policies.drift import DriftPolicy
from reuse_exp.engine.config import ConfigError, ModelConfig
from reuse_exp.engine.decoding import DecodeConfig, generate
from reuse_exp.engine.fast import FastRunner
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
    """Count the layer computations the static forward runs (in segments under the adaptive
    policy), as the hooks do for eager."""
    from reuse_exp.engine.static_forward import layer_step
    calls = []

    def counting_step(*args, **kwargs):
        calls.append(1)
        return layer_step(*args, **kwargs)

    runner = FastRunner(model, use_graphs=False)
    runner.step = counting_step
    res = generate(model, [PROMPTS[0]], DEC, policy, runner=runner)
    assert res.report.samples[0].layer_evals_skipped > 0
    static_forwards = [r for r in res.report.trace if r["kind"] != "prefill"]
    assert len(calls) == sum(8 - len(r["skipped"]) for r in static_forwards)


def test_shadow_mode_needs_the_eager_path(model):
    with pytest.raises(ConfigError, match="shadow mode runs on the eager path"):
        generate(model, [PROMPTS[0]], DEC, FixedPolicy.create(8, k=2, subset="last"), shadow=True, runner=FastRunner(model))


def test_harness_picks_the_fast_path_on_a_gpu_only(model):
    from reuse_exp.evaluation.models import make_runner
    assert make_runner(model, "eager").name == "eager"
    assert make_runner(model, "fast").name.startswith("cuda-graph" if model.device.type == "cuda" else "static")
    assert make_runner(model, "auto").name == ("cuda-graph" if model.device.type == "cuda" else "eager")
    from reuse_exp.settings import RunSettings
    with pytest.raises(ConfigError, match="decode_path=turbo: use one of auto, eager, fast, compiled"):
        RunSettings.parse({"decode_path": "turbo"})


def test_random_model_is_built_in_its_dtype():
    m = random_model(CFG, "bfloat16", seed=0)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert float(m.model.norm.weight.float().mean()) == 1.0


def test_in_a_batch_only_the_rows_that_compute_a_layer_go_through_it(model):
    """Rows a forward is not for, and rows that reuse a layer, skip it: the layer computations
    the static forward runs (rows x layers) are exactly the samples' own layer evaluations."""
    from reuse_exp.engine.static_forward import layer_step
    rows = []

    def counting_step(x, *args, **kwargs):
        rows.append(x.shape[0])
        return layer_step(x, *args, **kwargs)

    runner = FastRunner(model, use_graphs=False)
    runner.step = counting_step
    res = generate(model, PROMPTS, DEC, FixedPolicy.create(8, k=2, subset="first"), runner=runner)
    assert min(len(p) for p in PROMPTS) < DEC.block_size  # no prefill: every forward is static
    evals = sum(s.layer_evals_run for s in res.report.samples)
    assert res.report.summary()["layer_evals_skipped"] > 0
    assert sum(rows) == evals
    assert sum(rows) < 3 * 8 * sum(res.report.batch_forwards.values())  # less than every row, every layer


def test_row_counts_are_padded_to_a_power_of_two_and_decode_the_same(model):
    from reuse_exp.engine.static_inputs import padded_rows
    assert padded_rows([3, 5, 6], 8) == ([3, 5, 6, 6], [0, 1, 2, 2])
    assert padded_rows([3, 5, 6], 3) == ([3, 5, 6], [0, 1, 2])
    assert padded_rows([2, 4, 5, 7, 9], 6) == ([2, 4, 5, 7, 9, 9], [0, 1, 2, 3, 4, 4])
    prompts = PROMPTS + [[20, 21, 22] * 9, [30, 31] * 20, [40, 41, 42, 43, 44] * 8]
    policy = FixedPolicy.create(8, k=2, subset="middle")
    # graphs without compiled layers: on the H200 a compiled fp32 layer rounds differently from
    # eager and one of these samples then parts at token 40 (padding aside; see test_gpu.py)
    runner = FastRunner(model, compile_layers=False)
    fast = generate(model, prompts, DEC, policy, runner=runner)
    assert runner.stats["padded"] > 0 and runner.stats["mixed"] > 0  # rows out of step: some reuse, some compute
    assert fast.tokens == generate(model, prompts, DEC, policy).tokens


@pytest.mark.parametrize("device", DEVICES)
def test_static_attention_in_bf16_matches_float64(device):
    """The fast path's attention (SDPA over the static buffer, grouped queries stacked) in bf16
    against plain attention in float64 over the valid keys."""
    from reuse_exp.engine.static_forward import attend_static
    gen = torch.Generator().manual_seed(0)
    B, H, KV, T, D, S, kv_len = 2, 8, 2, 8, 64, 256, 160

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)
    q, k, v, k_buf, v_buf = rand(B, H, T, D), rand(B, KV, T, D), rand(B, KV, T, D), rand(B, KV, S, D), rand(B, KV, S, D)
    positions = torch.arange(100, 100 + T, device=device)
    mask = torch.where(torch.arange(S, device=device) < kv_len, 0.0, float("-inf"))
    bf = [t.bfloat16() for t in (q, k, v, k_buf, v_buf)]
    out = attend_static(*bf, positions, mask.bfloat16(), None)
    K, V = k_buf.double().clone(), v_buf.double().clone()
    K[:, :, 100:100 + T], V[:, :, 100:100 + T] = k.double(), v.double()
    K, V = K[:, :, :kv_len].repeat_interleave(H // KV, 1), V[:, :, :kv_len].repeat_interleave(H // KV, 1)
    ref = torch.softmax(q.double() @ K.transpose(-1, -2) / D ** 0.5, -1) @ V
    err = float((out.double() - ref).norm() / ref.norm())
    assert err < 1e-2, err
    assert torch.equal(bf[3][:, :, 100:100 + T], bf[1])  # this forward's keys were written in place


def test_reusing_positions_never_computed_is_an_error(model):
    from reuse_exp.engine.model import ForwardKind
    from reuse_exp.engine.reuse import told_plan
    dev = model.device
    runner = FastRunner(model, use_graphs=False)
    policy = FixedPolicy.create(8, k=2, subset="middle")
    cache, rc = runner.new_cache(1, 64, 32), runner.new_reuse_cache(policy, 1, 32)
    tokens = torch.randint(0, 60, (1, 32), device=dev)
    reuse = told_plan(policy.layers, [True], rc, 8, dev)
    with pytest.raises(RuntimeError, match="never computed in this block"):
        runner(tokens[:, 8:16], ForwardKind.SMALL_BLOCK, cache, 8, reuse)
    runner(tokens, ForwardKind.FULL_BLOCK, cache, 0, told_plan(policy.layers, [False], rc, 0, dev))
    runner(tokens[:, 8:16], ForwardKind.SMALL_BLOCK, cache, 8, reuse)  # computed by the full block: fine


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
        assert runner.stats["mixed"] > 0 and runner.stats["padded"] > 0, runner.stats


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

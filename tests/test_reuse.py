"""Layer reuse: k=1 is no reuse bit for bit; skipped layers are not computed; subsets."""
import pytest
import reference
import torch

from reuse_exp.engine.config import ConfigError, ModelConfig
from reuse_exp.engine.decoding import DecodeConfig, generate
from reuse_exp.engine.loading import random_model
from reuse_exp.engine.model import ForwardKind
from reuse_exp.engine.policies.fixed import FixedPolicy
from reuse_exp.engine.reuse import resolve_subset

CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2)
DEC = DecodeConfig(mask_id=63, stop_id=62, pad_id=61, max_new_tokens=64, threshold=0.9)
PROMPTS = [[5, 6, 7, 8] * 10, [9, 10, 11] * 15]


@pytest.fixture(scope="module")
def model():
    # std 0.2 gives peaked predictions, so several tokens unmask per step and
    # small-block forwards (the only ones that may reuse) are frequent.
    return random_model(CFG, "float32", seed=0, std=0.2)


class LayerCalls:
    """Counts real executions of each decoder layer, forward by forward (module hooks)."""

    def __init__(self, model):
        self.per_forward: list[list[int]] = []
        self.handles = [model.register_forward_pre_hook(lambda m, a: self.per_forward.append([]))]
        for i, layer in enumerate(model.model.layers):
            self.handles.append(layer.register_forward_hook(lambda m, a, o, i=i: self.per_forward[-1].append(i)))

    def close(self):
        for h in self.handles:
            h.remove()


def test_subsets_on_28_layers():
    assert resolve_subset("first", 28) == tuple(range(1, 13))
    assert resolve_subset("middle", 28) == tuple(range(8, 20))
    assert resolve_subset("last", 28) == tuple(range(16, 28))
    for name in ("first", "middle", "last"):
        assert len(resolve_subset(name, 28)) == 12


def test_subsets_scale_and_differ_on_8_layers():
    subsets = {name: resolve_subset(name, 8) for name in ("first", "middle", "last")}
    assert subsets == {"first": (1, 2, 3), "middle": (2, 3, 4), "last": (5, 6, 7)}
    assert 0 not in subsets["first"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=0, subset="first"), "k must be an integer >= 1"),
    (dict(k=-2, subset="first"), "k must be an integer >= 1"),
    (dict(k=2, subset="early"), "unknown subset 'early'"),
    (dict(k=2, subset="first", mode="copy"), "unknown mode 'copy'"),
    (dict(k=2, subset="first", scope="epoch"), "unknown scope 'epoch'"),
    (dict(k=2, subset="first", size=8), "does not fit a 8-layer model"),
    (dict(k=2, subset=[1, 8]), "layer index 8 out of range"),
    (dict(k=2, subset=[-1]), "layer index -1 out of range"),
    (dict(k=2, subset=[2, 2]), "repeats a layer"),
])
def test_bad_policies_are_clear_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FixedPolicy.create(num_layers=8, **kwargs)


@pytest.fixture(scope="module")
def no_reuse(model):
    """Each prompt decoded by tests/reference.py: every layer computed, no engine or reuse code."""
    sd = dict(model.state_dict())
    return [reference.decode(sd, CFG, p, DEC) for p in PROMPTS]


def test_no_policy_decodes_as_the_reference(model, no_reuse):
    assert generate(model, PROMPTS, DEC).tokens == no_reuse


@pytest.mark.parametrize("subset", ["first", "middle", "last", (1, 6)])
@pytest.mark.parametrize("mode", ["output", "delta"])
def test_k1_decodes_as_the_reference_without_reuse(model, no_reuse, subset, mode):
    """k=1 is no reuse: the same tokens as a decoder that has no reuse code at all (a shared
    bug in the engine's no-reuse path would hide from a comparison with policy=None)."""
    got = generate(model, PROMPTS, DEC, FixedPolicy.create(8, k=1, subset=subset, mode=mode))
    assert got.tokens == no_reuse
    assert got.report.skipped_fraction == 0.0
    assert all(rec["skipped"] == [] for rec in got.report.trace)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("subset", ["first", "middle", "last"])
@pytest.mark.parametrize("scope", ["block", "refresh"])
def test_skipped_layers_are_not_computed_on_the_named_steps(model, k, subset, scope):
    policy = FixedPolicy.create(8, k=k, subset=subset, scope=scope)
    calls = LayerCalls(model)
    try:
        res = generate(model, [PROMPTS[0]], DEC, policy, trace_sample=0)
    finally:
        calls.close()
    trace = res.report.trace
    assert len(trace) == len(calls.per_forward)
    skipped_evals = 0
    since_refresh = 0
    for rec, ran in zip(trace, calls.per_forward):
        if rec["kind"] == ForwardKind.FULL_BLOCK.value:
            since_refresh = 0
        counter = rec["step"] if scope == "block" else since_refresh
        expect_skip = rec["kind"] == "small_block" and counter % k != 0
        expected = [i for i in range(8) if not (expect_skip and i in policy.layers)]
        assert ran == expected, rec
        skipped_evals += 8 - len(ran)
        if rec["kind"] in ("full_block", "small_block"):
            since_refresh += 1
    assert skipped_evals > 0, "the trajectory had no reuse step: the test proves nothing"
    assert res.report.samples[0].layer_evals_skipped == skipped_evals
    assert res.report.samples[0].layer_evals_run == sum(len(r) for r in calls.per_forward)
    totals = res.report.layer_counts.totals()
    for layer in range(8):
        assert totals[layer][1] == sum(1 for r in calls.per_forward if layer not in r)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("subset", ["first", "middle", "last"])
def test_reuse_changes_outputs_of_a_random_model(model, k, subset):
    base = generate(model, PROMPTS, DEC)
    got = generate(model, PROMPTS, DEC, FixedPolicy.create(8, k=k, subset=subset))
    assert got.report.skipped_fraction > 0
    assert got.tokens != base.tokens


def test_full_block_forwards_compute_every_layer(model):
    res = generate(model, PROMPTS, DEC, FixedPolicy.create(8, k=2, subset="middle"))
    for rec in res.report.trace:
        if rec["kind"] != "small_block":
            assert rec["skipped"] == []


def test_delta_mode_right_after_refresh_equals_recomputation(model):
    """A full-block forward refreshes every cache; a small-block forward over the same
    tokens that reuses in delta mode then gives the fresh logits."""
    from reuse_exp.engine.reuse import ReuseCache, told_plan
    policy = FixedPolicy.create(8, k=2, subset="middle", mode="delta")
    tokens = torch.randint(0, 60, (2, 64))
    logits = {}
    for reuse_now in (False, True):
        cache = model.new_cache(2, 64, 32)
        rc = ReuseCache(policy.layers, policy.mode, 2, 32, CFG.hidden_size, model.dtype, model.device)
        model(tokens[:, :32], ForwardKind.PREFILL, cache)
        model(tokens[:, 32:], ForwardKind.FULL_BLOCK, cache, 0, told_plan(policy.layers, [False] * 2, rc, 0, "cpu"))
        h = model(tokens[:, 48:56], ForwardKind.SMALL_BLOCK, cache, 16,
                  told_plan(policy.layers, [reuse_now] * 2, rc, 16, "cpu"))
        logits[reuse_now] = model.logits(h)
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-5)


def test_output_and_delta_modes_differ(model):
    out = generate(model, PROMPTS, DEC, FixedPolicy.create(8, k=2, subset="first", mode="output"))
    delta = generate(model, PROMPTS, DEC, FixedPolicy.create(8, k=2, subset="first", mode="delta"))
    assert out.tokens != delta.tokens


def test_shadow_mode_reports_error_and_changes_nothing(model):
    policy = FixedPolicy.create(8, k=3, subset="last")
    plain = generate(model, PROMPTS, DEC, policy)
    shadow = generate(model, PROMPTS, DEC, policy, shadow=True)
    assert shadow.tokens == plain.tokens
    recs = shadow.report.shadow
    assert recs and {r["layer"] for r in recs} == set(policy.layers)
    assert all(r["rel_err"] >= 0 for r in recs)
    assert any(r["rel_err"] > 1e-3 for r in recs)  # stale stand-ins are measurably off


def test_reuse_cache_shapes_and_replace_positions_are_recorded(model):
    res = generate(model, PROMPTS, DEC, FixedPolicy.create(8, k=2, subset="middle"))
    # 3 reused layers (middle of 8), 2 samples, 32 block positions, hidden size
    assert res.report.cache_shapes == {(3, 2, 32, CFG.hidden_size)}
    assert set(res.report.replace_positions) <= {0, 8, 16, 24}
    assert sum(res.report.replace_positions.values()) == res.report.batch_forwards["small_block"]


def test_a_memory_s_row_state_keeps_the_rows_that_stay():
    """Rows that finish leave a memory's state (the engine trims it): the others keep theirs, in order,
    in a buffer of the runner's for the new batch size."""
    import torch
    from reuse_exp.engine.reuse import RowState
    made = {}

    def buffer(key, shape, dtype):
        made[key] = torch.zeros(shape, dtype=dtype)
        return made[key]
    state = RowState(3, "cpu", buffer)
    state.zeros("counts", 2).copy_(torch.tensor([[1, 2], [3, 4], [5, 6]]))
    state.trim(torch.tensor([True, False, True]))
    assert state["counts"].tolist() == [[1, 2], [5, 6]] and state.batch == 2
    assert state["counts"] is made[("memory", "counts", 2, (2,), torch.long)]

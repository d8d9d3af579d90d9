"""The adaptive policy: recompute when the cache has drifted, not on a fixed clock."""
from dataclasses import replace

import pytest

from reuse_exp.engine.policies.drift import DriftPolicy, layer_groups
from reuse_exp.engine.config import ConfigError
from reuse_exp.engine.decoding import generate
from reuse_exp.engine.loading import random_model
from reuse_exp.engine.model import ForwardKind
from reuse_exp.engine.policies.fixed import FixedPolicy
from test_reuse import CFG, DEC, PROMPTS, LayerCalls

UNEVEN = PROMPTS + [[3, 4, 5] * 25]   # 75 tokens: a prompt two blocks past the others


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, "float32", seed=0, std=0.2)


def test_groups_are_contiguous_and_leave_layer_0():
    assert layer_groups(28) == (tuple(range(1, 8)), tuple(range(8, 15)), tuple(range(15, 22)), tuple(range(22, 28)))
    assert layer_groups(8) == ((1, 2), (3, 4), (5, 6), (7,))


@pytest.mark.parametrize("mode", ["delta", "replay"])
def test_a_threshold_that_never_triggers_decodes_what_k1_decodes(model, mode):
    base = generate(model, UNEVEN, DEC)
    never = generate(model, UNEVEN, DEC, DriftPolicy.create(8, drift=0.0, max_reuse=4, mode=mode))
    assert never.tokens == base.tokens
    assert never.report.skipped_fraction == 0.0
    loose = generate(model, UNEVEN, DEC, DriftPolicy.create(8, drift=10.0, max_reuse=4, mode=mode))
    assert loose.report.skipped_fraction > 0.1, "a loose threshold must reuse: the test would prove nothing"


@pytest.mark.parametrize("mode", ["delta", "replay"])
@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_batch_equals_solo(model, mode, threshold):
    cfg = replace(DEC, ignore_stop=True)
    policy = DriftPolicy.create(8, drift=threshold, max_reuse=3, mode=mode)
    batch = generate(model, UNEVEN, cfg, policy)
    for i, p in enumerate(UNEVEN):
        solo = generate(model, [p], replace(cfg, max_new_tokens=cfg.max_new_tokens + 32 * (75 // 32 - len(p) // 32)),
                        policy)
        assert batch.tokens[i] == solo.tokens[0], f"sample {i}"
        assert batch.report.samples[i].layer_evals_skipped == solo.report.samples[0].layer_evals_skipped
    assert batch.report.skipped_fraction > 0


def test_logged_skip_counts_match_what_ran(model):
    policy = DriftPolicy.create(8, drift=0.6, max_reuse=3, mode="delta")
    calls = LayerCalls(model)
    try:
        res = generate(model, [PROMPTS[0]], DEC, policy, trace_sample=0)
    finally:
        calls.close()
    trace, ran = res.report.trace, calls.per_forward
    assert len(trace) == len(ran)
    for rec, layers in zip(trace, ran):
        assert sorted(set(range(8)) - set(layers)) == rec["skipped"], rec
        if rec["kind"] != ForwardKind.SMALL_BLOCK.value:
            assert rec["skipped"] == []
    s = res.report.samples[0]
    assert s.layer_evals_run == sum(map(len, ran))
    assert s.layer_evals_skipped == sum(len(r["skipped"]) for r in trace) > 0
    totals = res.report.layer_counts.totals()
    assert [c + r for c, r in totals] == [len(ran)] * 8
    assert [r for _, r in totals] == [sum(i not in layers for layers in ran) for i in range(8)]


@pytest.mark.parametrize("cap", [1, 2])
def test_no_group_reuses_more_than_max_reuse_times_in_a_row(model, cap):
    res = generate(model, [PROMPTS[1]], DEC, DriftPolicy.create(8, drift=10.0, max_reuse=cap, mode="delta"), trace_sample=0)
    run, longest = {}, 0
    for rec in res.report.trace:
        if rec["kind"] == "full_block":
            run = {}
        for g in layer_groups(8):
            run[g] = run.get(g, 0) + 1 if set(g) <= set(rec["skipped"]) else 0
            longest = max(longest, run[g])
    assert longest == cap


def test_the_drift_that_made_a_group_recompute_is_recorded(model):
    policy = DriftPolicy.create(8, drift=0.5, max_reuse=100, mode="delta")
    res = generate(model, UNEVEN, DEC, policy)
    assert res.report.refresh_drifts and min(res.report.refresh_drifts) >= 0.5


def test_adaptive_delta_differs_from_fixed_and_asks_for_delta_or_replay(model):
    with pytest.raises(ConfigError, match="use mode=replay"):
        DriftPolicy.create(8, drift=0.1, max_reuse=4, mode="output")
    with pytest.raises(ConfigError, match="drift must be >= 0"):
        DriftPolicy.create(8, drift=-1, max_reuse=4, mode="delta")
    fixed = generate(model, UNEVEN, DEC, FixedPolicy.create(8, k=2, subset="middle", mode="delta"))
    adaptive = generate(model, UNEVEN, DEC, DriftPolicy.create(8, drift=0.6, max_reuse=1, mode="delta"))
    assert adaptive.report.skipped_fraction != fixed.report.skipped_fraction

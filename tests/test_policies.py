"""The depth-aware drift policy, with the tests every policy has (a drift that never triggers = k=1
bit for bit, batch = solo, skipped groups not computed, fast path = eager, and it skips something
on the bundled model). The registry: test_policy_registry.py."""
from dataclasses import replace

import pytest

from reuse_exp.engine.config import ConfigError
from reuse_exp.engine.decoding import generate
from reuse_exp.engine.fast import FastRunner
from reuse_exp.engine.loading import random_model
from reuse_exp.engine.policies import get
from reuse_exp.engine.policies.depth import DepthPolicy
from reuse_exp.engine.policies.drift import DriftPolicy, layer_groups
from test_fast_path import FIVE
from test_reuse import CFG, DEC, PROMPTS, LayerCalls

GROUPS = layer_groups(8)   # (1, 2), (3, 4), (5, 6), (7,)


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, "float32", seed=0, std=0.2)


def depth(drift: float, cap: int = 3) -> DepthPolicy:
    return get("depth").create(8, drift=drift, max_reuse=cap, mode="delta")


def test_depth_reads_drift_and_takes_delta_mode_only():
    assert DepthPolicy.reads == ("drift", "max_reuse", "mode")
    for mode in ("output", "replay"):
        with pytest.raises(ConfigError, match=f"the depth policy works in mode delta, not '{mode}'$"):
            depth_with_mode(mode)
    assert depth(0.5).groups == GROUPS and depth(0.5).describe()["drift"] == 0.5
    assert DepthPolicy.run_name(drift=0.5, max_reuse=3, mode="delta") == "depth_delta_drift0.5"


def depth_with_mode(mode):
    return DepthPolicy.create(8, drift=0.5, max_reuse=3, mode=mode)


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "static"])
def test_a_drift_that_never_triggers_decodes_what_k1_decodes(model, fast):
    runner = FastRunner(model) if fast else None
    base = generate(model, FIVE, DEC, runner=runner)
    never = generate(model, FIVE, DEC, depth(0.0), runner=runner)
    assert never.tokens == base.tokens
    assert never.report.skipped_fraction == 0.0


def prefix_of_groups(skipped: list[int]) -> bool:
    """Whether `skipped` is the layers of the groups below some group: what depth may skip."""
    return any(skipped == [i for g in GROUPS[:j] for i in g] for j in range(len(GROUPS) + 1))


@pytest.mark.parametrize("drift", [0.3, 0.6, 2.0])
def test_skipped_groups_are_those_below_the_first_that_drifted_and_are_not_computed(model, drift):
    calls = LayerCalls(model)
    try:
        res = generate(model, [PROMPTS[0]], DEC, depth(drift), trace_sample=0)
    finally:
        calls.close()
    trace, ran = res.report.trace, calls.per_forward
    assert len(trace) == len(ran)
    for rec, layers in zip(trace, ran):
        assert sorted(set(range(8)) - set(layers)) == rec["skipped"], rec   # a skipped layer did not run
        assert prefix_of_groups(rec["skipped"]), rec
        if rec["kind"] != "small_block":
            assert rec["skipped"] == []
    assert res.report.samples[0].layer_evals_skipped > 0
    assert any(r["kind"] == "small_block" and not r["skipped"] for r in trace), "no refresh: proves little"


def test_depth_differs_from_adaptive(model):
    """The same drift, groups and cap: depth refreshes every group above a drifted one."""
    adaptive = generate(model, FIVE, DEC, DriftPolicy.create(8, drift=0.6, max_reuse=3, mode="delta"), trace_sample=0)
    deep = generate(model, FIVE, DEC, depth(0.6), trace_sample=0)
    assert not all(prefix_of_groups(r["skipped"]) for r in adaptive.report.trace)
    assert deep.report.skipped_fraction < adaptive.report.skipped_fraction


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "static"])
def test_batch_equals_solo(model, fast):
    cfg = replace(DEC, ignore_stop=True)
    runner = FastRunner(model) if fast else None
    policy = depth(0.6)
    batch = generate(model, FIVE, cfg, policy, runner=runner)
    longest = max(len(p) for p in FIVE) // 32
    for i, p in enumerate(FIVE):
        solo = generate(model, [p], replace(cfg, max_new_tokens=cfg.max_new_tokens + 32 * (longest - len(p) // 32)),
                        policy, runner=runner)
        assert batch.tokens[i] == solo.tokens[0], f"sample {i}"
        assert batch.report.samples[i].layer_evals_skipped == solo.report.samples[0].layer_evals_skipped
    assert batch.report.skipped_fraction > 0


@pytest.mark.parametrize("drift", [0.3, 0.6])
def test_the_static_path_decodes_the_eager_tokens_and_runs_only_what_it_does_not_skip(model, drift):
    from reuse_exp.engine.static_forward import layer_step
    rows = []

    def counting_step(x, *args, **kwargs):
        rows.append(x.shape[0])
        return layer_step(x, *args, **kwargs)

    policy = depth(drift)
    eager = generate(model, FIVE, DEC, policy)
    runner = FastRunner(model, use_graphs=False)
    fast = generate(model, FIVE, DEC, policy, runner=runner)
    assert fast.tokens == eager.tokens
    assert [s.layer_evals_skipped for s in fast.report.samples] == [s.layer_evals_skipped for s in eager.report.samples]
    assert fast.report.refresh_drifts == pytest.approx(eager.report.refresh_drifts, rel=1e-4, abs=1e-6)
    solo = FastRunner(model, use_graphs=False)
    solo.step = counting_step
    one = generate(model, [PROMPTS[0]], DEC, policy, runner=solo, trace_sample=0)
    assert one.report.samples[0].layer_evals_skipped > 0
    assert sum(rows) == sum(8 - len(r["skipped"]) for r in one.report.trace)


def test_it_skips_on_the_bundled_model():
    from reuse_exp.engine.loading import decode_config_for, load_model, load_tokenizer
    from reuse_exp.tiny import MODEL_DIR
    from reuse_exp.tiny import data as tiny_data
    model, _ = load_model(MODEL_DIR, dtype="float32")
    tok = load_tokenizer(MODEL_DIR)
    docs = tiny_data.read_task_docs("tiny_gsm_test.jsonl")[:4]
    prompts = [tok(tiny_data.gsm_prompt(tok, d), add_special_tokens=False)["input_ids"] for d in docs]
    cfg = decode_config_for(tok, max_new_tokens=64)
    base = generate(model, prompts, cfg)
    never = generate(model, prompts, cfg, get("depth").create(model.num_layers, drift=0.0, max_reuse=4, mode="delta"))
    assert never.tokens == base.tokens
    res = generate(model, prompts, cfg, get("depth").create(model.num_layers, drift=0.5, max_reuse=4, mode="delta"))
    assert res.report.skipped_fraction > 0.05, res.report.skipped_fraction

"""What output-mode reuse is: a replay of the previous computed step's logits, for every subset.

And the `replay` mode, the control that skips the whole forward on reuse steps, decodes
exactly the tokens of output mode.
"""
from dataclasses import replace

import pytest
import torch

from reuse_exp.engine.decoding import DecodeConfig, generate
from reuse_exp.engine.loading import decode_config_for, load_model, load_tokenizer, random_model
from reuse_exp.engine.model import ForwardKind
from reuse_exp.engine.policies.fixed import FixedPolicy
from reuse_exp.engine.reuse import ReuseCache, told_plan
from reuse_exp.tiny import MODEL_DIR
from reuse_exp.tiny import data as tiny_data
from test_reuse import CFG, PROMPTS, LayerCalls

SUBSETS = ["first", "middle", "last"]


@pytest.fixture(scope="module")
def random_tiny():
    return random_model(CFG, "float32", seed=0, std=0.2)


@pytest.fixture(scope="module")
def bundled():
    model, _ = load_model(MODEL_DIR, dtype="float32")
    tok = load_tokenizer(MODEL_DIR)
    docs = tiny_data.read_task_docs("tiny_gsm_test.jsonl")[:16]
    prompts = [tok(tiny_data.gsm_prompt(tok, d), add_special_tokens=False)["input_ids"] for d in docs]
    return model, decode_config_for(tok, max_new_tokens=96), prompts


def window_logits(model, hidden, positions):
    return model.logits(hidden[:, positions]).float()


@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("mode", ["output", "delta"])
def test_a_reuse_steps_logits_against_the_full_block_step_before(random_tiny, subset, mode):
    """Full-block forward (every layer computed and cached), then two tokens of the window are
    unmasked and a small-block forward reuses the subset. In output mode its logits equal the
    full-block step's bit for bit (but the window's first position, predicted from itself); in
    delta mode, and without reuse, they change."""
    model, mask = random_tiny, 63
    policy = FixedPolicy.create(8, k=2, subset=subset, mode=mode)
    prefix = torch.arange(1, 33)[None]
    block = torch.full((1, 32), mask)
    block[0, :8] = torch.tensor([7, 9, 11, 13, 15, 17, 19, 21])
    cache = model.new_cache(1, 64, 32)
    model(prefix, ForwardKind.PREFILL, cache)
    rc = ReuseCache(policy.layers, policy.mode, 1, 32, CFG.hidden_size, model.dtype, model.device)
    full = model(block, ForwardKind.FULL_BLOCK, cache, 0, told_plan(policy.layers, [False], rc, 0, "cpu"))
    before = window_logits(model, full, [max(p - 1, 0) for p in range(8, 16)])
    block[0, 8:10] = torch.tensor([23, 25])   # unmasked by that step
    saved = cache.k.clone(), cache.v.clone()
    small = model(block[:, 8:16], ForwardKind.SMALL_BLOCK, cache, 8, told_plan(policy.layers, [True], rc, 8, "cpu"))
    after = window_logits(model, small, [max(p - 1, 0) for p in range(8)])
    cache.k, cache.v = saved
    fresh = window_logits(model, model(block[:, 8:16], ForwardKind.SMALL_BLOCK, cache, 8), [max(p - 1, 0) for p in range(8)])
    assert not torch.equal(fresh[:, 1:], before[:, 1:]), "the unmasked tokens must change a fresh step"
    assert torch.equal(after[:, 1:], before[:, 1:]) == (mode == "output")


@pytest.mark.parametrize("subset", SUBSETS)
def test_every_output_mode_reuse_step_replays_unchanged_logits(bundled, subset):
    model, cfg, prompts = bundled
    out = generate(model, prompts, cfg, FixedPolicy.create(8, k=2, subset=subset, mode="output")).report.summary()
    delta = generate(model, prompts, cfg, FixedPolicy.create(8, k=2, subset=subset, mode="delta")).report.summary()
    assert out["reuse_steps"] > 20
    assert out["unchanged_reuse_steps"] == out["reuse_steps"]
    assert delta["reuse_steps"] > 20 and delta["unchanged_reuse_steps"] == 0


@pytest.mark.parametrize("k", [2, 3])
def test_replay_decodes_output_modes_tokens_without_running_the_model(bundled, k):
    model, cfg, prompts = bundled
    output = generate(model, prompts, cfg, FixedPolicy.create(8, k=k, subset="middle", mode="output"))
    calls = LayerCalls(model)
    try:
        replay = generate(model, prompts, cfg, FixedPolicy.create(8, k=k, subset="middle", mode="replay"))
    finally:
        calls.close()
    assert replay.tokens == output.tokens
    s = replay.report.summary()
    assert s["sample_forwards"]["replay"] == output.report.summary()["reuse_steps"] > 0
    model_calls = sum(n for kind, n in s["batch_forwards"].items() if kind != "replay")
    assert len(calls.per_forward) == model_calls   # a step every row replays calls nothing
    assert s["layer_evals_skipped"] == s["sample_forwards"]["replay"] * model.num_layers


def test_replay_in_a_batch_equals_each_sample_alone(random_tiny):
    cfg = replace(DecodeConfig(mask_id=63, stop_id=62, pad_id=61, max_new_tokens=64, threshold=0.9),
                  ignore_stop=True)
    policy = FixedPolicy.create(8, k=2, subset="first", mode="replay")
    batch = generate(random_tiny, PROMPTS, cfg, policy)
    assert batch.report.summary()["sample_forwards"].get("replay", 0) > 0
    for i, p in enumerate(PROMPTS):
        solo = generate(random_tiny, [p], replace(cfg, max_new_tokens=64), policy)
        assert batch.tokens[i] == solo.tokens[0], f"sample {i}"

"""Batched decoding: finished samples leave every cache; batches equal solo runs."""
from dataclasses import replace

import pytest

from reuse_exp.engine.config import ConfigError, ModelConfig
from reuse_exp.engine.decoding import DecodeConfig, generate
from reuse_exp.engine.loading import random_model
from reuse_exp.engine.policies.fixed import FixedPolicy

CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2)
BASE = DecodeConfig(mask_id=63, stop_id=62, pad_id=61, max_new_tokens=64, threshold=0.9)
# Lengths 40, 19 and 75: partial first blocks, one prompt reaching two blocks past the others.
PROMPTS = [[5, 6, 7, 8] * 10, [9, 10, 11, 12, 13] * 3 + [14] * 4, list(range(1, 26)) * 3]


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, "float32", seed=0, std=0.2)


def _early_stop_token(model):
    """A token the second prompt generates early and the others never do: as the stop
    token it makes exactly one sample finish early. The model and prompts are fixed, so
    this is the same token on every run; no such token is a failure, never a skip."""
    runs = [generate(model, [p], replace(BASE, ignore_stop=True)).tokens[0] for p in PROMPTS]
    others = set(runs[0]) | set(runs[2])
    early = [t for t in runs[1][:20] if t not in others and t not in (BASE.mask_id, BASE.pad_id)]
    assert early, "the fixed random model gave no token unique to the second prompt: pick another seed"
    return early[0]


def _solo_budget(cfg, prompt, batch_prompts):
    """The max_new_tokens that gives a prompt alone the blocks it gets in the batch: the
    decoder runs max_new_tokens // block + longest prompt // block blocks for every sample."""
    bs = cfg.block_size
    extra = max(len(p) for p in batch_prompts) // bs - len(prompt) // bs
    return cfg.max_new_tokens + extra * bs


@pytest.mark.parametrize("policy_args", [None, (2, "middle", "output"), (2, "last", "delta"), (3, "first", "output")])
def test_batch_with_an_early_finisher_equals_each_sample_alone(model, policy_args):
    cfg = replace(BASE, stop_id=_early_stop_token(model))
    policy = FixedPolicy.create(8, k=policy_args[0], subset=policy_args[1], mode=policy_args[2]) if policy_args else None
    batch = generate(model, PROMPTS, cfg, policy)
    alone = [generate(model, [p], replace(cfg, max_new_tokens=_solo_budget(cfg, p, PROMPTS)), policy)
             for p in PROMPTS]
    stats = batch.report.samples
    assert stats[1].finished and not all(s.finished for s in stats)  # one leaves early, the batch goes on
    for i, solo in enumerate(alone):
        # Every sample in full, with the same budget: an empty or cut sample fails here.
        assert len(solo.tokens[0]) > 0
        assert batch.tokens[i] == solo.tokens[0], f"sample {i}"
        assert stats[i].finished == solo.report.samples[0].finished
        assert stats[i].generated_tokens == len(solo.tokens[0])
        # (a finished sample still rides along in its block's finalize; alone it need not)
        for kind in ("full_block", "small_block"):
            assert stats[i].forwards[kind] == solo.report.samples[0].forwards[kind], (i, kind)
        assert stats[i].layer_evals_skipped == solo.report.samples[0].layer_evals_skipped
    if policy is not None:
        assert batch.report.skipped_fraction > 0


def test_generated_tokens_stop_at_the_stop_token_and_never_count_pad(model):
    cfg = replace(BASE, stop_id=_early_stop_token(model))
    res = generate(model, PROMPTS, cfg)
    out = res.tokens[1]
    assert out[-1] == cfg.stop_id and cfg.stop_id not in out[:-1]
    assert cfg.pad_id not in out
    assert res.report.samples[1].generated_tokens == len(out)
    assert res.report.generated_tokens == sum(len(t) for t in res.tokens)


def test_finished_samples_are_trimmed_from_every_cache(model):
    cfg = replace(BASE, stop_id=_early_stop_token(model))
    res = generate(model, PROMPTS, cfg, FixedPolicy.create(8, k=2, subset="middle"))
    shapes = sorted(res.report.cache_shapes)
    assert {s[1] for s in shapes} == {3, 2}  # the reuse cache shrank with the batch


def test_ignore_stop_runs_the_whole_budget(model):
    cfg = replace(BASE, ignore_stop=True, max_new_tokens=64)
    res = generate(model, [[1, 2, 3, 4, 5]], cfg)
    # blocks = 64 // 32 + 5 // 32 = 2: positions 5..63 plus the token after the last block
    assert len(res.tokens[0]) == 64 - 5 + 1
    assert res.report.batch_forwards["finalize"] == 2


@pytest.mark.parametrize("changes, message", [
    (dict(small_block_size=7), "must divide block_size"),
    (dict(threshold=1.5), "threshold must lie in"),
    (dict(max_new_tokens=0), "max_new_tokens must be"),
])
def test_bad_decode_settings_are_clear_errors(model, changes, message):
    with pytest.raises(ConfigError, match=message):
        generate(model, [[1, 2]], replace(BASE, **changes))


def test_empty_prompt_is_an_error(model):
    with pytest.raises(ConfigError, match="at least one token"):
        generate(model, [[1, 2], []], BASE)

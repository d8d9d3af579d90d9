"""The cached forward kinds against a plain reference computation (fp32, 1e-5)."""
import pytest
import torch

from reference import full_sequence, small_block
from reuse_exp.engine.config import ModelConfig
from reuse_exp.engine.loading import random_model
from reuse_exp.engine.model import ForwardKind

CONFIGS = [
    ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2),
    ModelConfig(vocab_size=61, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=6, num_key_value_heads=1, rope_theta=10000.0),
    ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True),
]
BS, TOL = 32, 1e-5


def _setup(cfg, seed, batch=2, prefix_blocks=2):
    torch.manual_seed(seed)
    model = random_model(cfg, "float32", seed=seed, std=0.1)
    sd = {k: v for k, v in model.state_dict().items()}
    tokens = torch.randint(0, cfg.vocab_size, (batch, (prefix_blocks + 1) * BS))
    return model, sd, tokens


@pytest.mark.parametrize("cfg", CONFIGS)
def test_prefill_full_block_finalize_match_reference(cfg):
    model, sd, tokens = _setup(cfg, 0)
    ref, _ = full_sequence(sd, cfg, tokens, BS)
    P = tokens.shape[1] - BS
    cache = model.new_cache(tokens.shape[0], tokens.shape[1], BS)
    prefill = model.logits(model(tokens[:, :P], ForwardKind.PREFILL, cache))
    torch.testing.assert_close(prefill, ref[:, :P], atol=TOL, rtol=0)
    assert cache.prefix_len == P
    full = model.logits(model(tokens[:, P:], ForwardKind.FULL_BLOCK, cache))
    torch.testing.assert_close(full, ref[:, P:], atol=TOL, rtol=0)
    assert cache.prefix_len == P  # a full-block forward commits nothing
    final = model.logits(model(tokens[:, P:], ForwardKind.FINALIZE, cache))
    torch.testing.assert_close(final, ref[:, P:], atol=TOL, rtol=0)
    assert cache.prefix_len == P + BS


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("replace_position", [0, 8, 16, 24])
def test_small_block_matches_reference_with_stale_block_keys(cfg, replace_position):
    """Keys outside the window come from the full-block forward over the *old* block;
    the window's own keys are fresh: the block-cache semantics of the public code."""
    model, sd, tokens = _setup(cfg, 1)
    P = tokens.shape[1] - BS
    cache = model.new_cache(tokens.shape[0], tokens.shape[1], BS)
    model(tokens[:, :P], ForwardKind.PREFILL, cache)
    model(tokens[:, P:], ForwardKind.FULL_BLOCK, cache)
    _, kvs = full_sequence(sd, cfg, tokens, BS)  # K/V of prefix + old block, as cached

    window = torch.randint(0, cfg.vocab_size, (tokens.shape[0], 8))  # new tokens in the window
    got = model.logits(model(window, ForwardKind.SMALL_BLOCK, cache, replace_position))
    want = small_block(sd, cfg, window, P + replace_position, kvs)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_small_block_on_unchanged_block_equals_full_sequence():
    cfg = CONFIGS[0]
    model, sd, tokens = _setup(cfg, 2)
    ref, _ = full_sequence(sd, cfg, tokens, BS)
    P = tokens.shape[1] - BS
    cache = model.new_cache(tokens.shape[0], tokens.shape[1], BS)
    model(tokens[:, :P], ForwardKind.PREFILL, cache)
    model(tokens[:, P:], ForwardKind.FULL_BLOCK, cache)
    got = model.logits(model(tokens[:, P + 8:P + 16], ForwardKind.SMALL_BLOCK, cache, 8))
    torch.testing.assert_close(got, ref[:, P + 8:P + 16], atol=TOL, rtol=0)


def test_prefill_of_partial_prefix_then_blocks():
    """Prefix built in two prefills and a finalize gives the same K/V as one prefill."""
    cfg = CONFIGS[0]
    model, sd, tokens = _setup(cfg, 3, prefix_blocks=3)
    ref, _ = full_sequence(sd, cfg, tokens, BS)
    cache = model.new_cache(tokens.shape[0], tokens.shape[1], BS)
    model(tokens[:, :BS], ForwardKind.PREFILL, cache)
    model(tokens[:, BS:2 * BS], ForwardKind.FINALIZE, cache)
    out = model.logits(model(tokens[:, 2 * BS:3 * BS], ForwardKind.FULL_BLOCK, cache))
    torch.testing.assert_close(out, ref[:, 2 * BS:3 * BS], atol=TOL, rtol=0)


def test_wrong_block_length_is_an_error():
    model, _, tokens = _setup(CONFIGS[0], 4)
    cache = model.new_cache(2, tokens.shape[1], BS)
    with pytest.raises(ValueError, match="takes 32 tokens"):
        model(tokens[:, :16], ForwardKind.FULL_BLOCK, cache)

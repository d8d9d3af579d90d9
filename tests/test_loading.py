"""Loading the real checkpoint layout by parameter name, and the real tokenizer, offline."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from reuse_exp.engine.config import ConfigError, ModelConfig
from reuse_exp.engine.decoding import DecodeConfig, generate
from reuse_exp.engine.loading import (CheckpointError, decode_config_for, expected_parameters, load_model,
                               load_tokenizer, random_model, save_model, token_ids)
from reuse_exp.engine.model import ForwardKind

REAL = Path(__file__).resolve().parents[2] / "shared" / "fast_dllm_v2_7b"
needs_real = pytest.mark.skipif(not (REAL / "config.json").is_file(), reason="../shared/fast_dllm_v2_7b not present")


def real_index() -> dict:
    return json.loads((REAL / "model.safetensors.index.json").read_text())["weight_map"]


def shrunk_config() -> dict:
    """The real config.json at a shrunken shape (same names, same layer count)."""
    d = json.loads((REAL / "config.json").read_text())
    d.update(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, vocab_size=151680)
    return d


@needs_real
def test_all_339_index_names_map_to_parameters():
    cfg = ModelConfig.from_json_file(REAL / "config.json")
    names = set(real_index())
    assert len(names) == 339
    assert names == set(expected_parameters(cfg))


@needs_real
def test_real_shapes_of_the_7b_config():
    shapes = expected_parameters(ModelConfig.from_json_file(REAL / "config.json"))
    assert shapes["model.embed_tokens.weight"] == (152064, 3584)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (512, 3584)
    assert shapes["model.layers.27.mlp.down_proj.weight"] == (3584, 18944)
    assert shapes["lm_head.weight"] == (152064, 3584)


def write_sharded(tmp_path: Path, config: dict, drop=None, add=None, reshape=None) -> Path:
    """A checkpoint with the real index's names and shard layout at the config's shape."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(config))
    shapes = expected_parameters(ModelConfig.from_dict(config))
    gen = torch.Generator().manual_seed(0)
    weight_map = dict(real_index())
    shards: dict[str, dict] = {}
    for name, shard in weight_map.items():
        if name == drop:
            continue
        shape = reshape[1] if reshape and name == reshape[0] else shapes[name]
        std = 0.0 if name.endswith("norm.weight") else 0.05
        t = torch.randn(shape, generator=gen) * std + (1.0 if name.endswith("norm.weight") else 0.0)
        shards.setdefault(shard, {})[name] = t.to(torch.bfloat16)
    if add:
        shards["model-00004-of-00004.safetensors"][add] = torch.zeros(2)
        weight_map[add] = "model-00004-of-00004.safetensors"
    if drop:
        weight_map.pop(drop)
    for shard, tensors in shards.items():
        save_file(tensors, ckpt / shard)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return ckpt


@needs_real
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_shrunken_sharded_checkpoint_loads_and_runs(tmp_path, dtype):
    ckpt = write_sharded(tmp_path, shrunk_config())
    model, path = load_model(ckpt, dtype=dtype)
    assert path == ckpt and model.dtype == getattr(torch, dtype) and model.num_layers == 28
    assert not any(p.is_meta for p in model.parameters()) and not model.inv_freq.is_meta
    cache = model.new_cache(1, 64, 32)
    h = model(torch.arange(32)[None], ForwardKind.PREFILL, cache)
    assert torch.isfinite(model.logits(h).float()).all()
    res = generate(model, [[1, 2, 3, 4, 5, 6, 7]], DecodeConfig(max_new_tokens=32, threshold=0.9))
    assert len(res.tokens[0]) > 0


@needs_real
@pytest.mark.parametrize("change, message", [
    (dict(drop="model.layers.3.self_attn.k_proj.bias"), "lacks 1 tensor.*model.layers.3.self_attn.k_proj.bias"),
    (dict(add="model.layers.0.self_attn.rotary_emb.inv_freq"), "unexpected tensor.*rotary_emb.inv_freq"),
    (dict(reshape=("model.layers.5.mlp.up_proj.weight", (47, 32))), "model.layers.5.mlp.up_proj.weight has shape"),
])
def test_missing_extra_and_misshaped_tensors_are_named(tmp_path, change, message):
    ckpt = write_sharded(tmp_path, shrunk_config(), **change)
    with pytest.raises(CheckpointError, match=message):
        load_model(ckpt)


def test_single_file_checkpoint_round_trips(tmp_path):
    model = random_model("tiny", "float32", seed=3)
    save_model(model, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m", dtype="float32")
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_tied_embeddings_load_tied(tmp_path):
    cfg = ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    save_model(random_model(cfg, seed=1), tmp_path / "t")
    loaded, _ = load_model(tmp_path / "t", dtype="float32")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_missing_model_and_bad_dtype_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        load_model(tmp_path / "empty")
    save_model(random_model("tiny"), tmp_path / "m")
    with pytest.raises(ConfigError, match="unknown dtype"):
        load_model(tmp_path / "m", dtype="int3")


def test_unsupported_model_type_is_an_error():
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'"):
        ModelConfig.from_dict({"model_type": "llama"})


LOAD_AND_MEASURE = r"""
import sys, threading, time
from reuse_exp.engine.loading import load_model

def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

peak = [anon_kb()]
stop = False
def sample():
    while not stop:
        peak[0] = max(peak[0], anon_kb())
        time.sleep(0.001)
base = anon_kb()
t = threading.Thread(target=sample); t.start()
model, _ = load_model(sys.argv[1], dtype="float32")
stop = True; t.join()
peak[0] = max(peak[0], anon_kb())
print((peak[0] - base) * 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_loading_holds_one_copy_of_the_weights(tmp_path):
    """Peak anonymous memory while loading stays near one copy of the weights (the model is
    built on the meta device; each tensor is read once into its parameter)."""
    cfg = ModelConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=2)
    model = random_model(cfg, "float32")
    size = sum(p.numel() * 4 for p in model.parameters())
    save_model(model, tmp_path / "big")
    del model
    out = subprocess.run([sys.executable, "-c", LOAD_AND_MEASURE, str(tmp_path / "big")],
                         capture_output=True, text=True, check=True, timeout=300)
    peak = int(out.stdout.strip().splitlines()[-1])
    assert peak < 1.4 * size, f"loading peaked at {peak / size:.2f}x the weights"


@needs_real
def test_real_tokenizer_loads_offline_without_remote_code(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # stdin closed: a trust_remote_code prompt would fail instead of hanging
    tok = load_tokenizer(REAL)
    ids = token_ids(tok)
    assert (ids.mask, ids.stop, ids.pad) == (151665, 151645, 151643)
    cfg = decode_config_for(tok)
    assert (cfg.mask_id, cfg.stop_id, cfg.pad_id) == (151665, 151645, 151643)
    text = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.convert_ids_to_tokens(151665) == "|<MASK>|"


@pytest.mark.hub
def test_hub_1p5b_matches_its_remote_code():
    """Needs network and the hub: the public remote code and this engine agree on logits."""
    pytest.importorskip("transformers")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        pytest.skip("HF_HUB_OFFLINE=1")
    try:
        import socket
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        pytest.skip("no network: the hub is unreachable")
    from transformers import AutoModelForCausalLM
    repo = "Efficient-Large-Model/Fast_dLLM_v2_1.5B"
    ours, ckpt = load_model(repo, dtype="float32")
    try:
        theirs = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True, torch_dtype=torch.float32)
    except Exception as e:  # the remote code breaks on transformers >= 5 (facts doc)
        pytest.skip(f"the public remote code does not load here: {type(e).__name__}: {e}")
    tokens = torch.arange(100, 164)[None]
    ref = theirs(input_ids=tokens, use_cache=False).logits
    cache = ours.new_cache(1, 64, 32)
    got = ours.logits(ours(tokens, ForwardKind.PREFILL, cache))
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)


def test_projections_load_stacked_and_state_dict_speaks_checkpoint_names(tmp_path):
    """q/k/v (and gate/up) are one matrix each after loading; state_dict() and save_model still
    give the checkpoint's separate tensors, in the checkpoint's order, and load back equal."""
    cfg = ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    save_model(random_model(cfg, seed=1), tmp_path / "m")
    from safetensors.torch import load_file
    on_disk = load_file(tmp_path / "m" / "model.safetensors")
    model, _ = load_model(tmp_path / "m", dtype="float32")
    a, m = model.model.layers[1].self_attn, model.model.layers[1].mlp
    p = "model.layers.1."
    assert torch.equal(a.qkv_proj.weight, torch.cat([on_disk[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]))
    assert torch.equal(a.qkv_proj.bias, torch.cat([on_disk[p + f"self_attn.{x}_proj.bias"] for x in "qkv"]))
    assert torch.equal(m.gate_up_proj.weight, torch.cat([on_disk[p + f"mlp.{x}_proj.weight"] for x in ("gate", "up")]))
    assert not any("q_proj" in n or "gate_proj" in n for n, _ in model.named_parameters())
    sd = model.state_dict()
    assert list(sd)[1:13] == ["model.layers.0." + n for n in (  # the checkpoint's (and random_model's) order
        "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
        "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
        "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")]
    assert set(sd) == set(on_disk)
    assert all(torch.equal(sd[n], t) for n, t in on_disk.items())
    fresh = random_model(cfg, seed=2)
    fresh.load_state_dict(sd)  # the checkpoint's names load into the stacked parameters
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))


def test_loaded_and_random_models_need_no_grad(tmp_path):
    save_model(random_model("tiny", seed=3), tmp_path / "m")
    for model in (random_model("tiny"), load_model(tmp_path / "m", dtype="float32")[0]):
        assert not any(p.requires_grad for p in model.parameters())

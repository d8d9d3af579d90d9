"""The bundled tiny model: shipped files, tokenizer, accuracy, live reuse, and its training script."""
from __future__ import annotations

import json
import random

import pytest
import torch

from reuse_exp.tiny import data as tiny_data
from reuse_exp.tiny import MODEL_DIR as TINY_MODEL_DIR
from reuse_exp.engine.loading import load_model, load_tokenizer, token_ids
from reuse_exp.engine.policies.fixed import FixedPolicy
from reuse_exp.engine.reuse import SUBSETS, resolve_subset
from reuse_exp.tiny.table import evaluate_gsm, is_correct

SLICE = 40   # first items of the held-out test split


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    model, _ = load_model(TINY_MODEL_DIR, dtype="float32")
    return model


@pytest.fixture(scope="module")
def docs():
    return tiny_data.read_task_docs("tiny_gsm_test.jsonl")[:SLICE]


@pytest.fixture(scope="module")
def baseline(model, tokenizer, docs):
    return evaluate_gsm(model, tokenizer, docs, batch_size=SLICE)


def test_shipped_files_and_size():
    files = {p.name for p in TINY_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "training.json", "README.md"} <= files
    assert sum(p.stat().st_size for p in TINY_MODEL_DIR.iterdir()) <= 20 * 2**20
    config = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "Fast_dLLM_Qwen"
    assert config["num_hidden_layers"] >= 8


def test_subsets_differ_and_are_recorded(model):
    subsets = {s: resolve_subset(s, model.num_layers) for s in SUBSETS}
    assert len(set(subsets.values())) == 3
    recorded = json.loads((TINY_MODEL_DIR / "training.json").read_text())["subsets"]
    assert {s: tuple(v) for s, v in recorded.items()} == subsets
    readme = (TINY_MODEL_DIR / "README.md").read_text()
    assert all(f"| {s} | {list(v)} |" in readme for s, v in subsets.items())


def test_tokenizer_special_tokens_and_chat_template(tokenizer):
    ids = token_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens([ids.mask, ids.stop, ids.pad]) == ["|<MASK>|", "<|im_end|>", "<|endoftext|>"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Question: 1?\nAnswer:"}],
                                         tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nQuestion: 1?\nAnswer:<|im_end|>\n<|im_start|>assistant\n")
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(encoded) == text   # character level: lossless round trip
    assert encoded[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_accuracy_on_heldout_slice(baseline, docs):
    assert baseline.accuracy >= 0.9, [t for t, d in zip(baseline.texts, docs) if not is_correct(t, d)][:3]
    assert baseline.skipped_fraction == 0.0


def test_reuse_k3_last_output_mode_changes_outputs(model, tokenizer, docs, baseline):
    policy = FixedPolicy.create(model.num_layers, k=3, subset="last", mode="output")
    reused = evaluate_gsm(model, tokenizer, docs, policy, batch_size=SLICE)
    assert reused.skipped_fraction > 0.0
    assert sum(a != b for a, b in zip(reused.texts, baseline.texts)) >= 1


# -- the training script ------------------------------------------------------------------------
def test_training_objective_hides_every_target():
    """Changing a target token changes nothing its own prediction reads."""
    from reuse_exp.tiny.train import TrainConfig, init_model, two_copy_mask
    T, bs, start = 128, 32, 32
    model = init_model(TrainConfig(hidden=32, intermediate=64, layers=2, heads=2, kv_heads=1), "cpu").eval()
    pos = torch.arange(T)
    x0 = torch.randint(0, 90, (1, T))
    x_t = x0.clone()
    x_t[0, 70:90] = 99

    def hidden(x0, x_t):
        return model.forward_masked(torch.cat((x_t[:, start:], x0), 1), torch.cat((pos[start:], pos)),
                                    two_copy_mask(T, bs, "cpu", start))

    base = hidden(x0, x_t)
    for p, source in ((75, 75 - 1 - start), (96, (T - start) + 96 - 1)):   # inside a block; a block start
        changed = x0.clone()
        changed[0, p] = (changed[0, p] + 1) % 90
        changed_t = torch.where(x_t == 99, x_t, changed)
        after = hidden(changed, changed_t)
        assert torch.equal(base[0, source], after[0, source])
        assert not torch.equal(base, after)


def test_fast_encoder_matches_tokenizer(tokenizer):
    from reuse_exp.tiny.train import FastEncoder
    enc = FastEncoder(tokenizer, "tiny_gsm")
    doc = tiny_data.make_gsm(random.Random(3))
    enc.check(f"Question: {doc['question']}\nAnswer:", doc["answer"])
    prompt, completion = enc(f"Question: {doc['question']}\nAnswer:", doc["answer"])
    assert tokenizer.decode(prompt) == tiny_data.gsm_prompt(tokenizer, doc)
    assert completion[-1] == token_ids(tokenizer).stop


def test_train_script_writes_the_shipped_files(tmp_path):
    from reuse_exp.tiny.train import main
    main(["--out", str(tmp_path), "--steps", "2", "--pool", "64", "--batch", "2", "--hidden", "32",
          "--intermediate", "64", "--warmup", "1", "--eval-limit", "0"])
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in TINY_MODEL_DIR.iterdir()}
    model, _ = load_model(tmp_path, dtype="float32")
    assert model.num_layers == 8
    assert token_ids(load_tokenizer(tmp_path)) == token_ids(load_tokenizer(TINY_MODEL_DIR))


def test_block_aligned_prompt_decodes_the_same_in_a_batch(model, tokenizer):
    from reuse_exp.engine.decoding import generate
    from reuse_exp.engine.loading import decode_config_for
    every = tiny_data.read_task_docs("tiny_gsm_test.jsonl")
    prompts = [tokenizer(tiny_data.gsm_prompt(tokenizer, d), add_special_tokens=False)["input_ids"] for d in every]
    aligned = next(p for p in prompts if len(p) % 32 == 0)
    shortest = min(prompts, key=len)
    assert len(shortest) < len(aligned)
    cfg = decode_config_for(tokenizer, max_new_tokens=160)
    alone = generate(model, [aligned], cfg, trace_sample=None).tokens[0]
    batched = generate(model, [shortest, aligned], cfg, trace_sample=None).tokens[1]
    assert batched == alone

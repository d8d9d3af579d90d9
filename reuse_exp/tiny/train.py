"""Train the bundled tiny Fast-dLLM v2 model: `reuse-exp tiny train --out DIR [--device cuda]`.

Writes exactly the files that reuse_exp/tiny/model ships: config.json, model.safetensors
(bfloat16), tokenizer.json, tokenizer_config.json, training.json (settings, loss curve)
and README.md (model card). Its accuracy is measured by tracked runs (`reuse-exp run`,
`reuse-exp frontier`), never here.

Data (reuse_exp/tiny_data.py). A stream of GSM8K-shaped word problems from five
templates (buy/give, bags x size + found, shop sells twice, pages per week x weeks,
share equally + more), numbers below 100, an optional opening sentence, two reasoning
lines each worded one of three ways with + and * operands in either order (so that,
as in natural answers, some positions stay uncertain until the model commits to a
variant: decoding then takes several forwards per small block), `#### <n>`, and
one-step multiple-choice problems answered by a letter (`--mc-fraction` of the stream,
for the tiny_mc task). Each example is the exact string the evaluation produces:
lm-eval's 0-shot chat-templated context (Qwen template, default system prompt), the
harness's rewrite of `Answer:` into the reasoning instruction (tiny_gsm only), then
the answer and `<|im_end|>`. Problems whose question hashes into the test pool are
never trained on (`tiny_data.in_test_pool`).

Tokenizer. Character level: the 95 printable ASCII characters and newline, then
`<|endoftext|>` (pad), `<|im_start|>`, `<|im_end|>` (stop), `|<MASK>|` and `<|unk|>`;
101 tokens in an embedding of 128 rows (like Qwen, the matrix is larger than the vocab).

Objective (Fast-dLLM v2's block diffusion). Sequences are padded to whole blocks of 32;
the answer, its stop token and the pad up to the end of the stop's block are the
targets. Each block is masked with its own ratio t ~ U(eps, 1); the complement of that
mask is trained too (every target is masked exactly once per pair). A block's first
position is never masked in the input: at inference it is always known before the
block is denoised (prompt, prefill step or finalize step). The input
is x_t ++ x_0 with positions 0..T-1 twice (x_t from the batch's first block holding a
target: earlier blocks are prompt only) and one boolean mask:
  x_t block b sees x_t block b (bidirectional) and x_0 blocks < b;
  x_0 block b sees x_0 blocks <= b (block-causal: the committed prefix).
Loss: cross-entropy on masked targets with the token shift, i.e. the logit at p-1
predicts token p. Inside a block that logit comes from x_t. A block's first position is
a target too (once per pair), predicted from x_0's previous block, as inference does
(the finalize forward of the clean previous block, or the prefill's last logit, picks
that token); the public code masks it like any other and predicts it from x_t's noisy
previous block.

Hyper-parameters (defaults): 8 layers, hidden 192, 4 query heads and 2 key/value heads
(head_dim 48), SwiGLU 512, RoPE theta 10000 (short sequences), untied lm_head; AdamW
(betas 0.9/0.95, weight decay 0.1 on matrices), peak lr 1.5e-3, 200 warm-up steps then
cosine to 10%, grad clip 1.0, 64 problems per step (128 rows with the complements),
bfloat16 autocast on CUDA, 5500 steps. Seeded: the data stream, the masks and the
initialisation all derive from --seed (GPU kernels may still differ in the last bits
between runs).

Cost: about 0.065 s a step on one H100 (the shipped run's times and held-out score are
in training.json). A CPU is far slower (seconds a step): use it only for smoke runs
with a smaller --hidden/--steps.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data as tiny_data
from ..engine.config import ModelConfig
from ..engine.loading import MASK_TOKEN, load_tokenizer, save_model, token_ids
from ..engine.model import FastDLLM
from ..engine.reuse import SUBSETS, resolve_subset

CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
PAD, IM_START, IM_END, UNK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"
SPECIALS = [PAD, IM_START, IM_END, MASK_TOKEN, UNK]
# The checkpoint's chat template (Qwen2.5's), default system prompt included.
CHAT_TEMPLATE = (Path(__file__).parent / "chat_template.jinja").read_text()


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 5500
    batch: int = 64              # problems per step; each also trains its complementary mask
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mc_fraction: float = 0.05
    pool: int = 100_000          # distinct training examples drawn before training
    block_size: int = 32
    eps: float = 1e-3            # smallest mask ratio of a block
    hidden: int = 192
    layers: int = 8
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 512
    vocab_rows: int = 128
    rope_theta: float = 10_000.0


# -- tokenizer ----------------------------------------------------------------------------------
def build_tokenizer(out: Path):
    """Write tokenizer.json + tokenizer_config.json and load them back through transformers."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    vocab = {c: i for i, c in enumerate(CHARS)}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    # BPE without merges = one token per character; specials are matched whole.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    # Written by hand, not by save_pretrained, so transformers 4.53+ and 5.x read the same file.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False, "add_prefix_space": False,
        "bos_token": None, "eos_token": IM_END, "pad_token": PAD, "unk_token": UNK,
        "additional_special_tokens": [IM_START, MASK_TOKEN],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {str(vocab[s]): {"content": s, "lstrip": False, "normalized": False,
                                                 "rstrip": False, "single_word": False, "special": True}
                                 for s in SPECIALS},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return load_tokenizer(out)


# -- data -----------------------------------------------------------------------------------------
class FastEncoder:
    """Token ids of chat-templated examples without rendering the template per example.

    The template only wraps the user turn, and the tokenizer is character-level outside
    its special tokens, so prompt = prefix + user text + suffix, encoded piece by piece.
    `check` compares against the real template and tokenizer (run on the first examples).
    """

    def __init__(self, tokenizer, task: str):
        sentinel = "\x00"
        self.prefix, self.suffix = tiny_data.chat_prompt(tokenizer, sentinel, task).split(sentinel)
        self.tokenizer, self.task = tokenizer, task
        self.vocab = tokenizer.get_vocab()
        self.pre = tokenizer(self.prefix, add_special_tokens=False)["input_ids"]
        self.post = tokenizer(self.suffix, add_special_tokens=False)["input_ids"]
        self.stop = self.vocab[IM_END]

    def chars(self, text: str) -> list[int]:
        return [self.vocab[c] for c in text]

    def __call__(self, user: str, answer: str) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids): completion = answer + <|im_end|>."""
        return self.pre + self.chars(tiny_data.rewrite_prompt(self.task, user)) + self.post, \
            self.chars(answer) + [self.stop]

    def check(self, user: str, answer: str) -> None:
        prompt = tiny_data.chat_prompt(self.tokenizer, user, self.task)
        want = self.tokenizer(prompt + answer + IM_END, add_special_tokens=False)["input_ids"]
        p, c = self(user, answer)
        if p + c != want:
            raise AssertionError(f"fast encoding differs from the tokenizer on {prompt!r}")


def training_examples(tokenizer, cfg: TrainConfig, n_checked: int = 64) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of the training pool, never a test-pool question."""
    r = random.Random(cfg.seed)
    gsm = tiny_data.stream(tiny_data.make_gsm, cfg.seed + 1, test=False)
    mc = tiny_data.stream(tiny_data.make_mc, cfg.seed + 2, test=False)
    enc = {"tiny_gsm": FastEncoder(tokenizer, "tiny_gsm"), "tiny_mc": FastEncoder(tokenizer, "tiny_mc")}
    examples = []
    for i in range(cfg.pool):
        if r.random() < cfg.mc_fraction:
            doc = next(mc)
            task, user, answer = "tiny_mc", tiny_data.mc_text(doc), "ABCD"[doc["answer"]]
        else:
            doc = next(gsm)
            task, user, answer = "tiny_gsm", f"Question: {doc['question']}\nAnswer:", doc["answer"]
        if i < n_checked:
            enc[task].check(user, answer)
        examples.append(enc[task](user, answer))
    return examples


def encode_pool(examples: list[tuple[list[int], list[int]]], pad_id: int, bs: int):
    """tokens [N, T] (pad-filled, T a block multiple), prompt lengths, end of targets."""
    lengths = [len(p) + len(c) for p, c in examples]
    T = math.ceil(max(lengths) / bs) * bs
    tokens = np.full((len(examples), T), pad_id, dtype=np.int32)
    for i, (p, c) in enumerate(examples):
        tokens[i, :len(p) + len(c)] = p + c
    prompt_len = torch.tensor([len(p) for p, _ in examples])
    # Targets run to the end of the block holding the stop token: pads after it are learnt too.
    end = torch.tensor([math.ceil(n / bs) * bs for n in lengths])
    return torch.from_numpy(tokens), prompt_len, end


def two_copy_mask(T: int, bs: int, device, start: int = 0) -> torch.Tensor:
    """Boolean attention of the x_t ++ x_0 layout (True = may attend), x_t from `start` on.

    x_t covers positions start..T-1 (`start` a block multiple: blocks before it hold only
    prompt, which x_0 already provides), x_0 covers 0..T-1.
    """
    q_t = torch.arange(start, T, device=device)[:, None] // bs
    q_0 = torch.arange(T, device=device)[:, None] // bs
    k_t, k_0 = q_t.T, q_0.T
    top = torch.cat((q_t == k_t, q_t > k_0), dim=1)          # x_t: own block, committed prefix
    bottom = torch.cat((torch.zeros(T, T - start, dtype=torch.bool, device=device), q_0 >= k_0), dim=1)
    return torch.cat((top, bottom), dim=0)


def diffusion_loss(model: FastDLLM, x0: torch.Tensor, prompt_len: torch.Tensor, end: torch.Tensor,
                   mask_id: int, bs: int, eps: float, gen: torch.Generator) -> torch.Tensor:
    B, T = x0.shape
    dev = x0.device
    pos = torch.arange(T, device=dev)
    target = (pos[None] >= prompt_len[:, None]) & (pos[None] < end[:, None])
    starts = target & (pos[None] % bs == 0)   # block starts: inference picks them before the block
    inner = target & ~starts
    ratio = torch.rand(B, T // bs, device=dev, generator=gen) * (1 - eps) + eps
    draw = torch.rand(B, T, device=dev, generator=gen) < ratio.repeat_interleave(bs, dim=1)
    masked = torch.cat((draw & inner, ~draw & inner))          # a mask and its complement
    clean = torch.cat((x0, x0))
    x_t = torch.where(masked, torch.full_like(clean, mask_id), clean)
    start = int(prompt_len.min()) // bs * bs   # x_t starts at the first block holding a target
    n_t = T - start
    hidden = model.forward_masked(torch.cat((x_t[:, start:], clean), dim=1),
                                  torch.cat((pos[start:], pos)), two_copy_mask(T, bs, dev, start))
    # Token shift: the logit at p-1 predicts p. Inside a block that is x_t's row p-1-start; a
    # block start is predicted from x_0's previous block (row n_t + p - 1), the finalize
    # forward's view, once per pair (first copy).
    src = torch.where(pos % bs == 0, n_t + pos - 1, pos - 1 - start)
    scored = masked | torch.cat((starts, torch.zeros_like(starts)))
    rows, cols = torch.nonzero(scored, as_tuple=True)    # targets lie at or after prompt_len > start
    logits = model.logits(hidden[rows, src[cols]]).float()
    return F.cross_entropy(logits, clean[rows, cols].long())


# -- training -------------------------------------------------------------------------------------
def model_config(cfg: TrainConfig) -> ModelConfig:
    return ModelConfig(vocab_size=cfg.vocab_rows, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                       num_key_value_heads=cfg.kv_heads, rope_theta=cfg.rope_theta,
                       max_position_embeddings=4096, bd_size=cfg.block_size)


def init_model(cfg: TrainConfig, device: str) -> FastDLLM:
    torch.manual_seed(cfg.seed)
    model = FastDLLM(model_config(cfg)).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    model.reset_buffers()
    return model


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def train(cfg: TrainConfig, out: Path, device: str, log_every: int = 100) -> dict:
    t_start = time.perf_counter()
    tokenizer = build_tokenizer(out)
    ids = token_ids(tokenizer)
    tokens, prompt_len, end = encode_pool(training_examples(tokenizer, cfg), ids.pad, cfg.block_size)
    T = tokens.shape[1]
    print(f"pool: {len(tokens)} examples, T={T}, {time.perf_counter() - t_start:.1f}s to build", flush=True)

    model = init_model(cfg, device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    order = torch.Generator().manual_seed(cfg.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    tokens, prompt_len, end = tokens.to(device), prompt_len.to(device), end.to(device)
    curve, t_train = [], time.perf_counter()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        idx = torch.randint(len(tokens), (cfg.batch,), generator=order).to(device)
        with autocast:
            loss = diffusion_loss(model, tokens[idx].long(), prompt_len[idx], end[idx],
                                  ids.mask, cfg.block_size, cfg.eps, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if step % log_every == 0 or step == cfg.steps - 1:
            value = loss.item()
            curve.append({"step": step, "loss": round(value, 4), "seconds": round(time.perf_counter() - t_train, 1)})
            print(f"step {step:5d}  loss {value:.4f}  lr {lr_at(step, cfg):.2e}  "
                  f"{time.perf_counter() - t_train:.0f}s", flush=True)
    model.eval()
    return {"model": model, "tokenizer": tokenizer, "curve": curve, "seq_len": T,
            "train_seconds": time.perf_counter() - t_train, "total_seconds": time.perf_counter() - t_start}


def write_readme(out: Path, cfg: TrainConfig, meta: dict) -> None:
    subsets = "\n".join(f"| {s} | {list(resolve_subset(s, cfg.layers))} |" for s in SUBSETS)
    (out / "README.md").write_text(f"""# Tiny Fast-dLLM v2 model (bundled)

A model of the Fast-dLLM v2 architecture (`model_type: Fast_dLLM_Qwen`: Qwen2 layers, GQA
{cfg.heads}/{cfg.kv_heads} heads, SwiGLU, RoPE, untied lm_head) with {cfg.layers} layers, hidden {cfg.hidden},
{meta['parameters'] / 1e6:.2f} M parameters stored in bfloat16, with a character-level tokenizer
and the Qwen chat template. Trained with the block-diffusion objective (blocks of 32,
complementary masks, token shift) on the GSM8K-shaped problems of `reuse_exp/tiny_data.py`,
for the bundled lm-eval tasks `tiny_gsm` and `tiny_mc` (reuse_exp/evaluation/tasks).

Regenerate: `reuse-exp tiny train --out reuse_exp/tiny/model --device cuda --steps {cfg.steps}`
(then `reuse-exp frontier run && reuse-exp frontier report --out docs/frontier --readme README.md`).
Training: {cfg.steps} steps of {cfg.batch} problems (+ complements) in {meta['train_seconds']:.0f} s on
{meta['device_name']}; settings and loss curve in `training.json`.
Held-out tiny_gsm accuracy is a tracked run's: `reuse-exp run --model {out} --task tiny_gsm --limit 200`
(the bundled model's is the k=1 row of the README's frontier).

## Layer subsets on {cfg.layers} layers (the study's 12-of-28 rule, scaled)

| subset | layers |
| --- | --- |
{subsets}

## Reuse table

The reuse table of this model is in the project's README (section "What the tiny model shows"),
read from tracked runs by `reuse-exp frontier report --readme README.md`.
""")


def train_and_save(cfg: TrainConfig, out: Path, device: str = "cpu", log_every: int = 100) -> None:
    """Train, then write the files reuse_exp/tiny/model ships into `out`."""
    torch.backends.cuda.matmul.allow_tf32 = True
    result = train(cfg, out, device, log_every)
    model = result["model"].to(torch.bfloat16)   # what ships
    meta = {"config": asdict(cfg), "parameters": sum(p.numel() for p in model.parameters()),
            "seq_len": result["seq_len"], "curve": result["curve"],
            "train_seconds": round(result["train_seconds"], 1), "total_seconds": round(result["total_seconds"], 1),
            "device": device, "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "CPU",
            "subsets": {s: list(resolve_subset(s, cfg.layers)) for s in SUBSETS},
            "data": {"templates": [t.__name__ for t in tiny_data.TEMPLATES],
                     "test_pool": f"sha256(question) % {tiny_data.TEST_FRACTION} == 0"}}
    save_model(model, out, {"torch_dtype": "bfloat16"})
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_readme(out, cfg, meta)
    print(f"wrote {sorted(p.name for p in out.iterdir())}", flush=True)

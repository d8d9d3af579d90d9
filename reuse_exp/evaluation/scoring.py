"""Loglikelihood scoring as the public harness does it: one masked, block-causal forward."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine.decoding import DecodeConfig
from ..engine.model import FastDLLM, block_causal_mask


@torch.no_grad()
def score_first_token(model: FastDLLM, cfg: DecodeConfig,
                      batch: list[tuple[list[int], list[int]]]) -> tuple[list[tuple[float, bool]], int]:
    """Mask the first target token, pad with masks to a block multiple, run one block-causal
    forward; the token is predicted by the logit before it (AR shift). Returns (log-likelihood,
    is-greedy) per pair and the positions run."""
    dev, bs = model.device, cfg.block_size
    seqs = [ctx + cont for ctx, cont in batch]
    length = -(-max(len(s) for s in seqs) // bs) * bs
    tokens = torch.full((len(seqs), length), cfg.mask_id, dtype=torch.long, device=dev)
    for b, s in enumerate(seqs):
        tokens[b, :len(s)] = torch.tensor(s, dtype=torch.long, device=dev)
    at = torch.tensor([len(ctx) for ctx, _ in batch], device=dev)
    target = torch.tensor([cont[0] for _, cont in batch], device=dev)
    rows = torch.arange(len(seqs), device=dev)
    tokens[rows, at] = cfg.mask_id
    mask = block_causal_mask(0, length, length, bs, dev)
    hidden = model.forward_masked(tokens, torch.arange(length, device=dev), mask)
    logits = model.logits(hidden[rows, at - 1]).float()
    ll = -F.cross_entropy(logits, target, reduction="none")
    greedy = logits.argmax(-1) == target
    return list(zip(ll.tolist(), greedy.tolist())), tokens.numel()

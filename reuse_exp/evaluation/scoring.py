"""Loglikelihood scoring with masked, block-causal forwards of every layer.

`score_continuation` (the default) scores every continuation token by the chain rule,
left to right: token i is predicted with the context and tokens 0..i-1 visible and
tokens i.. masked, from the logit before it (the AR shift), and the score is the sum of
the log-probabilities. That is the probability of the decoder writing the continuation
one token at a time in reading order, the way a block is denoised (earlier positions
revealed, later ones still masks; later blocks unseen under the block-causal mask): a
proper distribution over continuations of a given length, whose greedy flag means every
token was the argmax given the ones before it. It costs one row per continuation token,
all rows of a batch in one forward. Masking the whole continuation at once would be one
row per request, but it predicts every token without the ones before it, so " (A)" and
" (B)" would be told apart by a masked letter scored out of context.

`score_first_token` is the public harness's scoring: only the first continuation token is
masked (the rest stays visible to it inside its block) and scored. Choices that share a
first token can tie there, exactly when its logit's block cannot see the rest.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine.decoding import DecodeConfig
from ..engine.model import FastDLLM, block_causal_mask

Pair = tuple[list[int], list[int]]   # (context ids, continuation ids)
Scores = tuple[list[tuple[float, bool]], int, int]   # (log-likelihood, is-greedy) per pair, positions, rows


def _masked_forward(model: FastDLLM, cfg: DecodeConfig, rows: list[list[int]], at: list[int],
                    targets: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows padded with masks to a block multiple, one block-causal forward; for each row the
    log-probability of `targets[r]` at position `at[r]`, predicted by the logit before it.
    Returns (log-probabilities, is-argmax, positions run)."""
    dev, bs = model.device, cfg.block_size
    length = -(-max(len(r) for r in rows) // bs) * bs
    tokens = torch.full((len(rows), length), cfg.mask_id, dtype=torch.long, device=dev)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = torch.tensor(r, dtype=torch.long, device=dev)
    at_t = torch.tensor(at, device=dev)
    target = torch.tensor(targets, device=dev)
    index = torch.arange(len(rows), device=dev)
    tokens[index, at_t] = cfg.mask_id
    mask = block_causal_mask(0, length, length, bs, dev)
    hidden = model.forward_masked(tokens, torch.arange(length, device=dev), mask)
    logits = model.logits(hidden[index, at_t - 1]).float()
    return -F.cross_entropy(logits, target, reduction="none"), logits.argmax(-1) == target, tokens.numel()


@torch.no_grad()
def score_continuation(model: FastDLLM, cfg: DecodeConfig, batch: list[Pair]) -> Scores:
    """Every continuation token, left to right (see the module docstring). Returns
    (log-likelihood, is-greedy) per pair, the positions run and the rows run."""
    rows, at, targets, owner = [], [], [], []
    for p, (ctx, cont) in enumerate(batch):
        for i, token in enumerate(cont):
            rows.append(ctx + cont[:i + 1])   # the target itself is masked by _masked_forward
            at.append(len(ctx) + i)
            targets.append(token)
            owner.append(p)
    ll, greedy, positions = _masked_forward(model, cfg, rows, at, targets)
    index = torch.tensor(owner, device=ll.device)
    total = torch.zeros(len(batch), device=ll.device, dtype=ll.dtype).index_add_(0, index, ll)
    misses = torch.zeros(len(batch), device=ll.device, dtype=torch.long).index_add_(0, index, (~greedy).long())
    return list(zip(total.tolist(), (misses == 0).tolist())), positions, len(rows)


@torch.no_grad()
def score_first_token(model: FastDLLM, cfg: DecodeConfig, batch: list[Pair]) -> Scores:
    """The public scoring: mask the first continuation token, the rest stays visible; one row
    per pair. Returns (log-likelihood, is-greedy) per pair, the positions run and the rows run."""
    ll, greedy, positions = _masked_forward(model, cfg, [ctx + cont for ctx, cont in batch],
                                            [len(ctx) for ctx, _ in batch], [cont[0] for _, cont in batch])
    return list(zip(ll.tolist(), greedy.tolist())), positions, len(batch)


SCORERS = {"continuation": score_continuation, "first_token": score_first_token}

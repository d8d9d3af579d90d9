"""A forward with static shapes: what the fast path captures as CUDA graphs (and runs as it is
on a CPU, and for the prefill).

Positions, the K/V length, the block position and the rows are device tensors; attention runs
over the whole preallocated K/V buffer, each token seeing the keys of its block and before;
cache writes are index writes. Nothing in a forward's shapes depends on where decoding stands,
and nothing in it depends on the host: each reused group is decided inside the forward by the
policy's memory (reuse.Plan.decide, tensor code), and a group no row computes is left out by
its kernels reading the decision (`run`, predicated ops) or, where ops are not predicated (on a
CPU), by the host reading it. A group some rows compute runs for every row of the forward;
the rows that reuse it take the stand-in (the batch saves only what no row computes).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from .model import FastDLLM, ForwardKind, KVCache, LayerWeights, decoder_layer, rope_tables
from .reuse import Plan, ReuseCache
from .static_inputs import StaticInputs


@dataclass
class Frame:
    """What every layer of one static forward reads, derived on the device from its inputs."""
    positions: torch.Tensor   # [T] absolute positions of the tokens
    offset: torch.Tensor      # [1] the first token's position inside the block
    kv_len: torch.Tensor      # [1] keys [0, kv_len) exist
    cos: torch.Tensor
    sin: torch.Tensor
    prefill: bool             # tokens of several blocks (block-causal) rather than of one


def frame(model: FastDLLM, inp: StaticInputs, kind: ForwardKind) -> Frame:
    T = inp.tokens.shape[1]
    positions = inp.start + torch.arange(T, device=inp.tokens.device)
    cos, sin = rope_tables(model.inv_freq, positions, model.dtype)
    return Frame(positions, inp.offset, inp.kv_len, cos, sin, kind is ForwardKind.PREFILL)


def attend_static(qkv, ops, f: Frame, k_buf, v_buf, rows, writes, block_size: int, n_heads: int, n_kv: int, run):
    """The fast path's attention: K/V written at the tokens' positions of the rows that `writes`,
    then attention over the whole static buffer."""
    q = ops.rope_kv(qkv, f.cos, f.sin, n_heads, n_kv, k_buf, v_buf, rows, f.positions, writes, run=run)
    return ops.attention(q, k_buf, v_buf, rows, f.positions, f.kv_len, block_size, prefill=f.prefill, run=run)


def layer_step(x, w: LayerWeights, ops, k_buf, v_buf, f: Frame, rows, writes, run, block_size: int, n_heads: int,
               n_kv: int, eps: float):
    """One decoder layer with static shapes over the batch rows `rows` of the caches (x holds
    exactly those rows): `decoder_layer` with the static attention."""
    attend = partial(attend_static, ops=ops, f=f, k_buf=k_buf, v_buf=v_buf, rows=rows, writes=writes,
                     block_size=block_size, n_heads=n_heads, n_kv=n_kv, run=run)
    return decoder_layer(x, w, attend, eps, ops, run)


def static_forward(model: FastDLLM, inp: StaticInputs, kind: ForwardKind, cache: KVCache,
                   reuse_cache: ReuseCache | None, plan: Plan | None, ops, step=layer_step) -> torch.Tensor:
    """The final-normed hidden states [B, T, hidden] of every batch row (zeros for the rows
    that do not go through the layers; meaningless for those the forward is not for)."""
    cfg = model.config
    B = inp.tokens.shape[0]
    f = frame(model, inp, kind)
    rows = inp.rows
    act = inp.active.index_select(0, rows)
    x = model.model.embed_tokens(inp.tokens.index_select(0, rows))
    args = dict(block_size=cache.block_size, n_heads=cfg.num_attention_heads, n_kv=cfg.num_key_value_heads,
                eps=cfg.rms_norm_eps)
    computes = reuse = run = None
    compute = True
    for i, layer in enumerate(model.model.layers):
        group = plan.group_of.get(i) if plan is not None else None
        if group is None:
            x = step(x, layer.weights(), ops=ops, k_buf=cache.k[i], v_buf=cache.v[i], f=f, rows=rows, writes=act,
                     run=None, **args)
            continue
        if i in plan.first:   # decide the group from its input, on the device
            drift = None
            if plan.measure:
                drift = torch.zeros(B, dtype=torch.float32, device=x.device).index_copy(
                    0, rows, ops.drift(x, plan.ref[group], rows, f.offset))
            reuse = plan.decide(group, drift).index_select(0, rows)
            computes = act & ~reuse
            if plan.ref is not None:
                ops.renew(x, plan.ref[group], rows, f.offset, computes)
            run = computes.any().to(torch.int8)
            compute = ops.predicated or bool(run)   # unpredicated ops: the host reads it (a CPU)
        fresh = x
        if compute:
            fresh = step(x, layer.weights(), ops=ops, k_buf=cache.k[i], v_buf=cache.v[i], f=f, rows=rows,
                         writes=computes, run=run if ops.predicated else None, **args)
        x = ops.reuse(x, fresh, reuse_cache.values[reuse_cache.slot[i]], rows, f.offset, computes, reuse,
                      reuse_cache.mode == "delta")
    hidden = ops.rms_norm(x, model.model.norm.weight, cfg.rms_norm_eps)
    return hidden.new_zeros(B, *hidden.shape[1:]).index_copy(0, rows, hidden)

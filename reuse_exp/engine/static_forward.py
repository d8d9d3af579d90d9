"""A denoising forward with static shapes: what the fast path captures as CUDA graphs.

Positions, the K/V length and the replace position are device tensors, attention runs over
the whole preallocated K/V buffer with a length mask (bf16 on the tensor cores, through
SDPA), and cache writes are index writes, so nothing in a forward's shapes depends on where
decoding stands. Only the batch rows that compute a layer go through it (`Rows`). A forward
runs as one segment, or, when its policy measures drift, one per layer group (`segments`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from .model import FastDLLM, KVCache, LayerWeights, decoder_layer, rope_tables
from .reuse import ReuseCache, relative_drift
from .static_inputs import Rows, StaticInputs, canonical, pick


def attend_static(q, k, v, k_buf, v_buf, positions, key_mask, rows: Rows | None):
    """The fast path's attention: K/V written at `positions` of the batch rows `rows` (all
    when None), then attention over the whole static buffer, keys past the valid length
    masked out. Grouped-query attention without copying K/V per query head: query head h
    reads K/V head h // (n_heads // n_kv), so the groups stack along the query axis."""
    B, n_heads, T, D = q.shape
    n_kv = k_buf.shape[1]
    k, v = canonical(k, rows), canonical(v, rows)
    if rows is None:
        k_buf.index_copy_(2, positions, k)
        v_buf.index_copy_(2, positions, v)
        keys, values = k_buf, v_buf
    else:
        heads = torch.arange(n_kv, device=k.device)
        at = (rows.index[:, None, None], heads[None, :, None], positions[None, None, :])
        k_buf.index_put_(at, k)
        v_buf.index_put_(at, v)
        keys, values = k_buf.index_select(0, rows.index), v_buf.index_select(0, rows.index)
    qg = q.reshape(B, n_kv, n_heads // n_kv * T, D)
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=key_mask.view(1, 1, 1, -1))
    return out.reshape(B, n_heads, T, D)


def layer_step(x, w: LayerWeights, k_buf, v_buf, rows: Rows | None, positions, cos, sin, key_mask,
               n_heads: int, n_kv: int, eps: float):
    """One decoder layer with static shapes over the batch rows `rows` of the caches (x holds
    exactly those rows): `decoder_layer` with the static attention."""
    attend = partial(attend_static, k_buf=k_buf, v_buf=v_buf, positions=positions, key_mask=key_mask, rows=rows)
    return canonical(decoder_layer(x, w, cos, sin, attend, n_heads, n_kv, eps), rows)


def store_rows(values: torch.Tensor, new: torch.Tensor, rows: Rows | None, window: torch.Tensor) -> None:
    """Write a layer's result for `rows` (batch rows) into one reused layer's slot [B, block, hidden]."""
    if rows is None:
        values.index_copy_(1, window, new)
    else:
        values.index_put_((rows.index[:, None], window[None, :]), new)


@dataclass
class Frame:
    """What every layer of one static forward reads, derived on the device from its inputs."""
    positions: torch.Tensor   # [T] absolute positions of the tokens
    window: torch.Tensor      # [T] their positions inside the block
    cos: torch.Tensor
    sin: torch.Tensor
    key_mask: torch.Tensor    # [S] 0 for valid keys, -inf past kv_len


def frame(model: FastDLLM, inp: StaticInputs, cache: KVCache) -> Frame:
    T, dev = inp.tokens.shape[1], inp.tokens.device
    steps = torch.arange(T, device=dev)
    positions = inp.start + steps
    cos, sin = rope_tables(model.inv_freq, positions, model.dtype)
    S = cache.k.shape[3]
    key_mask = torch.where(torch.arange(S, device=dev) < inp.kv_len, 0.0, float("-inf")).to(model.dtype)
    return Frame(positions, inp.offset + steps, cos, sin, key_mask)


def run_layers(model: FastDLLM, x: torch.Tensor, layers, inp: StaticInputs, f: Frame, cache: KVCache,
               reuse_cache: ReuseCache | None, skip: frozenset[int], step=layer_step) -> torch.Tensor:
    """The decoder layers `layers` over x (the rows `inp.rows`): the static path's layer loop.
    It is not the eager loop (model.py) because its rows are index sets fixed when a graph is
    captured, where the eager loop masks rows decided as it goes (docs/architecture.md)."""
    cfg = model.config
    args = (f.positions, f.cos, f.sin, f.key_mask, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.rms_norm_eps)
    rows = inp.rows
    for i in layers:
        layer = model.model.layers[i]
        slot = reuse_cache.slot.get(i) if reuse_cache is not None else None
        if i in skip:
            x_in = x
            x = reuse_cache.standing_in(x_in, pick(reuse_cache.values[slot].index_select(1, f.window), rows))
            if inp.sub is not None:  # mixed: the computing rows alone go through the layer
                x_sub = pick(x_in, inp.sub)
                y = step(x_sub, layer.weights(), cache.k[i], cache.v[i], inp.sub_rows, *args)
                store_rows(reuse_cache.values[slot], reuse_cache.kept(x_sub, y), inp.sub_rows, f.window)
                # a repeated row that computes must hold what its original computed, not the stand-in
                x = canonical(x.index_copy(0, inp.sub.index, y), rows)
            continue
        y = step(x, layer.weights(), cache.k[i], cache.v[i], rows, *args)
        if slot is not None:
            store_rows(reuse_cache.values[slot], reuse_cache.kept(x, y), rows, f.window)
        x = y
    return x


def batch_rows(hidden: torch.Tensor, rows: Rows | None, batch: int) -> torch.Tensor:
    """Hidden states of `rows` placed in a [batch, ...] tensor (zeros for the other rows)."""
    if rows is None:
        return hidden
    return hidden.new_zeros(batch, *hidden.shape[1:]).index_copy(0, rows.index, hidden)


@dataclass(frozen=True)
class Segment:
    """Consecutive layers of one static forward, a graph of their own on a GPU. A forward is
    one segment unless its policy measures drift: a group's decision needs its input, which
    the layers before it compute, so the forward is cut at each group's first layer."""
    layers: tuple[int, ...]
    groups: tuple[int, ...]      # groups decided at its start
    measures: int | None         # the group whose drift it measures at its end (None: none)
    last: bool                   # it ends with the final norm


def segments(groups: tuple[tuple[int, ...], ...], num_layers: int, measured: bool) -> list[Segment]:
    if not measured:
        return [Segment(tuple(range(num_layers)), tuple(range(len(groups))), None, True)]
    cuts = [min(g) for g in groups]
    bounds = ([0] if cuts[0] > 0 else []) + cuts + [num_layers]
    out = []
    for lo, hi in zip(bounds, bounds[1:]):
        layers = tuple(range(lo, hi))
        mine = tuple(n for n, g in enumerate(groups) if min(g) == lo)
        if any(i not in layers for n in mine for i in groups[n]):
            raise RuntimeError(f"the static path measures drift of contiguous layer groups; {groups} are not")
        nxt = next((n for n, g in enumerate(groups) if min(g) == hi), None)
        out.append(Segment(layers, mine, nxt, hi == num_layers))
    return out


@dataclass
class Carry:
    """What one segment hands the next, in place: the hidden states of the forward's rows
    and the next group's drift per row."""
    x: torch.Tensor       # [rows, T, hidden]
    drift: torch.Tensor   # [rows] float32


def run_segment(model: FastDLLM, inp: StaticInputs, seg: Segment, carry: Carry | None, cache: KVCache,
                reuse_cache: ReuseCache | None, ref: torch.Tensor | None, skip: frozenset[int],
                step=layer_step) -> torch.Tensor:
    """One segment with static shapes. The last returns the final-normed hidden states of every
    batch row (zeros for the rows this forward is not for); the others hand on their hidden
    states and the next group's drift (a view of `carry.drift`, returned).

    skip: layers that stand in a cached result for the rows of `inp.rows` outside `inp.sub`
          (every row of `inp.rows` when `inp.sub` is None)
    """
    f = frame(model, inp, cache)
    rows = inp.rows
    x = model.model.embed_tokens(pick(inp.tokens, rows)) if seg.layers[0] == 0 else carry.x
    if ref is not None:   # the rows that compute a group renew its reference: its input as they computed it
        for g in seg.groups:
            if not skip:
                store_rows(ref[g], x, rows, f.window)
            elif inp.sub is not None:
                store_rows(ref[g], pick(x, inp.sub), inp.sub_rows, f.window)
    x = run_layers(model, x, seg.layers, inp, f, cache, reuse_cache, skip, step)
    if seg.last:
        return batch_rows(model.model.norm(x), rows, inp.tokens.shape[0])
    carry.x.copy_(x)
    if seg.measures is not None:
        carry.drift.copy_(relative_drift(x, pick(ref[seg.measures], rows).index_select(1, f.window)))
    return carry.drift

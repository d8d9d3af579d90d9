"""The fast path under the adaptive policy in delta mode: the forward in segments.

A group's decision needs the group's input, which the layers before it compute in the same
forward, so one graph per forward cannot hold it. The forward runs as segments instead:
the embedding and layer 0, then one segment per group of layers (the last one ends with the
final norm), each a CUDA graph of its own. A segment ends by measuring, on the device, the
next group's drift per row; one host read of those drifts (one sync per group, none per
layer) lets the policy decide, and picks the next segment's graph: every row computes the
group, none does (it is absent from the graph), or only the rows that do not reuse it.
Full-block forwards compute every group and read nothing back.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from .adaptive import AdaptiveReuse, relative_drift
from .model import ForwardKind, KVCache
from .reuse import ReuseCache
from .static_forward import batch_rows, frame, run_layers, store_rows
from .static_inputs import StaticInputs, addresses, pick


@dataclass(frozen=True)
class Segment:
    layers: tuple[int, ...]
    group: int | None        # the group these layers are (None: the embedding and layer 0)
    next_group: int | None   # the group whose drift this segment measures (None: the last segment)


def segments(groups: tuple[tuple[int, ...], ...]) -> list[Segment]:
    first = tuple(range(groups[0][0]))
    out = [Segment(first, None, 0)]
    for g, layers in enumerate(groups):
        out.append(Segment(layers, g, g + 1 if g + 1 < len(groups) else None))
    return out


@dataclass
class Carry:
    """What one segment hands the next, in place: the hidden states of the forward's rows
    and the next group's drift per row."""
    x: torch.Tensor       # [rows, T, hidden]
    drift: torch.Tensor   # [rows] float32


def carry_for(runner, B: int, T: int, n_rows: int) -> Carry:
    """The runner's hand-over buffers for this shape, kept so that its graphs stay valid."""
    m = runner.model
    return Carry(runner.buffer(("carry", B, T, n_rows), (n_rows, T, m.config.hidden_size), m.dtype),
                 runner.buffer(("carry-drift", B, T, n_rows), (n_rows,), torch.float32))


def run_segment(model, inp: StaticInputs, seg: Segment, carry: Carry, cache: KVCache, reuse_cache: ReuseCache,
                ref: torch.Tensor, skip: frozenset[int], step) -> torch.Tensor:
    """One segment with static shapes: returns the next drift (a view of `carry.drift`), or,
    for the last segment, the final-normed hidden states of every batch row."""
    f = frame(model, inp, cache)
    rows = inp.rows
    if seg.group is None:
        x = model.model.embed_tokens(pick(inp.tokens, rows))
    else:
        x = carry.x
        # The rows that compute the group renew its reference: its input as they computed it.
        if not skip:
            store_rows(ref[seg.group], x, rows, f.window)
        elif inp.sub is not None:
            store_rows(ref[seg.group], pick(x, inp.sub), inp.sub_rows, f.window)
    x = run_layers(model, x, seg.layers, inp, f, cache, reuse_cache, skip, step)
    if seg.next_group is None:
        return batch_rows(model.model.norm(x), rows, inp.tokens.shape[0])
    carry.x.copy_(x)
    carry.drift.copy_(relative_drift(x, pick(ref[seg.next_group], rows).index_select(1, f.window)))
    return carry.drift


def segmented_forward(runner, tokens: torch.Tensor, kind: ForwardKind, cache: KVCache, offset: int,
                      plan: AdaptiveReuse, act: torch.Tensor) -> torch.Tensor:
    """The forward of `plan` (an AdaptiveReuse) for the active rows `act`, segment by segment."""
    B, T = tokens.shape
    reuse_cache, ref = plan.cache, plan.state.ref
    rows = runner.row_sets(act, None)[0]
    entries = rows[0][:int(act.sum())] if rows is not None else list(range(B))
    carry = carry_for(runner, B, T, len(rows[0]) if rows is not None else B)
    head = [cache.prefix_len + offset, cache.prefix_len + cache.block_size, offset]
    buffers = addresses([cache.k, cache.v, reuse_cache.values, ref, carry.x, carry.drift])
    out = None
    for index, seg in enumerate(segments(plan.state.policy.groups)):
        skip, computing = frozenset(), act
        if seg.group is not None:
            drift = None
            if plan.decide:
                per_entry = carry.drift.tolist()   # the host read: one per group
                drift = [0.0] * B
                for j, r in enumerate(entries):
                    drift[r] = per_entry[j]
            reusing, computing_mask = plan.choose(seg.group, drift)
            if reusing.any:
                skip, computing = frozenset(seg.layers), computing_mask.host
                reuse_cache.check_filled(seg.layers, reusing.host, offset, T)
        row_sets = runner.row_sets(act, computing if skip else None)
        shapes = tuple(None if r is None else len(r[0]) for r in row_sets[:2])
        key = ("adaptive", kind, B, T, index, skip, shapes, buffers)
        scratch = [cache.k[:, :, :, :T], cache.v[:, :, :, :T], reuse_cache.values[:, :, :T], ref[:, :, :T],
                   carry.x, carry.drift]
        forward = partial(run_segment, runner.model, seg=seg, carry=carry, cache=cache, reuse_cache=reuse_cache,
                          ref=ref, skip=skip, step=runner.step)
        out = runner.run_static(key, tokens, head, row_sets, forward, scratch)
        if seg.group is not None:
            slots = [reuse_cache.slot[i] for i in seg.layers]
            for s in slots:   # the host-side record of what this block has computed
                reuse_cache.filled[s, computing, offset:offset + T] = True
    return out

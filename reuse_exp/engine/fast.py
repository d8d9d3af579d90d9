"""The fast path: static-shape forwards (static_forward.py), captured as CUDA graphs on a GPU.

Every denoising forward (full-block, small-block, finalize) is written with shapes that
do not change during decoding, so one CUDA graph per (kind, batch, which layers skip, how
many rows compute) serves a whole decoding call, and a skipped layer is simply absent from
its graph: it costs nothing.

In a batch only the rows that compute a layer go through it: the rows a forward is for
(`active`), and of those, for a reused layer, the rows that do not reuse it. Their count
is rounded up to a power of two (so few graphs serve every count) by repeating the last
row; a repeated row computes exactly what its original does (see `canon`).

Under a policy that measures drift (adaptive, depth) a group's decision depends on the layers
before it in the same forward: that forward runs in segments, a graph each, and between two
segments one host read of the next group's drift per row (one sync per group, none per
layer) lets the policy decide and picks the next segment's graph: every row computes the
group, none does (it is absent from the graph), or only the rows that do not reuse it.
Full-block forwards compute every group and read nothing back.

On a CPU the same static forward runs eagerly (no graphs): CI checks it against the
eager path. Prefill (one per call, variable length) always runs eagerly.

By default the layers run as written, so the graphs replay eager's kernels and decode eager's
tokens, in bf16 too. `compile_layers=True` (decode path `compiled`) fuses each layer with
torch.compile: fewer kernels, but other roundings in bf16, and a compilation per machine.
"""
from __future__ import annotations

from functools import partial

import torch

from .compile_cache import use_compile_caches
from .model import FastDLLM, ForwardKind, KVCache
from .reuse import Plan, ReuseCache
from .static_forward import Carry, layer_step, run_segment, segments
from .static_inputs import StaticInputs, addresses, padded_rows

STATIC_KINDS = (ForwardKind.FULL_BLOCK, ForwardKind.SMALL_BLOCK, ForwardKind.FINALIZE)
# The decoding paths a run can take (the `decode_path` setting): AUTO is FAST on a GPU, EAGER on
# a CPU; FAST runs the layers as written (eager's tokens); COMPILED is FAST with compiled layers.
AUTO, EAGER, FAST, COMPILED = "auto", "eager", "fast", "compiled"
DECODE_PATHS = (AUTO, EAGER, FAST, COMPILED)


class FastRunner:
    """Runs forwards for the decoder: static (graphed on CUDA) where it can, eager otherwise;
    each layer compiled too when `compile_layers`.

    Hand it to `generate(..., runner=FastRunner(model))`. Caches come from the runner and
    are kept between calls of the same shape, so graphs captured once are replayed by
    every later call (the first call of a shape pays the capture: warm up before timing).
    """

    def __init__(self, model: FastDLLM, use_graphs: bool | None = None, compile_layers: bool = False):
        self.model = model
        self.use_graphs = model.device.type == "cuda" if use_graphs is None else use_graphs
        self.step = layer_step
        if compile_layers:
            # Opt-in: torch.compile fuses a layer's small element-wise kernels (norms, RoPE,
            # residuals), captured in the graphs like any other; in bf16 it rounds some
            # intermediates otherwise than eager does, so it decodes other tokens (test_gpu.py;
            # emulate_precision_casts narrows the gap without closing it).
            # Dynamic shapes from the start: one compilation serves every row and token count.
            # Its kernels are kept on disk for the next process (compile_cache.py).
            use_compile_caches(model.device)
            import torch._inductor.config as inductor
            options = {"emulate_precision_casts": True} if hasattr(inductor, "emulate_precision_casts") else {}
            self.step = torch.compile(layer_step, dynamic=True, options=options)
        self.graphs: dict = {}
        self.buffers: dict = {}
        self.caches: dict = {}
        self.reuse_caches: dict = {}
        self.stats = {"static": 0, "eager": 0, "captures": 0, "padded": 0, "mixed": 0}
        self.pool = None  # one memory pool for every graph: replays never overlap, temporaries are shared
        self.timings: list | None = None  # a list: each graphed forward's device time is recorded

    @property
    def name(self) -> str:
        base = "cuda-graph" if self.use_graphs else "static"
        return base + "+compile" if self.step is not layer_step else base

    # Caches are kept per batch size, rounded up in length and only ever grown, so the
    # graphs that point into them stay valid from call to call (a warm-up's included).
    def new_cache(self, batch: int, max_len: int, block_size: int) -> KVCache:
        key = (batch, block_size)
        cache = self.caches.get(key)
        if cache is None or cache.k.shape[1] != batch or cache.max_len < max_len:
            cache = self.model.new_cache(batch, -(-max_len // 256) * 256, block_size)
            self.caches[key] = cache
        cache.prefix_len = 0
        return cache

    def buffer(self, key, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A device buffer kept between calls (graphs point into it); zeros when new."""
        t = self.buffers.get(key)
        if t is None or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            t = self.buffers[key] = torch.zeros(shape, dtype=dtype, device=self.model.device)
        return t

    def new_reuse_cache(self, policy, batch: int, block_size: int) -> ReuseCache:
        key = (policy.layers, policy.mode, batch, block_size)
        rc = self.reuse_caches.get(key)
        if rc is None or rc.values.shape[1] != batch:
            rc = ReuseCache(policy.layers, policy.mode, batch, block_size, self.model.config.hidden_size,
                            self.model.dtype, self.model.device)
            self.reuse_caches[key] = rc
        rc.filled.zero_()
        return rc

    def __call__(self, tokens, kind, cache, replace_position=0, plan: Plan | None = None, active=None):
        if kind not in STATIC_KINDS:
            self.stats["eager"] += 1
            return self.model(tokens, kind, cache, replace_position, plan, active)
        B, T = tokens.shape
        p0, bs = cache.prefix_len, cache.block_size
        offset = replace_position if kind is ForwardKind.SMALL_BLOCK else 0
        if p0 + bs > cache.max_len:
            raise ValueError(f"K/V cache of {cache.max_len} positions cannot hold {p0 + bs}")
        act = active.cpu() if active is not None else torch.ones(B, dtype=torch.bool)
        hidden = self._forward(tokens, kind, cache, offset, plan, act)
        if kind is ForwardKind.FINALIZE:
            cache.prefix_len = p0 + T
        return hidden

    def _forward(self, tokens, kind, cache, offset: int, plan: Plan | None, act: torch.Tensor):
        """The static forward of `plan` for the active rows `act`, segment by segment."""
        B, T = tokens.shape
        reuse_cache = plan.cache if plan is not None else None
        ref = plan.ref if plan is not None else None
        parts = segments(plan.groups if plan is not None else (), self.model.num_layers, ref is not None)
        rows = self.row_sets(act, None)[0]
        entries = rows[0][:int(act.sum())] if rows is not None else list(range(B))
        carry = self._carry(B, T, len(rows[0]) if rows is not None else B) if len(parts) > 1 else None
        head = [cache.prefix_len + offset, cache.prefix_len + cache.block_size, offset]
        buffers, scratch = [cache.k, cache.v], [cache.k[:, :, :, :T], cache.v[:, :, :, :T]]
        if reuse_cache is not None:
            buffers, scratch = buffers + [reuse_cache.values], scratch + [reuse_cache.values[:, :, :T]]
        if ref is not None:
            buffers, scratch = buffers + [ref], scratch + [ref[:, :, :T]]
        if carry is not None:
            buffers, scratch = buffers + [carry.x, carry.drift], scratch + [carry.x, carry.drift]
        buffers = addresses(buffers)
        timing = self.timings is not None and self.use_graphs
        if timing:
            events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            events[0].record()
        reused_rows, out = torch.zeros(B, dtype=torch.bool), None
        for seg in parts:
            skip, computing = frozenset(), act
            for g in (seg.groups if plan is not None else ()):
                drift = None
                if plan.measure:
                    drift = [0.0] * B
                    for row, d in zip(entries, carry.drift.tolist()):   # the host read: one per group
                        drift[row] = d
                reusing, computing_g = plan.choose(g, drift)
                if reusing.any:
                    if skip and not torch.equal(computing_g.host, computing):
                        raise RuntimeError("the static path runs one set of computing rows per segment; "
                                           f"the groups of {seg.layers} disagree")
                    skip, computing = skip | frozenset(plan.groups[g]), computing_g.host
                    reuse_cache.check_filled(plan.groups[g], reusing.host, offset, T)
                    reused_rows |= reusing.host
            row_sets = self.row_sets(act, computing if skip else None)
            shapes = tuple(None if r is None else len(r[0]) for r in row_sets[:2])
            key = (kind, B, T, seg.layers, skip, shapes, buffers)
            forward = partial(run_segment, self.model, seg=seg, carry=carry, cache=cache, reuse_cache=reuse_cache,
                              ref=ref, skip=skip, step=self.step)
            out = self.run_static(key, tokens, head, row_sets, forward, scratch)
            for g in (seg.groups if plan is not None else ()):   # the host record of what this block computed
                slots = [reuse_cache.slot[i] for i in plan.groups[g]]
                reuse_cache.filled[slots, :, offset:offset + T] |= plan.computing[g].host[None, :, None]
        if timing:
            events[1].record()
            n_reusing = int(reused_rows.sum())
            self.timings.append({"kind": kind.value, "rows": len(rows[0]) if rows is not None else B,
                                 "skip": bool(n_reusing), "reusing": n_reusing, "active": int(act.sum()),
                                 "events": events})
        return out

    def _carry(self, B: int, T: int, n_rows: int) -> Carry:
        """The hand-over buffers between segments for this shape, kept so that graphs stay valid."""
        m = self.model
        return Carry(self.buffer(("carry", B, T, n_rows), (n_rows, T, m.config.hidden_size), m.dtype),
                     self.buffer(("carry-drift", B, T, n_rows), (n_rows,), torch.float32))

    def row_sets(self, act: torch.Tensor, computing: torch.Tensor | None):
        """The rows a forward runs (every row, or the active ones, padded) and, when some layers
        are reused, of those the ones that compute them (`sub`, as entries of the rows and as
        batch rows); None where that is every row."""
        B = len(act)
        rows = sub = sub_rows = None
        active_rows = torch.nonzero(act).flatten().tolist()
        if len(active_rows) < B:
            rows = padded_rows(active_rows, B)
        computing_rows = torch.nonzero(computing).flatten().tolist() if computing is not None else []
        if computing_rows:
            where = {r: j for j, r in enumerate(active_rows)}
            sub = padded_rows([where[r] for r in computing_rows], len(rows[0]) if rows else B)
            sub_rows = ([(rows[0] if rows else list(range(B)))[j] for j in sub[0]], sub[1])
        self.stats["mixed"] += sub is not None
        self.stats["padded"] += (rows is not None and len(rows[0]) > len(active_rows)) or \
            (sub is not None and len(sub[0]) > len(computing_rows))
        return rows, sub, sub_rows

    def run_static(self, key, tokens, head: list[int], row_sets, forward, scratch: list[torch.Tensor]):
        """`forward(inp)` on static inputs holding `tokens`, the integers `head` (start, kv_len,
        offset) and `row_sets`: the CUDA graph of `key`, captured on first use, or eagerly."""
        entry = self.graphs.get(key)
        if entry is None:
            shapes = tuple(None if r is None else len(r[0]) for r in row_sets[:2])
            entry = self._build(key, *tokens.shape, shapes, forward, scratch)
        inp, graph, out = entry
        inp.tokens.copy_(tokens)
        ints = list(head)
        for r in row_sets:
            ints += [] if r is None else r[0] + r[1]
        ints = torch.tensor(ints)
        if inp.ints.is_cuda:  # from pinned memory, without waiting: a plain copy would sync the stream
            ints = ints.pin_memory()
        inp.ints.copy_(ints, non_blocking=True)
        self.stats["static"] += 1
        if graph is None:
            return forward(inp)
        graph.replay()
        return out

    def forward_times(self) -> list[dict]:
        """The timed forwards since timing was switched on (`self.timings = []`), with their
        device milliseconds; waits for the device."""
        torch.cuda.synchronize()
        return [{k: v for k, v in t.items() if k != "events"} | {"ms": t["events"][0].elapsed_time(t["events"][1])}
                for t in self.timings or []]

    def _build(self, key, B, T, shapes, forward, scratch: list[torch.Tensor]):
        inp = StaticInputs.allocate(B, T, shapes[0], shapes[1], self.model.device)
        inp.kv_len.fill_(T)
        for r in (inp.rows, inp.sub, inp.sub_rows):
            if r is not None:
                r.index.copy_(torch.arange(len(r.index)))
                r.canon.copy_(torch.arange(len(r.index)))
        graph = out = None
        if self.use_graphs:
            # Warm up on a side stream (allocator and library handles), then capture. Warm-up
            # and capture write into the caches at positions [0, T) (and into `scratch`): saved
            # and restored.
            saved = [t.clone() for t in scratch]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    forward(inp)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool):
                out = forward(inp)
            for t, s in zip(scratch, saved):
                t.copy_(s)
            self.stats["captures"] += 1
        entry = (inp, graph, out)
        self.graphs[key] = entry
        return entry

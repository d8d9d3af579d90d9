"""The fast path: static-shape forwards (static_forward.py), captured as CUDA graphs on a GPU.

Every denoising forward (full-block, small-block, finalize) is written with shapes that
do not change during decoding, so one CUDA graph per (kind, batch, which layers skip, how
many rows compute) serves a whole decoding call, and a skipped layer is simply absent from
its graph: it costs nothing.

In a batch only the rows that compute a layer go through it: the rows a forward is for
(`active`), and of those, for a reused layer, the rows that do not reuse it. Their count
is rounded up to a power of two (so few graphs serve every count) by repeating the last
row; a repeated row computes exactly what its original does (see `canon`).

Under the adaptive policy in delta mode a group's decision depends on the layers before it
in the same forward: that forward runs in segments, a graph each (fast_adaptive.py).

On a CPU the same static forward runs eagerly (no graphs): CI checks it against the
eager path. Prefill (one per call, variable length) always runs eagerly.
"""
from __future__ import annotations

from functools import partial

import torch

from .adaptive import AdaptiveReuse
from .fast_adaptive import segmented_forward
from .model import FastDLLM, ForwardKind, KVCache
from .reuse import LayerReuse, ReuseCache
from .static_forward import layer_step, static_forward
from .static_inputs import StaticInputs, addresses, padded_rows

STATIC_KINDS = (ForwardKind.FULL_BLOCK, ForwardKind.SMALL_BLOCK, ForwardKind.FINALIZE)


class FastRunner:
    """Runs forwards for the decoder: static (graphed on CUDA) where it can, eager otherwise.

    Hand it to `generate(..., runner=FastRunner(model))`. Caches come from the runner and
    are kept between calls of the same shape, so graphs captured once are replayed by
    every later call (the first call of a shape pays the capture: warm up before timing).
    """

    def __init__(self, model: FastDLLM, use_graphs: bool | None = None, compile_layers: bool | None = None):
        self.model = model
        on_gpu = model.device.type == "cuda"
        self.use_graphs = on_gpu if use_graphs is None else use_graphs
        compile_layers = on_gpu if compile_layers is None else compile_layers
        # torch.compile fuses a layer's small element-wise kernels (norms, RoPE, residuals);
        # its kernels are then captured in the graphs like any other. Dynamic shapes from
        # the start: one compilation serves every row count and token count.
        # Intermediates are rounded to the model's dtype where eager rounds them, so that the
        # compiled layer computes what the eager path computes.
        import torch._inductor.config as inductor
        options = {"emulate_precision_casts": True} if hasattr(inductor, "emulate_precision_casts") else {}
        self.step = torch.compile(layer_step, dynamic=True, options=options) if compile_layers else layer_step
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
            rc = ReuseCache(policy, batch, block_size, self.model.config.hidden_size, self.model.dtype,
                            self.model.device)
            self.reuse_caches[key] = rc
        rc.filled.zero_()
        return rc

    def __call__(self, tokens, kind, cache, replace_position=0, plan: LayerReuse | None = None, active=None):
        if kind not in STATIC_KINDS:
            self.stats["eager"] += 1
            return self.model(tokens, kind, cache, replace_position, plan, active)
        B, T = tokens.shape
        p0, bs = cache.prefix_len, cache.block_size
        offset = replace_position if kind is ForwardKind.SMALL_BLOCK else 0
        if p0 + bs > cache.max_len:
            raise ValueError(f"K/V cache of {cache.max_len} positions cannot hold {p0 + bs}")
        act = active.cpu() if active is not None else torch.ones(B, dtype=torch.bool)
        if isinstance(plan, AdaptiveReuse):
            hidden = segmented_forward(self, tokens, kind, cache, offset, plan, act)
        else:
            hidden = self._forward(tokens, kind, cache, offset, plan, act)
        if kind is ForwardKind.FINALIZE:
            cache.prefix_len = p0 + T
        return hidden

    def _forward(self, tokens, kind, cache, offset: int, plan: LayerReuse | None, act: torch.Tensor):
        B, T = tokens.shape
        skip = frozenset()
        reuse_cache = plan.cache if plan is not None else None
        computing = act
        if plan is not None and plan.reusing.any:
            skip, computing = plan.layers, plan.computing.host
            reuse_cache.check_filled(skip, plan.reusing.host, offset, T)
        rows, sub, sub_rows = self.row_sets(act, computing if skip else None)
        shapes = tuple(None if r is None else len(r[0]) for r in (rows, sub))
        buffers = [cache.k, cache.v] + ([reuse_cache.values] if reuse_cache is not None else [])
        key = (kind, B, T, skip, shapes, addresses(buffers))
        scratch = [cache.k[:, :, :, :T], cache.v[:, :, :, :T]]
        scratch += [reuse_cache.values[:, :, :T]] if reuse_cache is not None else []
        forward = partial(static_forward, self.model, cache=cache, reuse_cache=reuse_cache, skip=skip, step=self.step)
        timing = self.timings is not None and self.use_graphs
        if timing:
            events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            events[0].record()
        hidden = self.run_static(key, tokens, [cache.prefix_len + offset, cache.prefix_len + cache.block_size, offset],
                                 (rows, sub, sub_rows), forward, scratch)
        if timing:
            events[1].record()
            n_computing = int(computing.sum())
            self.timings.append({"kind": kind.value, "rows": shapes[0] or B, "skip": bool(skip),
                                 "reusing": int(act.sum()) - n_computing if skip else 0,
                                 "active": int(act.sum()), "events": events})
        if reuse_cache is not None:  # keep the host-side record in step with the device
            reuse_cache.filled[:, computing, offset:offset + T] = True
        return hidden

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

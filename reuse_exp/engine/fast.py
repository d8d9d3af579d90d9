"""The fast path: static-shape forwards (static_forward.py), captured as CUDA graphs on a GPU.

Every denoising forward (full-block, small-block, finalize) is written with shapes that do not
change during decoding, so one CUDA graph per (kind, batch, rows, policy) serves a whole
decoding call and the next ones. The policy's decisions are inside the graph (device tensors),
and a layer no row computes is left out by its kernels on the device: a step launches its
graphs and reads nothing back.

On a GPU the layers run on batch-invariant fused kernels (ops.py, triton_ops.py): a sample
decodes the same tokens alone as in any batch, bit for bit, in bf16 too; they round otherwise
than the eager path's vendor kernels, so the two paths agree on accuracy, not on every token
(docs/engine.md). On a CPU the same static forward runs eagerly on PyTorch's ops (no graphs):
CI checks it against the eager path bit for bit. The prefill (one per call, of any length)
runs the static forward without a graph.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .compile_cache import use_compile_caches
from .model import FastDLLM, ForwardKind, KVCache
from .ops import ops_for
from .reuse import REUSED, Plan, ReuseCache
from .static_forward import layer_step, static_forward
from .static_inputs import StaticInputs, addresses, entries

STATIC_KINDS = (ForwardKind.FULL_BLOCK, ForwardKind.SMALL_BLOCK, ForwardKind.FINALIZE)
# The decoding paths a run can take (the `decode_path` setting): AUTO is FAST on a GPU, EAGER on
# a CPU; FAST is the static forward (CUDA graphs of batch-invariant kernels on a GPU).
AUTO, EAGER, FAST = "auto", "eager", "fast"
DECODE_PATHS = (AUTO, EAGER, FAST)


class FastRunner:
    """Runs forwards for the decoder on static shapes (graphed on CUDA).

    Hand it to `generate(..., runner=FastRunner(model))`. Caches come from the runner and
    are kept between calls of the same shape, so graphs captured once are replayed by
    every later call (the first call of a shape pays the capture: warm up before timing).
    """

    def __init__(self, model: FastDLLM, use_graphs: bool | None = None, ops=None):
        self.model = model
        self.use_graphs = model.device.type == "cuda" if use_graphs is None else use_graphs
        self.ops = ops or ops_for(model.device)
        if self.ops.name == "triton":
            use_compile_caches(model.device)   # Triton's compiled kernels kept per machine
        self.step = layer_step
        self.graphs: dict = {}
        self.buffers: dict = {}
        self.caches: dict = {}
        self.reuse_caches: dict = {}
        self.stats = {"static": 0, "eager": 0, "captures": 0, "padded": 0}
        self.pool = None  # one memory pool for every graph: replays never overlap, temporaries are shared
        self.timings: list | None = None  # a list: each graphed forward's device time is recorded

    @property
    def name(self) -> str:
        base = "cuda-graph" if self.use_graphs else "static"
        return base if self.ops.name == "torch" else f"{base}+{self.ops.name}"

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
        return rc

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(hidden, self.model.lm_head.weight)

    def __call__(self, tokens, kind, cache, replace_position=0, plan: Plan | None = None, active=None, rows=None):
        """`active` (bool [B], device; None: every row) are the rows the forward is for, `rows` the
        same on the host."""
        B, T = tokens.shape
        p0, bs = cache.prefix_len, cache.block_size
        rows = [True] * B if rows is None else list(rows)
        active = torch.ones(B, dtype=torch.bool, device=tokens.device) if active is None else active
        offset = replace_position if kind is ForwardKind.SMALL_BLOCK else 0
        if kind is ForwardKind.PREFILL:
            start, kv_len = p0, p0 + T
        elif kind is ForwardKind.SMALL_BLOCK:
            start, kv_len = p0 + offset, p0 + bs
        else:
            start, kv_len = p0, p0 + bs
        if kv_len > cache.max_len:
            raise ValueError(f"K/V cache of {cache.max_len} positions cannot hold {kv_len}")
        runs = entries(rows)
        self.stats["padded"] += len(runs) > sum(rows)
        ints = [start, kv_len, offset] + runs
        hidden = self.run_static(kind, tokens, active, ints, cache, plan, sum(rows))
        if kind in (ForwardKind.PREFILL, ForwardKind.FINALIZE):
            cache.prefix_len = start + T
        return hidden

    def _buffers(self, cache: KVCache, plan: Plan | None) -> list[torch.Tensor]:
        """Every persistent tensor a forward touches: a graph is valid while they stay where they are."""
        out = [cache.k, cache.v]
        if plan is not None:
            out += [plan.cache.values, plan.log, plan.clock.step, plan.clock.since_refresh]
            out += list(plan.memory.state.tensors())
            out += [plan.ref] if plan.ref is not None else []
        return out

    def run_static(self, kind, tokens, active, ints: list[int], cache, plan: Plan | None, n_active: int):
        B, T = tokens.shape
        E = len(ints) - 3
        forward = lambda inp, p: static_forward(self.model, inp, kind, cache, p.cache if p is not None else None,  # noqa: E731
                                                p, self.ops, self.step)
        if not self.use_graphs or kind not in STATIC_KINDS:
            inp = StaticInputs(tokens, torch.tensor(ints, device=tokens.device), active)
            self.stats["eager" if kind not in STATIC_KINDS else "static"] += 1
            return forward(inp, plan)
        policy = None if plan is None else (type(plan.memory), getattr(plan.memory, "policy", None), plan.measure)
        key = (kind, B, T, E, policy, addresses(self._buffers(cache, plan)))
        entry = self.graphs.get(key) or self._capture(key, B, T, E, plan, forward)
        inp, graph, out = entry
        inp.tokens.copy_(tokens)
        inp.active.copy_(active)
        # from pinned memory, without waiting: a plain copy from the host would sync the stream
        inp.ints.copy_(torch.tensor(ints).pin_memory(), non_blocking=True)
        self.stats["static"] += 1
        timing = self.timings is not None
        if timing:
            events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            events[0].record()
        graph.replay()
        if timing:
            events[1].record()
            self.timings.append({"kind": kind.value, "rows": E, "active": n_active,
                                 "log": plan.log.clone() if plan is not None else None, "events": events})
        return out

    def _capture(self, key, B, T, E, plan, forward):
        inp = StaticInputs.allocate(B, T, E, self.model.device)
        # Warm up on a side stream (allocator, library handles, Triton's compilation), then
        # capture, every row inactive: nothing is written to a cache or to a memory.
        plan = replace(plan, active=inp.active) if plan is not None else None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                forward(inp, plan)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            out = forward(inp, plan)
        self.stats["captures"] += 1
        entry = (inp, graph, out)
        self.graphs[key] = entry
        return entry

    def forward_times(self) -> list[dict]:
        """The timed forwards since timing was switched on (`self.timings = []`), with their
        device milliseconds and how many of their active rows stood in layers; waits for the device."""
        torch.cuda.synchronize()
        out, previous = [], None
        for t in self.timings or []:
            reused = t["log"][REUSED] > 0.5 if t["log"] is not None else None
            reusing = int(reused.any(0).sum()) if reused is not None else 0
            # the batch skips a group only where every row it is for reuses it
            skip = reused is not None and bool((reused.sum(1) == t["active"]).any())
            out.append({"kind": t["kind"], "rows": t["rows"], "skip": skip, "reusing": reusing,
                        "active": t["active"], "ms": t["events"][0].elapsed_time(t["events"][1]),
                        # device time since the previous forward ended: logits, unmasking, the host's launch
                        "gap_ms": previous.elapsed_time(t["events"][0]) if previous is not None else 0.0})
            previous = t["events"][1]
        return out

"""The fast path: static-shape forwards, captured as CUDA graphs on a GPU.

Every denoising forward (full-block, small-block, finalize) is written with shapes that
do not change during decoding: positions, the K/V length and the replace position are
device tensors, attention runs over the whole preallocated K/V buffer with a length
mask, and cache writes are `index_copy_`. So one CUDA graph per (kind, batch, which
layers skip, whether rows are masked) serves a whole decoding call, and a skipped layer
is simply absent from its graph: it costs nothing.

On a CPU the same static forward runs eagerly (no graphs): CI checks it against the
eager path. Prefill (one per call, variable length) always runs eagerly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from .model import FastDLLM, ForwardKind, KVCache, LayerWeights, decoder_layer, rope_tables
from .reuse import LayerReuse, ReuseCache

STATIC_KINDS = (ForwardKind.FULL_BLOCK, ForwardKind.SMALL_BLOCK, ForwardKind.FINALIZE)


@dataclass
class StaticInputs:
    """Device buffers a captured graph reads; refreshed in place before each replay."""
    tokens: torch.Tensor     # [B, T] long
    start: torch.Tensor      # [1] long: absolute position of the first token
    kv_len: torch.Tensor     # [1] long: keys [0, kv_len) are valid
    offset: torch.Tensor     # [1] long: position of the tokens inside the block (replace_position)
    write_rows: torch.Tensor  # [B] bool: rows whose caches this forward writes
    reusing: torch.Tensor    # [B] bool: rows standing in a cached result for the reused layers


def attend_static(q, k, v, k_buf, v_buf, positions, key_mask, write_rows):
    """The fast path's attention: K/V written with `index_copy_` at `positions` (rows in
    `write_rows`, or all when None), then attention over the whole static buffer, keys past
    the valid length masked out."""
    if write_rows is not None:
        rows = write_rows[:, None, None, None]
        k = torch.where(rows, k, k_buf.index_select(2, positions))
        v = torch.where(rows, v, v_buf.index_select(2, positions))
    k_buf.index_copy_(2, positions, k)
    v_buf.index_copy_(2, positions, v)
    # Grouped-query attention as two batched matmuls over the whole buffer, in float32
    # (scores rounded to bf16 would cost accuracy): query head h reads key/value head
    # h // (n_heads // n_kv), so the groups stack along the query axis.
    B, n_heads, T, D = q.shape
    n_kv = k_buf.shape[1]
    qg = q.reshape(B, n_kv, n_heads // n_kv * T, D).float()
    scores = torch.matmul(qg, k_buf.float().transpose(-1, -2)) * (1.0 / math.sqrt(D)) + key_mask
    out = torch.matmul(torch.softmax(scores, dim=-1), v_buf.float()).to(q.dtype)
    return out.view(B, n_heads, T, D)


def layer_step(x, w: LayerWeights, k_buf, v_buf, positions, cos, sin, key_mask, write_rows,
               n_heads: int, n_kv: int, eps: float):
    """One decoder layer with static shapes: `decoder_layer` with the static attention."""
    attend = partial(attend_static, k_buf=k_buf, v_buf=v_buf, positions=positions, key_mask=key_mask,
                     write_rows=write_rows)
    return decoder_layer(x, w, cos, sin, attend, n_heads, n_kv, eps)


def static_forward(model: FastDLLM, inp: StaticInputs, cache: KVCache, reuse_cache: ReuseCache | None,
                   skip: frozenset[int], mixed: bool, masked: bool, step=layer_step) -> torch.Tensor:
    """One denoising forward with static shapes; returns final-normed hidden states.

    skip:  layers that stand in a cached result (for the rows in `inp.reusing`)
    mixed: some rows reuse and others compute those layers (compute, then select)
    masked: only `inp.write_rows` write caches
    """
    B, T = inp.tokens.shape
    dev = inp.tokens.device
    steps = torch.arange(T, device=dev)
    positions = inp.start + steps
    window = inp.offset + steps
    cos, sin = rope_tables(model.inv_freq, positions, model.dtype)
    S = cache.k.shape[3]
    key_mask = torch.where(torch.arange(S, device=dev) < inp.kv_len, 0.0, float("-inf"))
    write_rows = inp.write_rows if masked else None
    x = model.model.embed_tokens(inp.tokens)
    for i, layer in enumerate(model.model.layers):
        reused = i in skip
        stand_in = None
        if reused:
            stand_in = reuse_cache.values[reuse_cache.slot[i]].index_select(1, window)
            if reuse_cache.mode == "delta":
                stand_in = x + stand_in
            if not mixed:
                x = stand_in
                continue
        rows = write_rows
        if reused:  # mixed: the reusing rows neither write nor keep the fresh result
            rows = ~inp.reusing if rows is None else rows & ~inp.reusing
        cfg = model.config
        y = step(x, layer.weights(), cache.k[i], cache.v[i], positions, cos, sin, key_mask, rows,
                 cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps)
        if reuse_cache is not None and i in reuse_cache.slot:
            s = reuse_cache.slot[i]
            new = y if reuse_cache.mode == "output" else y - x
            if rows is not None:
                new = torch.where(rows[:, None, None], new, reuse_cache.values[s].index_select(1, window))
            reuse_cache.values[s].index_copy_(1, window, new)
        x = torch.where(inp.reusing[:, None, None], stand_in, y) if reused else y
    return model.model.norm(x)


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
        # its kernels are then captured in the graphs like any other.
        self.step = torch.compile(layer_step) if compile_layers else layer_step
        self.graphs: dict = {}
        self.caches: dict = {}
        self.reuse_caches: dict = {}
        self.stats = {"static": 0, "eager": 0, "captures": 0}

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
        start = p0 + (replace_position if kind is ForwardKind.SMALL_BLOCK else 0)
        if p0 + bs > cache.max_len:
            raise ValueError(f"K/V cache of {cache.max_len} positions cannot hold {p0 + bs}")
        skip, mixed = frozenset(), False
        reuse_cache = plan.cache if plan is not None else None
        reusing_host = torch.zeros(B, dtype=torch.bool)
        if plan is not None and plan.reusing.any:
            skip = plan.layers
            mixed = plan.computing.any
            reusing_host = plan.reusing.host
            if reuse_cache is not None:  # the host-side record the eager path keeps
                for layer in skip:
                    s = reuse_cache.slot[layer]
                    if not bool(reuse_cache.filled[s, reusing_host, replace_position:replace_position + T].all()):
                        raise RuntimeError(f"layer {layer} reused positions never computed in this block")
        masked = active is not None
        # A graph bakes in the addresses of every buffer it touches; a buffer freed by a trim
        # can come back at the same address with another shape, so both go in the key.
        buffers = [cache.k, cache.v] + ([reuse_cache.values] if reuse_cache is not None else [])
        key = (kind, B, T, skip, mixed, masked, tuple((b.data_ptr(), tuple(b.shape)) for b in buffers))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._build(key, B, T, cache, reuse_cache, skip, mixed, masked)
        inp, graph, out = entry
        inp.tokens.copy_(tokens)
        inp.start.fill_(start)
        inp.kv_len.fill_(p0 + bs)
        inp.offset.fill_(replace_position if kind is ForwardKind.SMALL_BLOCK else 0)
        inp.write_rows.copy_(active if active is not None else torch.ones(B, dtype=torch.bool))
        inp.reusing.copy_(reusing_host)
        if graph is not None:
            graph.replay()
            hidden = out
        else:
            hidden = static_forward(self.model, inp, cache, reuse_cache, skip, mixed, masked, self.step)
        if reuse_cache is not None:  # keep the host-side record in step with the device
            rows = (active.cpu() if active is not None else torch.ones(B, dtype=torch.bool))
            computing = rows & ~reusing_host if skip else rows
            lo = replace_position if kind is ForwardKind.SMALL_BLOCK else 0
            for layer, s in reuse_cache.slot.items():
                if layer not in skip or mixed:
                    reuse_cache.filled[s, computing, lo:lo + T] = True
        if kind is ForwardKind.FINALIZE:
            cache.prefix_len = p0 + T
        self.stats["static"] += 1
        return hidden

    def _build(self, key, B, T, cache, reuse_cache, skip, mixed, masked):
        dev = self.model.device
        inp = StaticInputs(tokens=torch.zeros(B, T, dtype=torch.long, device=dev),
                           start=torch.zeros(1, dtype=torch.long, device=dev),
                           kv_len=torch.full((1,), T, dtype=torch.long, device=dev),
                           offset=torch.zeros(1, dtype=torch.long, device=dev),
                           write_rows=torch.ones(B, dtype=torch.bool, device=dev),
                           reusing=torch.zeros(B, dtype=torch.bool, device=dev))
        graph = out = None
        if self.use_graphs:
            # Warm up on a side stream (allocator and library handles), then capture. Warm-up
            # and capture write into the caches at positions [0, T): saved and restored.
            saved = [cache.k[:, :, :, :T].clone(), cache.v[:, :, :, :T].clone()]
            if reuse_cache is not None:
                saved.append(reuse_cache.values[:, :, :T].clone())
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    static_forward(self.model, inp, cache, reuse_cache, skip, mixed, masked, self.step)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = static_forward(self.model, inp, cache, reuse_cache, skip, mixed, masked, self.step)
            cache.k[:, :, :, :T].copy_(saved[0])
            cache.v[:, :, :, :T].copy_(saved[1])
            if reuse_cache is not None:
                reuse_cache.values[:, :, :T].copy_(saved[2])
            self.stats["captures"] += 1
        entry = (inp, graph, out)
        self.graphs[key] = entry
        return entry

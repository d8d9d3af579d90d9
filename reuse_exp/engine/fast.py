"""The fast path: static-shape forwards, captured as CUDA graphs on a GPU.

Every denoising forward (full-block, small-block, finalize) is written with shapes that
do not change during decoding: positions, the K/V length and the replace position are
device tensors, attention runs over the whole preallocated K/V buffer with a length
mask (bf16 on the tensor cores, through SDPA), and cache writes are index writes. So one
CUDA graph per (kind, batch, which layers skip, how many rows compute) serves a whole
decoding call, and a skipped layer is simply absent from its graph: it costs nothing.

In a batch only the rows that compute a layer go through it: the rows a forward is for
(`active`), and of those, for a reused layer, the rows that do not reuse it. Their count
is rounded up to a power of two (so few graphs serve every count) by repeating the last
row; a repeated row computes exactly what its original does (see `canon`).

On a CPU the same static forward runs eagerly (no graphs): CI checks it against the
eager path. Prefill (one per call, variable length) always runs eagerly.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from .model import FastDLLM, ForwardKind, KVCache, LayerWeights, decoder_layer, rope_tables
from .reuse import LayerReuse, ReuseCache

STATIC_KINDS = (ForwardKind.FULL_BLOCK, ForwardKind.SMALL_BLOCK, ForwardKind.FINALIZE)


@dataclass
class Rows:
    """Batch rows that go through a layer, padded to a power of two by repeating the last.

    index: [n] long, the rows (of the tensor the layer reads); canon: [n] long, for each
    entry the first entry holding the same row. Outputs are taken through `canon` before
    anything is written, so a repeated row writes exactly its original's values."""
    index: torch.Tensor
    canon: torch.Tensor


def _pick(t: torch.Tensor, rows: Rows | None) -> torch.Tensor:
    return t if rows is None else t.index_select(0, rows.index)


def _canonical(t: torch.Tensor, rows: Rows | None) -> torch.Tensor:
    return t if rows is None else t.index_select(0, rows.canon)


def attend_static(q, k, v, k_buf, v_buf, positions, key_mask, rows: Rows | None):
    """The fast path's attention: K/V written at `positions` of the batch rows `rows` (all
    when None), then attention over the whole static buffer, keys past the valid length
    masked out. Grouped-query attention without copying K/V per query head: query head h
    reads K/V head h // (n_heads // n_kv), so the groups stack along the query axis."""
    B, n_heads, T, D = q.shape
    n_kv = k_buf.shape[1]
    k, v = _canonical(k, rows), _canonical(v, rows)
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
    return _canonical(decoder_layer(x, w, cos, sin, attend, n_heads, n_kv, eps), rows)


@dataclass
class StaticInputs:
    """Device buffers a captured graph reads; refreshed in place before each replay. Every
    integer input is a view of `ints`, so one host-to-device copy refreshes them all."""
    tokens: torch.Tensor     # [B, T] long
    ints: torch.Tensor       # start, kv_len, offset, then each Rows' index and canon
    rows: Rows | None        # batch rows this forward computes (None: all)
    sub: Rows | None         # mixed reuse: of `rows`, the entries that compute the reused layers
    sub_rows: Rows | None    # the same as batch rows (for the caches)

    @property
    def start(self) -> torch.Tensor:   # [1]: absolute position of the first token
        return self.ints[0:1]

    @property
    def kv_len(self) -> torch.Tensor:  # [1]: keys [0, kv_len) are valid
        return self.ints[1:2]

    @property
    def offset(self) -> torch.Tensor:  # [1]: position of the tokens inside the block (replace_position)
        return self.ints[2:3]

    @classmethod
    def allocate(cls, B: int, T: int, n_rows: int | None, n_sub: int | None, device) -> "StaticInputs":
        sizes = [3] + [n for n in (n_rows, n_rows, n_sub, n_sub, n_sub, n_sub) if n is not None]
        ints = torch.zeros(sum(sizes), dtype=torch.long, device=device)
        parts = iter(ints.split(sizes)[1:])
        rows = Rows(next(parts), next(parts)) if n_rows is not None else None
        sub = Rows(next(parts), next(parts)) if n_sub is not None else None
        sub_rows = Rows(next(parts), next(parts)) if n_sub is not None else None
        return cls(torch.zeros(B, T, dtype=torch.long, device=device), ints, rows, sub, sub_rows)


def _store(values: torch.Tensor, new: torch.Tensor, rows: Rows | None, window: torch.Tensor) -> None:
    """Write a layer's result for `rows` (batch rows) into one reused layer's slot [B, block, hidden]."""
    if rows is None:
        values.index_copy_(1, window, new)
    else:
        values.index_put_((rows.index[:, None], window[None, :]), new)


def static_forward(model: FastDLLM, inp: StaticInputs, cache: KVCache, reuse_cache: ReuseCache | None,
                   skip: frozenset[int], step=layer_step) -> torch.Tensor:
    """One denoising forward with static shapes; returns final-normed hidden states of every
    batch row (zeros for the rows this forward is not for).

    skip: layers that stand in a cached result for the rows of `inp.rows` outside `inp.sub`
          (every row of `inp.rows` when `inp.sub` is None)
    """
    B, T = inp.tokens.shape
    dev = inp.tokens.device
    cfg = model.config
    steps = torch.arange(T, device=dev)
    positions = inp.start + steps
    window = inp.offset + steps
    cos, sin = rope_tables(model.inv_freq, positions, model.dtype)
    S = cache.k.shape[3]
    key_mask = torch.where(torch.arange(S, device=dev) < inp.kv_len, 0.0, float("-inf")).to(model.dtype)
    rows = inp.rows
    x = model.model.embed_tokens(_pick(inp.tokens, rows))
    for i, layer in enumerate(model.model.layers):
        slot = reuse_cache.slot.get(i) if reuse_cache is not None else None
        if i in skip:
            stand_in = _pick(reuse_cache.values[slot].index_select(1, window), rows)
            if reuse_cache.mode == "delta":
                stand_in = x + stand_in
            if inp.sub is not None:  # mixed: the computing rows alone go through the layer
                x_in = _pick(x, inp.sub)
                y = step(x_in, layer.weights(), cache.k[i], cache.v[i], inp.sub_rows, positions, cos, sin, key_mask,
                         cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps)
                _store(reuse_cache.values[slot], y if reuse_cache.mode == "output" else y - x_in, inp.sub_rows, window)
                stand_in = stand_in.index_copy(0, inp.sub.index, y)
            x = stand_in
            continue
        y = step(x, layer.weights(), cache.k[i], cache.v[i], rows, positions, cos, sin, key_mask,
                 cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps)
        if slot is not None:
            _store(reuse_cache.values[slot], y if reuse_cache.mode == "output" else y - x, rows, window)
        x = y
    hidden = model.model.norm(x)
    if rows is None:
        return hidden
    return hidden.new_zeros(B, T, hidden.shape[-1]).index_copy(0, rows.index, hidden)


def padded_size(n: int, limit: int) -> int:
    """n rounded up to a power of two, at most `limit`."""
    return min(1 << max(n - 1, 0).bit_length(), limit)


def padded_rows(entries: list[int], limit: int) -> tuple[list[int], list[int]]:
    """`entries` padded to `padded_size` by repeating the last; and each entry's first occurrence."""
    size = padded_size(len(entries), limit)
    n = len(entries)
    return entries + [entries[-1]] * (size - n), list(range(n)) + [n - 1] * (size - n)


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
        skip = frozenset()
        reuse_cache = plan.cache if plan is not None else None
        act = active.cpu() if active is not None else torch.ones(B, dtype=torch.bool)
        computing = act
        if plan is not None and plan.reusing.any:
            skip, computing = plan.layers, plan.computing.host
            # the host-side record the eager path keeps (every slot of the cache is a skipped layer)
            if reuse_cache is not None and not bool(reuse_cache.filled[:, plan.reusing.host, offset:offset + T].all()):
                raise RuntimeError(f"layers {sorted(skip)} reused positions never computed in this block")
        # Which rows compute: every row, or the active ones (padded); for reused layers, of
        # those, the ones that do not reuse (`sub`, as entries of `rows` and as batch rows).
        rows = sub = sub_rows = None
        active_rows = torch.nonzero(act).flatten().tolist()
        if len(active_rows) < B:
            rows = padded_rows(active_rows, B)
        computing_rows = torch.nonzero(computing).flatten().tolist()
        if skip and computing_rows:
            where = {r: j for j, r in enumerate(active_rows)}
            sub = padded_rows([where[r] for r in computing_rows], len(rows[0]) if rows else B)
            sub_rows = ([(rows[0] if rows else list(range(B)))[j] for j in sub[0]], sub[1])
        shapes = tuple(None if r is None else len(r[0]) for r in (rows, sub))
        self.stats["mixed"] += sub is not None
        self.stats["padded"] += (rows is not None and shapes[0] > len(active_rows)) or \
            (sub is not None and shapes[1] > len(computing_rows))
        # A graph bakes in the addresses of every buffer it touches; a buffer freed by a trim
        # can come back at the same address with another shape, so both go in the key.
        buffers = [cache.k, cache.v] + ([reuse_cache.values] if reuse_cache is not None else [])
        key = (kind, B, T, skip, shapes, tuple((b.data_ptr(), tuple(b.shape)) for b in buffers))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._build(key, B, T, shapes, cache, reuse_cache, skip)
        inp, graph, out = entry
        inp.tokens.copy_(tokens)
        ints = [p0 + offset, p0 + bs, offset]
        for r in (rows, sub, sub_rows):
            ints += [] if r is None else r[0] + r[1]
        inp.ints.copy_(torch.tensor(ints))
        timing = self.timings is not None and graph is not None
        if timing:
            events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            events[0].record()
        if graph is not None:
            graph.replay()
            hidden = out
        else:
            hidden = static_forward(self.model, inp, cache, reuse_cache, skip, self.step)
        if timing:
            events[1].record()
            self.timings.append({"kind": kind.value, "rows": shapes[0] or B, "skip": bool(skip),
                                 "reusing": int(act.sum()) - len(computing_rows) if skip else 0,
                                 "active": len(active_rows), "events": events})
        if reuse_cache is not None:  # keep the host-side record in step with the device
            reuse_cache.filled[:, computing if skip else act, offset:offset + T] = True
        if kind is ForwardKind.FINALIZE:
            cache.prefix_len = p0 + T
        self.stats["static"] += 1
        return hidden

    def forward_times(self) -> list[dict]:
        """The timed forwards since timing was switched on (`self.timings = []`), with their
        device milliseconds; waits for the device."""
        torch.cuda.synchronize()
        return [{k: v for k, v in t.items() if k != "events"} | {"ms": t["events"][0].elapsed_time(t["events"][1])}
                for t in self.timings or []]

    def _build(self, key, B, T, shapes, cache, reuse_cache, skip):
        inp = StaticInputs.allocate(B, T, shapes[0], shapes[1], self.model.device)
        inp.kv_len.fill_(T)
        for r in (inp.rows, inp.sub, inp.sub_rows):
            if r is not None:
                r.index.copy_(torch.arange(len(r.index)))
                r.canon.copy_(torch.arange(len(r.index)))
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
                    static_forward(self.model, inp, cache, reuse_cache, skip, self.step)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool):
                out = static_forward(self.model, inp, cache, reuse_cache, skip, self.step)
            cache.k[:, :, :, :T].copy_(saved[0])
            cache.v[:, :, :, :T].copy_(saved[1])
            if reuse_cache is not None:
                reuse_cache.values[:, :, :T].copy_(saved[2])
            self.stats["captures"] += 1
        entry = (inp, graph, out)
        self.graphs[key] = entry
        return entry

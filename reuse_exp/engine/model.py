"""Fast-dLLM v2 (Qwen2 architecture) in plain PyTorch, with one K/V buffer per layer.

The K/V buffer holds the committed prefix followed by a slot for the block being
denoised. That slot *is* the block cache: a full-block forward fills all of it, a
small-block forward overwrites its 8 positions, a finalize forward rewrites it and
commits it to the prefix. Nothing is concatenated per step, and every forward kind
after the prefill has a static shape.

Layer reuse is not known here: a forward takes an optional `Plan` (reuse.py) that decides,
group by group, which rows stand in a cached result and which compute (this eager loop reads
the decision back to skip a layer no row computes; the fast path never does).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .ops import TORCH_OPS, apply_rope, rms_norm, split_heads


class ForwardKind(str, enum.Enum):
    PREFILL = "prefill"          # prompt blocks, block-causal, committed to the prefix
    FULL_BLOCK = "full_block"    # the current 32-token block, fills the block slot
    SMALL_BLOCK = "small_block"  # 8 tokens at replace_position, attends prefix + block slot
    FINALIZE = "finalize"        # the finished block, committed to the prefix


class KVCache:
    """Preallocated K/V of every layer: [layers, batch, kv_heads, max_len, head_dim]."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.prefix_len = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def trim(self, keep: torch.Tensor) -> None:
        """Drop the batch rows where `keep` is False (finished samples)."""
        self.k = self.k[:, keep]
        self.v = self.v[:, keep]


@dataclass
class ForwardContext:
    """What every layer of one forward shares."""
    cos: torch.Tensor
    sin: torch.Tensor
    cache: KVCache | None  # None: no cache, keys are this forward's own (training, references)
    write_at: int          # where this forward's K/V go in the buffer
    kv_len: int            # keys [0, kv_len) are attended to
    mask: torch.Tensor | None  # boolean [q, kv_len], True = may attend; None = attend to all


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class LayerWeights(NamedTuple):
    """One decoder layer's tensors, as the layer function takes them: tensors rather than a
    module, so one compiled version of the function serves every layer."""
    ln1: torch.Tensor
    wqkv: torch.Tensor  # q, k and v projections stacked: one matrix product reads all three
    bqkv: torch.Tensor
    wo: torch.Tensor
    ln2: torch.Tensor
    wgu: torch.Tensor   # gate and up projections stacked
    wd: torch.Tensor


# `attend(qkv) -> out`: rotates q and k, writes this forward's K/V wherever the caller keeps them
# and attends over them. qkv: [B, T, (heads + 2 kv_heads) * D]; out: [B, T, heads * D].
Attend = Callable[[torch.Tensor], torch.Tensor]


def decoder_layer(x: torch.Tensor, w: LayerWeights, attend: Attend, eps: float, ops=TORCH_OPS,
                  run: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder layer's structure, the only copy of it: pre-norm attention, then SwiGLU MLP,
    in `ops` (ops.py: PyTorch, or the fast path's GPU kernels). Where its K/V go and which keys
    it attends to is `attend`'s business; `run` (a device flag) lets predicated ops skip it."""
    h = ops.rms_norm(x, w.ln1, eps, run=run)
    h = ops.linear(attend(ops.linear(h, w.wqkv, w.bqkv, run=run)), w.wo, residual=x, run=run)
    m = ops.rms_norm(h, w.ln2, eps, run=run)
    return ops.linear(ops.swiglu(m, w.wgu, run=run), w.wd, residual=h, run=run)


def attend_cached(qkv: torch.Tensor, ctx: "ForwardContext", layer: int, n_heads: int, n_kv: int,
                  write_kv: bool = True, write_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The eager path's attention: K/V written into the cache by slice, keys [0, kv_len)."""
    B, T, _ = qkv.shape
    q, k, v = split_heads(qkv, n_heads, n_kv)
    q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
    if ctx.cache is None:  # no cache: the keys are this forward's own
        keys, values = k, v
    else:
        lo, hi = ctx.write_at, ctx.write_at + T
        k_buf, v_buf = ctx.cache.k[layer], ctx.cache.v[layer]
        if write_kv and write_rows is None:
            k_buf[:, :, lo:hi] = k
            v_buf[:, :, lo:hi] = v
            keys, values = k_buf[:, :, :ctx.kv_len], v_buf[:, :, :ctx.kv_len]
        elif write_kv:  # only these rows take this step; the others keep their K/V
            rows = write_rows[:, None, None, None]
            k_buf[:, :, lo:hi] = torch.where(rows, k, k_buf[:, :, lo:hi])
            v_buf[:, :, lo:hi] = torch.where(rows, v, v_buf[:, :, lo:hi])
            keys, values = k_buf[:, :, :ctx.kv_len], v_buf[:, :, :ctx.kv_len]
        else:  # shadow computation: same keys, buffer left untouched
            keys = torch.cat((k_buf[:, :, :lo], k, k_buf[:, :, hi:ctx.kv_len]), dim=2)
            values = torch.cat((v_buf[:, :, :lo], v, v_buf[:, :, hi:ctx.kv_len]), dim=2)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=ctx.mask, enable_gqa=q.shape[1] != keys.shape[1])
    return out.transpose(1, 2).reshape(B, T, n_heads * out.shape[-1])


def stack_projections(state: dict, prefix: str, fused: str, parts: tuple[str, ...], suffixes: tuple[str, ...]) -> None:
    """Replace the checkpoint's separate projections under `prefix` by their stacked rows, in
    place (each piece is dropped as soon as it is copied: loading holds one copy)."""
    for suffix in suffixes:
        names = [f"{prefix}{part}.{suffix}" for part in parts]
        if all(n in state for n in names):
            state[f"{prefix}{fused}.{suffix}"] = torch.cat([state.pop(n) for n in names])


class StackedProjections(nn.Module):
    """A module whose projections run as one matrix product of stacked weights, while its
    state dict speaks the checkpoint's names: `state_dict()` gives the pieces (views of the
    stacked tensor) and `load_state_dict()` takes them."""
    fused: str
    parts: dict[str, int]       # checkpoint name -> rows, in stacking order
    order: tuple[str, ...]      # the checkpoint's names under this module, in the checkpoint's order
    suffixes: tuple[str, ...]

    def __init__(self):
        super().__init__()
        self.register_state_dict_post_hook(self._split)
        self.register_load_state_dict_pre_hook(self._merge)

    @staticmethod
    def _split(module, state, prefix, local_metadata) -> None:
        mine = {k[len(prefix):]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
        for suffix in module.suffixes:
            stacked = mine.pop(f"{module.fused}.{suffix}")
            for part, piece in zip(module.parts, stacked.split(tuple(module.parts.values()))):
                mine[f"{part}.{suffix}"] = piece
        for name in module.order:
            state[prefix + name] = mine[name]

    @staticmethod
    def _merge(module, state, prefix, *args) -> None:
        stack_projections(state, prefix, module.fused, tuple(module.parts), module.suffixes)


class Attention(StackedProjections):
    """The attention projections; q, k and v stacked in `qkv_proj`. The math is `decoder_layer`'s."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n_heads, n_kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.fused, self.suffixes = "qkv_proj", ("weight", "bias")
        self.parts = {"q_proj": n_heads * d, "k_proj": n_kv * d, "v_proj": n_kv * d}
        self.order = tuple(f"{p}.{s}" for p in self.parts for s in self.suffixes) + ("o_proj.weight",)
        self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.parts.values()), bias=True)
        self.o_proj = nn.Linear(n_heads * d, cfg.hidden_size, bias=False)


class MLP(StackedProjections):
    """The SwiGLU projections; gate and up stacked in `gate_up_proj`. The math is `decoder_layer`'s."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fused, self.suffixes = "gate_up_proj", ("weight",)
        self.parts = {"gate_proj": cfg.intermediate_size, "up_proj": cfg.intermediate_size}
        self.order = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.n_heads, self.n_kv, self.eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def weights(self) -> LayerWeights:
        a, m = self.self_attn, self.mlp
        return LayerWeights(self.input_layernorm.weight, a.qkv_proj.weight, a.qkv_proj.bias, a.o_proj.weight,
                            self.post_attention_layernorm.weight, m.gate_up_proj.weight, m.down_proj.weight)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, write_kv: bool = True,
                write_rows: torch.Tensor | None = None) -> torch.Tensor:
        attend = partial(attend_cached, ctx=ctx, layer=self.index, n_heads=self.n_heads, n_kv=self.n_kv,
                         write_kv=write_kv, write_rows=write_rows)
        return decoder_layer(x, self.weights(), attend, self.eps)


class Backbone(nn.Module):
    """`model.*` in the checkpoint's parameter names."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def block_causal_mask(q_start: int, q_len: int, kv_len: int, block_size: int, device) -> torch.Tensor:
    """Query at absolute position i sees key j iff i // block_size >= j // block_size."""
    q = torch.arange(q_start, q_start + q_len, device=device)[:, None] // block_size
    k = torch.arange(kv_len, device=device)[None, :] // block_size
    return q >= k


class FastDLLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device=None) -> torch.Tensor:
        d = self.config.head_dim
        return 1.0 / (self.config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))

    def stack_checkpoint(self, state: dict) -> dict:
        """A checkpoint's tensors (separate q/k/v and gate/up) to this model's stacked ones, in place."""
        for i, layer in enumerate(self.model.layers):
            for name, module in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
                module._merge(module, state, f"model.layers.{i}.{name}.")
        return state

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after building on the meta device)."""
        self.inv_freq = self._inv_freq(self.lm_head.weight.device)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def new_cache(self, batch: int, max_len: int, block_size: int) -> KVCache:
        return KVCache(self.config, batch, max_len, block_size, self.dtype, self.device)

    def forward(self, tokens: torch.Tensor, kind: ForwardKind, cache: KVCache,
                replace_position: int = 0, reuse=None, active: torch.Tensor | None = None) -> torch.Tensor:
        """Run one forward of `kind`; return the final-normed hidden states [B, T, hidden].

        `reuse` (a reuse.Plan) names the layers and rows that stand in a cached
        result instead of computing; None computes every layer. `active` (bool [B]) limits
        the rows whose caches this forward may write: the other rows are along for the
        batch only, and their outputs are meaningless. None: every row.
        """
        B, T = tokens.shape
        bs, p0 = cache.block_size, cache.prefix_len
        if kind is ForwardKind.PREFILL:
            start, kv_len = p0, p0 + T
            mask = block_causal_mask(p0, T, kv_len, bs, tokens.device) if T > bs else None
        elif kind is ForwardKind.SMALL_BLOCK:
            start, kv_len, mask = p0 + replace_position, p0 + bs, None
        else:  # full block or finalize: one block, bidirectional, sees the whole prefix
            if T != bs:
                raise ValueError(f"{kind.value} forward takes {bs} tokens, got {T}")
            start, kv_len, mask = p0, p0 + bs, None
        if kv_len > cache.max_len:
            raise ValueError(f"K/V cache of {cache.max_len} positions cannot hold {kv_len}")
        positions = torch.arange(start, start + T, device=tokens.device)
        cos, sin = rope_tables(self.inv_freq, positions, self.dtype)
        ctx = ForwardContext(cos, sin, cache, write_at=start, kv_len=kv_len, mask=mask)

        x = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.layers):
            group = reuse.group_of.get(i) if reuse is not None else None
            if group is None:  # not a layer the policy reuses
                x = layer(x, ctx, write_rows=active)
                continue
            if i in reuse.first:  # the group is decided at its first layer, from its input
                reusing = reuse.decide(group, reuse.drift(group, x) if reuse.measure else None)
                computing = reuse.active & ~reusing
                reuse.renew(group, x, computing)
                some_reuse, some_compute = bool(reusing.any()), bool(computing.any())
            if not some_reuse:  # every row computes this layer
                y = layer(x, ctx, write_rows=active)
                reuse.cache.store(i, x, y, reuse.offset, None if active is None else computing)
                x = y
            elif not some_compute:  # no row computes: the layer is skipped outright
                stand_in = reuse.cache.stand_in(i, x, reuse.offset)
                if reuse.shadow is not None:
                    reuse.shadow.compare(i, stand_in, layer(x, ctx, write_kv=False))
                x = stand_in
            else:  # rows disagree (batch only): compute, keep the stand-in where it applies
                stand_in = reuse.cache.stand_in(i, x, reuse.offset)
                fresh = layer(x, ctx, write_rows=computing)
                reuse.cache.store(i, x, fresh, reuse.offset, computing)
                x = torch.where(reusing[:, None, None], stand_in, fresh)
        if kind in (ForwardKind.PREFILL, ForwardKind.FINALIZE):
            cache.prefix_len = start + T
        return self.model.norm(x)

    def forward_masked(self, tokens: torch.Tensor, positions: torch.Tensor,
                       mask: torch.Tensor | None) -> torch.Tensor:
        """Every layer over `tokens` with an explicit boolean mask [T, T] and no cache.

        For training (the block-diffusion objective builds its own masks) and for
        loglikelihood scoring. Returns final-normed hidden states.
        """
        cos, sin = rope_tables(self.inv_freq, positions, self.dtype)
        ctx = ForwardContext(cos, sin, None, write_at=0, kv_len=tokens.shape[1], mask=mask)
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x, ctx)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

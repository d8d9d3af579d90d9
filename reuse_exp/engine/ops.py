"""The operations a decoder layer is made of, in two implementations with one interface.

`TORCH_OPS` is the reference: plain PyTorch, any device (the eager path, and the static path
on a CPU). `TritonOps` (triton_ops.py) runs the same arithmetic as batch-invariant fused GPU
kernels: the fast path's layer on a GPU. `decoder_layer` (model.py) is written against this
interface once, for both.

Shapes: x [rows, T, hidden]; qkv [rows, T, (heads + 2 kv_heads) * head_dim]; the layer's K/V
buffers [batch, kv_heads, S, head_dim], of which `cache_rows` [rows] names each row's;
positions [T] (absolute), kv_len [1] (keys [0, kv_len) exist).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # In float32, cast back, then scale: the reference (Qwen2) order.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def split_heads(qkv: torch.Tensor, n_heads: int, n_kv: int):
    """q [rows, heads, T, D], k and v [rows, kv_heads, T, D] of a projection [rows, T, (heads + 2 kv) * D]."""
    B, T, width = qkv.shape
    D = width // (n_heads + 2 * n_kv)
    q, k, v = qkv.split((n_heads * D, n_kv * D, n_kv * D), dim=-1)
    return (q.reshape(B, T, n_heads, D).transpose(1, 2), k.reshape(B, T, n_kv, D).transpose(1, 2),
            v.reshape(B, T, n_kv, D).transpose(1, 2))


def visible_keys(positions: torch.Tensor, kv_len: torch.Tensor, block_size: int, S: int) -> torch.Tensor:
    """[T, S] bool: the token at position p sees key j < min(kv_len, end of p's block)."""
    limit = torch.minimum(kv_len, (positions // block_size + 1) * block_size)
    return torch.arange(S, device=positions.device)[None, :] < limit[:, None]


class TorchOps:
    """The reference. `run` is accepted and ignored (predicated = False): a caller that skips a
    layer no row computes reads the flag on the host and does not call the ops at all."""
    name = "torch"
    predicated = False

    def rms_norm(self, x, weight, eps, run=None):
        return rms_norm(x, weight, eps)

    def linear(self, x, weight, bias=None, residual=None, run=None):
        y = F.linear(x, weight, bias)
        return y if residual is None else residual + y

    def swiglu(self, x, gate_up, run=None):
        """silu(gate) * up of the stacked projection [gate; up] ([2 * intermediate, hidden])."""
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope_kv(self, qkv, cos, sin, n_heads, n_kv, k_buf, v_buf, cache_rows, positions, writes, run=None):
        """Rotated q [rows, heads, T, D]; rotated k and v written at `positions` of the cache rows
        `cache_rows` (distinct) where `writes` (bool [rows]); the other rows keep their K/V."""
        q, k, v = split_heads(qkv, n_heads, n_kv)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        heads = torch.arange(n_kv, device=k.device)
        at = (cache_rows[:, None, None], heads[None, :, None], positions[None, None, :])
        keep = writes[:, None, None, None]
        k_buf[at] = torch.where(keep, k, k_buf[at])
        v_buf[at] = torch.where(keep, v, v_buf[at])
        return q

    def attention(self, q, k_buf, v_buf, cache_rows, positions, kv_len, block_size, prefill=False, run=None):
        """[rows, T, heads * D]. Grouped-query attention without copying K/V per query head: query
        head h reads K/V head h // (heads // kv_heads), so the groups stack along the query axis.
        `prefill`: the tokens span several blocks (else they see the same keys: one mask row)."""
        B, n_heads, T, D = q.shape
        n_kv, S = k_buf.shape[1], k_buf.shape[2]
        keys, values = k_buf.index_select(0, cache_rows), v_buf.index_select(0, cache_rows)
        mask = torch.where(visible_keys(positions, kv_len, block_size, S), 0.0, float("-inf")).to(q.dtype)
        if not prefill:
            mask = mask[:1]
        group = n_heads // n_kv
        out = F.scaled_dot_product_attention(q.reshape(B, n_kv, group * T, D), keys, values,
                                             attn_mask=mask.repeat(group, 1) if prefill else mask)
        return out.reshape(B, n_heads, T, D).transpose(1, 2).reshape(B, T, n_heads * D)

    def reuse(self, x, fresh, values, rows, offset, computes, reuses, delta: bool):
        """One reused layer's hand-over, for the rows `rows` of `values` [batch, block, hidden] at the
        block positions from `offset` ([1]): rows that `computes` keep their result (delta:
        fresh - x, output: fresh) and pass `fresh` on; rows that `reuses` pass the stand-in on."""
        window = offset + torch.arange(x.shape[1], device=x.device)
        at = (rows[:, None], window[None, :])
        kept = values[at]
        values[at] = torch.where(computes[:, None, None], fresh - x if delta else fresh, kept)
        return torch.where(reuses[:, None, None], x + kept if delta else kept, fresh)

    def renew(self, x, ref, rows, offset, computes):
        """A group's drift reference [batch, block, hidden]: the rows that compute it keep its input."""
        at = (rows[:, None], (offset + torch.arange(x.shape[1], device=x.device))[None, :])
        ref[at] = torch.where(computes[:, None, None], x, ref[at])

    def drift(self, x, ref, rows, offset):
        """Per row: ||x - ref|| / ||ref|| over positions and features, in float32, against the rows'
        window of the group's reference [batch, block, hidden]."""
        at = (rows[:, None], (offset + torch.arange(x.shape[1], device=x.device))[None, :])
        x, ref = x.float().flatten(1), ref[at].float().flatten(1)
        return (x - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)


TORCH_OPS = TorchOps()


def ops_for(device: torch.device):
    """The fast path's operations on `device`: the batch-invariant GPU kernels on CUDA, else PyTorch."""
    if torch.device(device).type == "cuda":
        from .triton_ops import TritonOps
        return TritonOps()
    return TORCH_OPS

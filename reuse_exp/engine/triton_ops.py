"""`TritonOps`: ops.py's interface on the batch-invariant kernels of triton_kernels.py (CUDA tensors).

Every launch parameter that shapes a reduction is chosen from the weights' shape and the
device alone (`MatmulPlan`); the row count only picks between the split matmul and its serial
form, which add the same parts in the same order. `run` (an int8 device scalar, optional) skips
the launch's work on the device when 0: how a captured graph leaves out a layer no row computes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from . import triton_kernels as K

SERIAL_ROWS = 128   # above this many rows the tiles alone fill the device: no workspace for parts
SMALL_ROWS = 64     # up to this many rows a matrix product is a matter of bandwidth
LOCKS = 1 << 16     # tile counters of split matmuls (each left at zero by the tile's last program)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@lru_cache(maxsize=None)
def _locks(device: torch.device) -> torch.Tensor:
    return torch.zeros(LOCKS, dtype=torch.int32, device=device)


@dataclass(frozen=True)
class MatmulPlan:
    """The split of K for an [N, K] weight on one device, the same for every row count: what
    fixes every output's order of sums. The tile is chosen by the row count for speed: on an
    H100 every tile shape tried gave the same bits for the same split (docs/bench_runs/gpu_truth/
    h100_call2_probe2.json), and the GPU tests check solo == batch end to end."""
    BK: int
    splits: int
    k_split: int
    fp32: bool

    @classmethod
    @lru_cache(maxsize=None)
    def of(cls, N: int, K: int, multiprocessors: int, fp32: bool, split: bool = True) -> "MatmulPlan":
        BK = min(64 if fp32 else 128, max(16, _pow2(K)))
        k_steps = cdiv(K, BK)
        # enough programs to keep every multiprocessor streaming weights at few rows, in parts of
        # whole steps
        target = max(1, min(8, k_steps // 2, round(3 * multiprocessors / cdiv(N, 64)))) if split else 1
        splits = max(d for d in range(1, target + 1) if k_steps % d == 0)
        return cls(BK, splits, k_steps // splits * BK, fp32)

    def tile(self, M: int) -> tuple[int, int, int, int]:
        """(BM, BN, warps, stages) for M rows: narrow tiles and deep pipelines while the weights'
        bandwidth is what counts, wide ones once the products are."""
        if self.fp32:
            return 32, 32, 4, 3
        return (64, 32, 4, 4) if M <= SMALL_ROWS else (128, 64, 4, 3)


def _plan(w: torch.Tensor, a: torch.Tensor, split: bool = True) -> MatmulPlan:
    sms = _multiprocessors(a.device.index or 0) if a.is_cuda else 8
    return MatmulPlan.of(w.shape[0] // (1 if split else 2), w.shape[1], sms, a.dtype == torch.float32, split)


def _precision(a: torch.Tensor) -> str:
    return "ieee" if a.dtype == torch.float32 else "tf32"


def _run_args(run: torch.Tensor | None, fallback: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return (run, True) if run is not None else (fallback, False)


def matmul(a: torch.Tensor, w: torch.Tensor, bias=None, residual=None, run=None) -> torch.Tensor:
    """a [..., K] @ w[N, K]^T, + bias, then residual + that."""
    N, Kdim = w.shape
    lead = a.shape[:-1]
    a = a.reshape(-1, Kdim).contiguous()
    M = a.shape[0]
    out = torch.empty(M, N, dtype=a.dtype, device=a.device)
    res = residual.reshape(M, N).contiguous() if residual is not None else out
    plan = _plan(w, a)
    BM, BN, warps, stages = plan.tile(M)
    serial = plan.splits == 1 or M > SERIAL_ROWS
    part = out if serial else torch.empty(plan.splits, M, N, dtype=torch.float32, device=a.device)
    grid = (cdiv(N, BN), cdiv(M, BM), 1 if serial else plan.splits)
    if not serial and grid[0] * grid[1] > LOCKS:
        raise ValueError(f"a split matmul of {grid[0] * grid[1]} tiles needs more than {LOCKS} tile counters")
    run, predicated = _run_args(run, out)
    K.matmul_kernel[grid](a, w, out, part, _locks(a.device), bias if bias is not None else out, res, run, M, N, Kdim,
                          plan.k_split, BM=BM, BN=BN, BK=plan.BK, SPLITS=plan.splits, SERIAL=serial,
                          HAS_BIAS=bias is not None, HAS_RES=residual is not None, PRECISION=_precision(a),
                          PREDICATED=predicated, num_warps=warps, num_stages=stages)
    return out.reshape(*lead, N)


class TritonOps:
    """ops.TorchOps's interface on batch-invariant, fused kernels (CUDA tensors)."""
    name = "triton"
    predicated = True   # `run` skips a launch on the device

    def rms_norm(self, x, weight, eps, run=None):
        N = x.shape[-1]
        x2 = x.reshape(-1, N).contiguous()
        out = torch.empty_like(x2)
        run, predicated = _run_args(run, out)
        K.rms_norm_kernel[(x2.shape[0],)](x2, weight, out, run, N, eps, BLOCK=_pow2(N), PREDICATED=predicated,
                                          num_warps=4)
        return out.reshape(x.shape)

    def linear(self, x, weight, bias=None, residual=None, run=None):
        return matmul(x, weight, bias, residual, run)

    def swiglu(self, x, gate_up, run=None):
        N, Kdim = gate_up.shape[0] // 2, gate_up.shape[1]
        lead = x.shape[:-1]
        a = x.reshape(-1, Kdim).contiguous()
        M = a.shape[0]
        out = torch.empty(M, N, dtype=a.dtype, device=a.device)
        plan = _plan(gate_up, a, split=False)
        BM, BN, warps, stages = plan.tile(M)
        run, predicated = _run_args(run, out)
        K.gate_up_kernel[(cdiv(N, BN), cdiv(M, BM))](a, gate_up, out, run, M, N, Kdim, BM=BM, BN=BN, BK=plan.BK,
                                                      PRECISION=_precision(a), PREDICATED=predicated,
                                                      num_warps=warps, num_stages=stages)
        return out.reshape(*lead, N)

    def rope_kv(self, qkv, cos, sin, n_heads, n_kv, k_buf, v_buf, cache_rows, positions, writes, run=None):
        B, T, width = qkv.shape
        D = width // (n_heads + 2 * n_kv)
        qkv = qkv.contiguous()
        q = torch.empty(B, T, n_heads, D, dtype=qkv.dtype, device=qkv.device)
        run, predicated = _run_args(run, q)
        K.rope_kv_kernel[(B * T,)](qkv, cos.contiguous(), sin.contiguous(), q, k_buf, v_buf, cache_rows,
                                   writes.view(torch.int8), positions, run, T, n_heads, n_kv, k_buf.stride(0),
                                   k_buf.stride(1), k_buf.stride(2), D=D, HALF=_pow2(D // 2),
                                   HEADS=_pow2(n_heads + n_kv), PREDICATED=predicated, num_warps=4)
        return q.transpose(1, 2)   # [rows, heads, T, D], a view of the token-major buffer

    def attention(self, q, k_buf, v_buf, cache_rows, positions, kv_len, block_size, prefill=False, run=None):
        B, n_heads, T, D = q.shape
        n_kv, S = k_buf.shape[1], k_buf.shape[2]
        q = q.transpose(1, 2).contiguous()   # token-major, as rope_kv wrote it (no copy then)
        out = torch.empty(B, T, n_heads * D, dtype=q.dtype, device=q.device)
        BM = 16
        run, predicated = _run_args(run, out)
        K.attention_kernel[(B * n_kv, cdiv(n_heads // n_kv * T, BM))](
            q, k_buf, v_buf, cache_rows, positions, kv_len, out, run, T, n_heads, n_kv, S, k_buf.stride(0),
            k_buf.stride(1), k_buf.stride(2), block_size, 1.0 / math.sqrt(D), D=D, DB=max(16, _pow2(D)), BM=BM,
            BN=64 if q.dtype != torch.float32 else 32, PRECISION=_precision(q), PREDICATED=predicated, num_warps=4)
        return out

    def reuse(self, x, fresh, values, rows, offset, computes, reuses, delta: bool):
        """One reused layer's hand-over (triton_kernels.reuse_kernel): values [batch, block, hidden]."""
        B, T, H = x.shape
        out = torch.empty_like(x)
        K.reuse_kernel[(B * T,)](x.contiguous(), fresh.contiguous(), out, values, rows, offset,
                                 computes.view(torch.int8), reuses.view(torch.int8), T, H, values.stride(0),
                                 values.stride(1), DELTA=delta, BLOCK=_pow2(H), num_warps=4)
        return out

    def renew(self, x, ref, rows, offset, computes):
        B, T, H = x.shape
        K.renew_kernel[(B * T,)](x.contiguous(), ref, rows, offset, computes.view(torch.int8), T, H, ref.stride(0),
                                 ref.stride(1), BLOCK=_pow2(H), num_warps=4)

    def drift(self, x, ref, rows, offset):
        B, T, H = x.shape
        out = torch.empty(B, dtype=torch.float32, device=x.device)
        K.drift_kernel[(B,)](x.contiguous(), ref, rows, offset, out, T, H, ref.stride(0), ref.stride(1),
                             BT=_pow2(T), BLOCK=min(max(16, 4096 // _pow2(T)), _pow2(H)), num_warps=4)
        return out

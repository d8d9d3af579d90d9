"""The fast path's GPU kernels (Triton): a decoder layer in eight launches, each batch-invariant.

Batch-invariant: a row's result is computed by the same instructions, reducing in the same
order, whatever the other rows and however many there are. Vendor kernels are not: cuBLAS
chooses its tiling and split of the reduction by the matrix's row count, torch's reductions
split by the number of outputs, attention kernels split the keys by the batch, so one sample
decoded alone and in a batch parts at some bf16 rounding. Here every choice that shapes a
reduction (tile sizes, the split of K, key blocks at absolute positions) depends only on the
weights' shape and the device, never on the rows.

The arithmetic mirrors the eager layer's roundings (bf16 after each op as torch rounds it), so
the two paths differ only in the order of their fp32 sums. No library ships such kernels as a
package (vLLM and SGLang vendor Thinking Machines' batch_invariant_ops); they are written here.

A layer that no row computes is skipped inside a captured CUDA graph by its kernels reading a
device flag (`run_ptr`, PREDICATED) and returning at once: the decision never leaves the GPU.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _skipped(run_ptr, PREDICATED: tl.constexpr):
    if PREDICATED:
        return tl.load(run_ptr) == 0
    return False


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, out_ptr, run_ptr, N, eps, BLOCK: tl.constexpr, PREDICATED: tl.constexpr):
    """One row per program: weight * bf16(x * rsqrt(mean(x^2) + eps)), in float32 (Qwen2's order)."""
    if _skipped(run_ptr, PREDICATED):
        return
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=ok, other=0.0).to(tl.float32)
    h = (x * tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    tl.store(out_ptr + row * N + cols, (w.to(tl.float32) * h.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _part(a_ptr, w_ptr, rm, rn, M, N, K, k_lo, k_hi, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          PRECISION: tl.constexpr):
    """One part of the K sum of a tile, from zero, in BK-wide steps in order (steps past K add zeros)."""
    m_ok, n_ok = rm < M, rn < N
    a_row = rm.to(tl.int64) * K
    w_row = rn.to(tl.int64) * K
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        a = tl.load(a_ptr + a_row[:, None] + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + w_row[None, :] + rk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _epilogue(total, rm, rn, M, N, out_ptr, bias_ptr, res_ptr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    """bf16(sum + bias), then bf16(residual + that): torch's roundings for `x + F.linear(h, w, b)`."""
    ok = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_BIAS:
        total = total + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y = total.to(out_ptr.dtype.element_ty)
    at = rm[:, None].to(tl.int64) * N + rn[None, :]
    if HAS_RES:
        y = (tl.load(res_ptr + at, mask=ok, other=0.0).to(tl.float32) + y.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + at, y, mask=ok)


@triton.jit(do_not_specialize=["M"])
def matmul_kernel(a_ptr, w_ptr, out_ptr, part_ptr, lock_ptr, bias_ptr, res_ptr, run_ptr, M, N, K, k_split,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLITS: tl.constexpr,
                  SERIAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                  PRECISION: tl.constexpr, PREDICATED: tl.constexpr):
    """out[M, N] = a[M, K] @ w[N, K]^T, + bias, then residual + that.

    K is cut into SPLITS parts of k_split; each is summed from zero (`_part`), and the parts are
    added in order, from zero. SERIAL: one program adds its tile's parts itself. Otherwise
    program (n, m, s) writes part s to `part_ptr` [SPLITS, M, N] and counts it in the tile's
    lock; the program that counts last adds the parts in order and resets the lock. Both add the
    same parts in the same order: the same bits, so the choice (by the row count, for speed) does
    not part rows."""
    if _skipped(run_ptr, PREDICATED):
        return
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    if SERIAL:
        total = tl.zeros((BM, BN), dtype=tl.float32)
        for s in range(SPLITS):
            total = total + _part(a_ptr, w_ptr, rm, rn, M, N, K, s * k_split, (s + 1) * k_split, BM, BN, BK,
                                  PRECISION)
        _epilogue(total, rm, rn, M, N, out_ptr, bias_ptr, res_ptr, HAS_BIAS, HAS_RES)
    else:
        s = tl.program_id(2)
        acc = _part(a_ptr, w_ptr, rm, rn, M, N, K, s * k_split, (s + 1) * k_split, BM, BN, BK, PRECISION)
        ok = (rm[:, None] < M) & (rn[None, :] < N)
        tile = rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(part_ptr + s * M * N + tile, acc, mask=ok)
        lock = lock_ptr + pid_m * tl.num_programs(0) + pid_n
        if tl.atomic_add(lock, 1, sem="acq_rel") == SPLITS - 1:
            total = tl.zeros((BM, BN), dtype=tl.float32)
            for t in range(SPLITS):
                total = total + tl.load(part_ptr + t * M * N + tile, mask=ok, other=0.0, cache_modifier=".cg")
            _epilogue(total, rm, rn, M, N, out_ptr, bias_ptr, res_ptr, HAS_BIAS, HAS_RES)
            tl.atomic_xchg(lock, 0)


@triton.jit(do_not_specialize=["M"])
def gate_up_kernel(a_ptr, w_ptr, out_ptr, run_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   PRECISION: tl.constexpr, PREDICATED: tl.constexpr):
    """SwiGLU's input: out[M, N] = bf16(bf16(silu(bf16(a @ gate^T))) * bf16(a @ up^T)), w = [gate; up]
    ([2N, K]): both products of a tile in one program, the element-wise tail in its epilogue."""
    if _skipped(run_ptr, PREDICATED):
        return
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    dt = out_ptr.dtype.element_ty
    g = _part(a_ptr, w_ptr, rm, rn, M, N, K, 0, K, BM, BN, BK, PRECISION).to(dt).to(tl.float32)
    u = _part(a_ptr, w_ptr + N * K, rm, rn, M, N, K, 0, K, BM, BN, BK, PRECISION).to(dt).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    ok = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], (act * u).to(dt), mask=ok)


@triton.jit
def rope_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_buf, v_buf, cache_rows_ptr, writes_ptr, pos_ptr, run_ptr,
                   T, NH, NKV, s_buf_b, s_buf_h, s_buf_s,
                   D: tl.constexpr, HALF: tl.constexpr, HEADS: tl.constexpr, PREDICATED: tl.constexpr):
    """One token per program: RoPE on its q and k heads (bf16(bf16(x * cos) + bf16(rotate_half(x) * sin))),
    q to `q_ptr` [rows * T, NH * D]; k and v into the cache row `cache_rows[b]` at the token's position,
    if `writes[b]` (a row that reuses this layer, or is along for the batch only, keeps its K/V)."""
    if _skipped(run_ptr, PREDICATED):
        return
    m = tl.program_id(0)
    b, t = m // T, m % T
    h = tl.arange(0, HEADS)
    j = tl.arange(0, HALF)
    half = D // 2
    width = (NH + 2 * NKV) * D
    rot = (h[:, None] < NH + NKV) & (j[None, :] < half)
    base = qkv_ptr + m.to(tl.int64) * width + h[:, None] * D + j[None, :]
    x1 = tl.load(base, mask=rot, other=0.0)
    x2 = tl.load(base + half, mask=rot, other=0.0)
    c1 = tl.load(cos_ptr + t * D + j, mask=j < half, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + t * D + half + j, mask=j < half, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + t * D + j, mask=j < half, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + t * D + half + j, mask=j < half, other=0.0).to(tl.float32)[None, :]
    dt = x1.dtype
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    y1 = ((f1 * c1).to(dt).to(tl.float32) + (-f2 * s1).to(dt).to(tl.float32)).to(dt)
    y2 = ((f2 * c2).to(dt).to(tl.float32) + (f1 * s2).to(dt).to(tl.float32)).to(dt)
    is_q = h[:, None] < NH
    q_at = q_ptr + m.to(tl.int64) * NH * D + h[:, None] * D + j[None, :]
    tl.store(q_at, y1, mask=rot & is_q)
    tl.store(q_at + half, y2, mask=rot & is_q)
    if tl.load(writes_ptr + b) != 0:
        row = tl.load(cache_rows_ptr + b).to(tl.int64) * s_buf_b + tl.load(pos_ptr + t) * s_buf_s
        is_k = (h[:, None] >= NH) & rot
        k_at = k_buf + row + (h[:, None] - NH) * s_buf_h + j[None, :]
        tl.store(k_at, y1, mask=is_k)
        tl.store(k_at + half, y2, mask=is_k)
        d = tl.arange(0, 2 * HALF)
        is_v = (h[:, None] < NKV) & (d[None, :] < D)
        v = tl.load(qkv_ptr + m.to(tl.int64) * width + (NH + NKV) * D + h[:, None] * D + d[None, :], mask=is_v,
                    other=0.0)
        tl.store(v_buf + row + h[:, None] * s_buf_h + d[None, :], v, mask=is_v)


@triton.jit
def attention_kernel(q_ptr, k_buf, v_buf, cache_rows_ptr, pos_ptr, kv_len_ptr, out_ptr, run_ptr,
                     T, NH, NKV, S, s_buf_b, s_buf_h, s_buf_s, block_size, scale,
                     D: tl.constexpr, DB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     PRECISION: tl.constexpr, PREDICATED: tl.constexpr):
    """Attention of the query heads that share one K/V head, BM query rows (head, token) a
    program; a token at position p sees keys j < min(kv_len, (p // block_size + 1) * block_size)
    (block-causal prefill, and every denoising forward). Keys go in BN blocks from position 0,
    so a row's sums do not depend on how many keys or rows share its call: keys a row may not
    see add exact zeros. Online softmax in float32, probabilities rounded to bf16 for P @ V."""
    if _skipped(run_ptr, PREDICATED):
        return
    pid_bh, pid_m = tl.program_id(0), tl.program_id(1)
    b, kvh = pid_bh // NKV, pid_bh % NKV
    G = NH // NKV
    r = pid_m * BM + tl.arange(0, BM)
    r_ok = r < G * T
    t = tl.where(r_ok, r % T, 0)
    head = kvh * G + r // T
    d = tl.arange(0, DB)
    d_ok = d < D
    token = (b * T + t).to(tl.int64)
    io = r_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + token[:, None] * NH * D + head[:, None] * D + d[None, :], mask=io, other=0.0)
    limit = tl.minimum(tl.load(kv_len_ptr), (tl.load(pos_ptr + t) // block_size + 1) * block_size)
    limit = tl.where(r_ok, limit, 0)
    end = tl.max(limit, axis=0)
    base = tl.load(cache_rows_ptr + b).to(tl.int64) * s_buf_b + kvh * s_buf_h
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, DB), dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634   # log2(e): exp2 below
    for start in range(0, end, BN):
        j = start + tl.arange(0, BN)
        j_ok = j < S
        kt = tl.load(k_buf + base + j[None, :] * s_buf_s + d[:, None], mask=d_ok[:, None] & j_ok[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        s = tl.where(j[None, :] < limit[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_buf + base + j[:, None] * s_buf_s + d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + token[:, None] * NH * D + head[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=io)


@triton.jit
def reuse_kernel(x_ptr, fresh_ptr, out_ptr, values_ptr, rows_ptr, offset_ptr, computes_ptr, reuses_ptr,
                 T, H, s_val_b, s_val_t, DELTA: tl.constexpr, BLOCK: tl.constexpr):
    """One reused layer, one token per program: a row that computed it keeps its result for later
    steps (delta: bf16(fresh - x), output: fresh) at the token's block position and passes the
    fresh output on; a row that reuses it passes the stand-in on (delta: bf16(x + kept), output: kept)."""
    m = tl.program_id(0)
    e, t = m // T, m % T
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    at = m.to(tl.int64) * H + cols
    slot = values_ptr + tl.load(rows_ptr + e).to(tl.int64) * s_val_b + (tl.load(offset_ptr) + t) * s_val_t + cols
    if tl.load(reuses_ptr + e) != 0:
        kept = tl.load(slot, mask=ok, other=0.0)
        if DELTA:
            x = tl.load(x_ptr + at, mask=ok, other=0.0)
            kept = (x.to(tl.float32) + kept.to(tl.float32)).to(kept.dtype)
        tl.store(out_ptr + at, kept, mask=ok)
    else:
        fresh = tl.load(fresh_ptr + at, mask=ok, other=0.0)
        if tl.load(computes_ptr + e) != 0:
            kept = fresh
            if DELTA:
                kept = (fresh.to(tl.float32) - tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)).to(fresh.dtype)
            tl.store(slot, kept, mask=ok)
        tl.store(out_ptr + at, fresh, mask=ok)


@triton.jit
def renew_kernel(x_ptr, ref_ptr, rows_ptr, offset_ptr, computes_ptr, T, H, s_ref_b, s_ref_t, BLOCK: tl.constexpr):
    """A group's drift reference: the rows that compute it keep its input, one token per program."""
    m = tl.program_id(0)
    e, t = m // T, m % T
    if tl.load(computes_ptr + e) != 0:
        cols = tl.arange(0, BLOCK)
        ok = cols < H
        x = tl.load(x_ptr + m.to(tl.int64) * H + cols, mask=ok, other=0.0)
        row = tl.load(rows_ptr + e).to(tl.int64) * s_ref_b + (tl.load(offset_ptr) + t) * s_ref_t
        tl.store(ref_ptr + row + cols, x, mask=ok)


@triton.jit
def drift_kernel(x_ptr, ref_ptr, rows_ptr, offset_ptr, out_ptr, T, H, s_ref_b, s_ref_t, BT: tl.constexpr,
                 BLOCK: tl.constexpr):
    """Per row: ||x - ref|| / ||ref|| over its T tokens and H features, in float32, all tokens of a
    BLOCK-wide feature step at once, the steps in order; ref is the row's window of the group's
    reference [batch, block, H]."""
    e = tl.program_id(0)
    base = tl.load(rows_ptr + e).to(tl.int64) * s_ref_b + tl.load(offset_ptr) * s_ref_t
    t = tl.arange(0, BT)
    num = tl.zeros((BT, BLOCK), dtype=tl.float32)
    den = tl.zeros((BT, BLOCK), dtype=tl.float32)
    for start in range(0, H, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = (t[:, None] < T) & (cols[None, :] < H)
        x = tl.load(x_ptr + (e * T + t[:, None]).to(tl.int64) * H + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        ref = tl.load(ref_ptr + base + t[:, None] * s_ref_t + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        num += (x - ref) * (x - ref)
        den += ref * ref
    tl.store(out_ptr + e, tl.sqrt(tl.sum(tl.sum(num, axis=1), axis=0)) /
             tl.maximum(tl.sqrt(tl.sum(tl.sum(den, axis=1), axis=0)), 1e-30))

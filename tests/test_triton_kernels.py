"""The fast path's GPU kernels (engine/triton_kernels.py) against the PyTorch reference
(engine/ops.py), run by Triton's interpreter on the CPU: their indexing, masking, the split of
K and its in-order sum, the predicated skip, and that a row's result does not depend on the
rows beside it. Float32 (the interpreter has no bf16 rounding); the bf16 kernels on a real GPU
are tests/test_gpu.py's. Skipped where Triton is not installed (CI installs it)."""
import os

import pytest
import torch

if torch.cuda.is_available():   # the interpreter would stand in for the GPU kernels of every test here
    pytest.skip("a GPU runs these kernels for real (tests/test_gpu.py)", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"   # before the kernels are defined

triton = pytest.importorskip("triton")

from reuse_exp.engine import triton_kernels  # noqa: E402
from reuse_exp.engine.model import rope_tables  # noqa: E402
from reuse_exp.engine.ops import TORCH_OPS as T  # noqa: E402
from reuse_exp.engine.triton_ops import MatmulPlan, TritonOps  # noqa: E402

if "Interpreted" not in type(triton_kernels.matmul_kernel).__name__:
    pytest.skip("the kernels were defined before TRITON_INTERPRET was set in this process", allow_module_level=True)

X = TritonOps()
G = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=G)


@pytest.mark.parametrize("M, N, K", [(8, 96, 64), (40, 70, 200), (3, 384, 192)])
def test_linear_and_swiglu_equal_torch_and_a_row_alone(M, N, K):
    a, w, b, r = rand(M, K), rand(N, K), rand(N), rand(M, N)
    got = X.linear(a, w, b, r)
    assert torch.allclose(got, T.linear(a, w, b, r), atol=1e-4)
    assert torch.equal(X.linear(a[1:2], w, b, r[1:2]), got[1:2])
    gu = rand(2 * N, K)
    assert torch.allclose(X.swiglu(a, gu), T.swiglu(a, gu), atol=1e-4)
    assert torch.equal(X.swiglu(a[-1:], gu)[0], X.swiglu(a, gu)[-1])


def test_a_split_matmul_adds_its_parts_as_the_serial_one_does(monkeypatch):
    """K cut into parts (split across programs, summed by the tile's last) gives the serial
    form's bits: the row count only chooses between them."""
    from reuse_exp.engine import triton_ops
    a, w = rand(4, 512), rand(64, 512)
    plan = MatmulPlan.of(64, 512, 132, True)
    assert plan.splits > 1
    split = X.linear(a, w)
    monkeypatch.setattr(triton_ops, "SERIAL_ROWS", 0)   # every row count serial
    assert torch.equal(X.linear(a, w), split)
    assert torch.allclose(split, a @ w.T, atol=1e-3)


def test_a_launch_whose_flag_is_zero_writes_nothing():
    """How a skipped layer costs nothing in a captured graph: its kernels return at once."""
    x, w = rand(16, 64), rand(64, 64)
    off, on = torch.zeros((), dtype=torch.int8), torch.ones((), dtype=torch.int8)
    assert torch.allclose(X.linear(x, w, run=on), x @ w.T, atol=1e-4)
    locks = torch.zeros(4, dtype=torch.int32)
    for run, expect in ((off, None), (on, x @ w.T)):
        out = torch.full((16, 64), 7.0)
        triton_kernels.matmul_kernel[(1, 1, 1)](x, w, out, out, locks, out, out, run, 16, 64, 64, 64, BM=32, BN=64,
                                                BK=64, SPLITS=1, SERIAL=True, HAS_BIAS=False, HAS_RES=False,
                                                PRECISION="ieee", PREDICATED=True)
        assert (out == 7.0).all() if expect is None else torch.allclose(out, expect, atol=1e-4)
        normed = torch.full((16, 64), 7.0)
        triton_kernels.rms_norm_kernel[(16,)](x, w[0], normed, run, 64, 1e-6, BLOCK=64, PREDICATED=True)
        assert (normed == 7.0).all() == (expect is None)


def test_norm_and_drift_equal_torch():
    x, w, ref = rand(5, 7, 48), rand(48), rand(6, 32, 48)
    assert torch.allclose(X.rms_norm(x, w, 1e-6), T.rms_norm(x, w, 1e-6), atol=1e-5)
    rows, offset = torch.tensor([4, 1, 0, 2, 5]), torch.tensor([8])
    assert torch.allclose(X.drift(x, ref, rows, offset), T.drift(x, ref, rows, offset), atol=1e-5)
    assert torch.equal(X.drift(x[1:2], ref, rows[1:2], offset)[0], X.drift(x, ref, rows, offset)[1])


@pytest.mark.parametrize("delta", [True, False], ids=["delta", "output"])
def test_the_reuse_hand_over_equals_torch(delta):
    x, fresh = rand(3, 8, 48), rand(3, 8, 48)
    values = rand(4, 32, 48)
    rows, offset = torch.tensor([2, 0, 3]), torch.tensor([16])
    computes, reuses = torch.tensor([True, False, False]), torch.tensor([False, True, False])
    v1, v2 = values.clone(), values.clone()
    out_t = T.reuse(x, fresh, v1, rows, offset, computes, reuses, delta)
    out_x = X.reuse(x, fresh, v2, rows, offset, computes, reuses, delta)
    assert torch.allclose(out_t, out_x, atol=1e-6) and torch.allclose(v1, v2, atol=1e-6)
    assert not torch.equal(v1[2, 16:24], values[2, 16:24]) and torch.equal(v1[0], values[0])
    r1, r2 = values.clone(), values.clone()
    T.renew(x, r1, rows, offset, computes)
    X.renew(x, r2, rows, offset, computes)
    assert torch.equal(r1, r2)


def test_rope_kv_and_attention_equal_torch_and_do_not_depend_on_the_batch():
    nh, nkv, D, B, Tt, S = 4, 2, 24, 3, 8, 64
    qkv = rand(B, Tt, (nh + 2 * nkv) * D)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    pos = torch.arange(20, 20 + Tt)
    cos, sin = rope_tables(inv, pos, torch.float32)
    kb1, vb1 = rand(4, nkv, S, D), rand(4, nkv, S, D)
    kb2, vb2 = kb1.clone(), vb1.clone()
    rows, writes = torch.tensor([2, 0, 3]), torch.tensor([True, False, True])
    q1 = T.rope_kv(qkv, cos, sin, nh, nkv, kb1, vb1, rows, pos, writes)
    q2 = X.rope_kv(qkv, cos, sin, nh, nkv, kb2, vb2, rows, pos, writes)
    assert torch.allclose(q1, q2, atol=1e-6) and torch.allclose(kb1, kb2, atol=1e-6) and torch.equal(vb1, vb2)
    kv_len = torch.tensor([32])
    a1 = T.attention(q1, kb1, vb1, rows, pos, kv_len, 32)
    a2 = X.attention(q1, kb1, vb1, rows, pos, kv_len, 32)
    assert torch.allclose(a1, a2, atol=1e-5)
    assert torch.equal(X.attention(q1[1:2], kb1, vb1, rows[1:2], pos, kv_len, 32), a2[1:2])
    # a prefill of two blocks and the finalize of its second block: the same keys, the same bits
    qp = rand(1, nh, 16, D)
    p16 = torch.arange(0, 16)
    pre = X.attention(qp, kb1, vb1, rows[:1], p16, torch.tensor([16]), 8, prefill=True)
    assert torch.allclose(pre, T.attention(qp, kb1, vb1, rows[:1], p16, torch.tensor([16]), 8, prefill=True), atol=1e-5)
    fin = X.attention(qp[:, :, 8:], kb1, vb1, rows[:1], p16[8:], torch.tensor([16]), 8)
    assert torch.equal(pre[:, 8:], fin)

"""Probe of the fast path's building blocks on a GPU: the batch-invariant kernels (against
PyTorch, bit for bit across row counts, timed against cuBLAS and the copy floor) and CUDA-graph
conditional nodes. Writes its JSON after every section (a killed probe keeps what it had).

    python benchmarks/gpu_probe.py --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reuse_exp.engine.ops import TORCH_OPS  # noqa: E402
from reuse_exp.engine.triton_ops import MatmulPlan, TritonOps, _multiprocessors  # noqa: E402

OPS = TritonOps()
SHAPES_7B = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944),
             "lm_head": (152064, 3584)}


def timed(fn, n: int = 30) -> dict:
    """Median and spread of `fn` replayed from a CUDA graph, after warm-up, in ms."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return {"ms": statistics.median(times), "min": min(times), "max": max(times)}


def copy_bandwidth() -> float:
    x = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), 10)["ms"]
    return 2 * x.numel() / (t / 1e3) / 1e9


def matmul_section(out: dict, bw: float) -> None:
    rows = {}
    for name, (N, K) in SHAPES_7B.items():
        w = torch.randn(N, K, dtype=torch.bfloat16, device="cuda") * 0.02
        plan = MatmulPlan.of(N, K, _multiprocessors(0), False)
        row = {"N": N, "K": K, "plan": plan.__dict__}
        for M in (8, 64, 256, 1024):
            a = torch.randn(M, 2 * K if name == "down" else K, dtype=torch.bfloat16, device="cuda")
            gated = name == "down"
            got = OPS.gated_linear(a, w) if gated else OPS.linear(a, w)
            ref = TORCH_OPS.gated_linear(a, w) if gated else TORCH_OPS.linear(a, w)
            solo = OPS.gated_linear(a[:8], w) if gated else OPS.linear(a[:8], w)
            entry = {"max_abs_diff_vs_torch": (got.float() - ref.float()).abs().max().item(),
                     "ref_max": ref.float().abs().max().item(),
                     "first_8_rows_equal_solo": bool(torch.equal(solo, got[:8]))}
            if M in (8, 256):
                f = (lambda: OPS.gated_linear(a, w)) if gated else (lambda: OPS.linear(a, w))
                g = (lambda: TORCH_OPS.gated_linear(a, w)) if gated else (lambda: TORCH_OPS.linear(a, w))
                entry["triton"] = timed(f)
                entry["torch"] = timed(g)
                entry["floor_ms"] = N * K * 2 / bw / 1e6
            row[f"M{M}"] = entry
        rows[name] = row
        del w
    out["matmul"] = rows


def layer_section(out: dict, bw: float) -> None:
    """One 7B decoder layer's small-block forward at batch 1 and 8, Triton against PyTorch."""
    from reuse_exp.engine.model import LayerWeights, rope_tables
    H, I, nh, nkv, D, S = 3584, 18944, 28, 4, 128, 1024
    dev, dt = "cuda", torch.bfloat16
    r = lambda *s: torch.randn(*s, dtype=dt, device=dev) * 0.02  # noqa: E731
    w = LayerWeights(torch.ones(H, dtype=dt, device=dev), r((nh + 2 * nkv) * D, H), r((nh + 2 * nkv) * D),
                     r(H, nh * D), torch.ones(H, dtype=dt, device=dev), r(2 * I, H), r(H, I))
    inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, device=dev).float() / D))
    res = {}
    for B in (1, 8, 32):
        T = 8
        pos = torch.arange(320 + 8, 328 + 8, device=dev)
        cos, sin = rope_tables(inv, pos, dt)
        kb, vb = r(B, nkv, S, D), r(B, nkv, S, D)
        rows = torch.arange(B, device=dev)
        writes = torch.ones(B, dtype=torch.bool, device=dev)
        kv_len = torch.tensor([352], device=dev)
        x = r(B, T, H) * 50

        def layer(ops):
            h = ops.rms_norm(x, w.ln1, 1e-6)
            qkv = ops.linear(h, w.wqkv, w.bqkv)
            q = ops.rope_kv(qkv, cos, sin, nh, nkv, kb, vb, rows, pos, writes)
            a = ops.attention(q, kb, vb, rows, pos, kv_len, 32)
            o = ops.linear(a, w.wo, residual=x)
            m = ops.rms_norm(o, w.ln2, 1e-6)
            return ops.gated_linear(ops.linear(m, w.wgu), w.wd, residual=o)

        y_t, y_r = layer(OPS), layer(TORCH_OPS)
        entry = {"max_abs_diff_vs_torch": (y_t.float() - y_r.float()).abs().max().item(),
                 "triton": timed(lambda: layer(OPS)), "torch": timed(lambda: layer(TORCH_OPS)),
                 "floor_ms": sum(t.numel() for t in w) * 2 / bw / 1e6}
        for name, fn in (("attention", lambda: OPS.attention(OPS.rope_kv(OPS.linear(x, w.wqkv, w.bqkv), cos, sin, nh,
                                                                             nkv, kb, vb, rows, pos, writes),
                                                                 kb, vb, rows, pos, kv_len, 32)),
                         ("norm", lambda: OPS.rms_norm(x, w.ln1, 1e-6))):
            entry[name] = timed(fn)
        res[f"B{B}"] = entry
    out["layer"] = res


def invariance_section(out: dict) -> None:
    """Rows of a bigger call equal the same rows alone, bit for bit: norm, attention, drift."""
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(64, 8, 3584, dtype=dt, device=dev)
    w = torch.randn(3584, dtype=dt, device=dev)
    res = {"norm": bool(torch.equal(OPS.rms_norm(x, w, 1e-6)[:1], OPS.rms_norm(x[:1], w, 1e-6))),
           "drift": bool(torch.equal(OPS.drift(x, x * 1.01)[:1], OPS.drift(x[:1], x[:1] * 1.01)))}
    nh, nkv, D, S = 28, 4, 128, 1024
    kb = torch.randn(32, nkv, S, D, dtype=dt, device=dev)
    vb = torch.randn_like(kb)
    q = torch.randn(32, nh, 8, D, dtype=dt, device=dev)
    pos = torch.arange(64, 72, device=dev)
    rows = torch.arange(32, device=dev)
    for kv in (96, 300):
        kv_len = torch.tensor([kv], device=dev)
        full = OPS.attention(q, kb, vb, rows, pos, kv_len, 32)
        res[f"attention_kv{kv}"] = bool(torch.equal(full[3:4], OPS.attention(q[3:4], kb, vb, rows[3:4], pos, kv_len, 32)))
    # a block's tokens seen by a prefill of two blocks and by the finalize of that block: same keys
    qp = torch.randn(1, nh, 64, D, dtype=dt, device=dev)
    pre = OPS.attention(qp, kb, vb, rows[:1], torch.arange(0, 64, device=dev), torch.tensor([64], device=dev), 32,
                        prefill=True)
    fin = OPS.attention(qp[:, :, 32:], kb, vb, rows[:1], torch.arange(32, 64, device=dev),
                        torch.tensor([64], device=dev), 32)
    res["prefill_equals_finalize"] = bool(torch.equal(pre[:, 32:], fin))
    ref = TORCH_OPS.attention(qp, kb, vb, rows[:1], torch.arange(0, 64, device=dev), torch.tensor([64], device=dev), 32,
                              prefill=True)
    res["prefill_vs_torch_max_abs_diff"] = (pre.float() - ref.float()).abs().max().item()
    out["invariance"] = res


def conditional_section(out: dict) -> None:
    """A graph whose middle runs only when a device flag says so (CUDA conditional node)."""
    res = {"has_if_node": hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node")}
    if res["has_if_node"]:
        dev = "cuda"
        x = torch.randn(8, 3584, dtype=torch.bfloat16, device=dev)
        w = torch.randn(3584, 3584, dtype=torch.bfloat16, device=dev) * 0.02
        y = torch.zeros_like(x)
        flag = torch.zeros((), dtype=torch.bool, device=dev)
        for _ in range(2):
            y.copy_(OPS.linear(x, w, residual=x))
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y.zero_()
            g.begin_capture_to_if_node(flag)
            y.copy_(OPS.linear(x, w, residual=x))
            g.end_capture_to_conditional_node()
            y.add_(1)
        expect = OPS.linear(x, w, residual=x) + 1
        flag.fill_(True)
        g.replay()
        on = bool(torch.equal(y, expect))
        flag.fill_(False)
        g.replay()
        off = bool(torch.equal(y, torch.ones_like(y)))
        t_on = timed_graph(g, flag, True)
        t_off = timed_graph(g, flag, False)
        res.update({"runs_when_true": on, "skips_when_false": off, "ms_true": t_on, "ms_false": t_off})
    out["conditional"] = res


def timed_graph(g, flag, value) -> float:
    flag.fill_(value)
    for _ in range(3):
        g.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(20):
        g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 20


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json", required=True)
    args = p.parse_args()
    import triton
    out = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "triton": triton.__version__, "date": time.strftime("%Y-%m-%d")}
    path = Path(args.json)
    bw = copy_bandwidth()
    out["copy_GBps"] = bw
    for section in (conditional_section, invariance_section, lambda o: matmul_section(o, bw),
                    lambda o: layer_section(o, bw)):
        t0 = time.perf_counter()
        try:
            section(out)
        except Exception as e:  # a probe: record what broke and go on to the next section
            out.setdefault("errors", []).append(f"{getattr(section, '__name__', 'section')}: {type(e).__name__}: {e}")
        out.setdefault("seconds", []).append(round(time.perf_counter() - t0, 1))
        path.write_text(json.dumps(out, indent=1))
        print(json.dumps(out)[-3000:], flush=True)


if __name__ == "__main__":
    main()

"""Probe 2 of the fast path's matmul on a GPU: the current plan's speed per 7B weight against
cuBLAS and the copy floor at 8 and 256 rows, and which tile variants give the same bits as the
plan (rows are batch-invariant only across variants that do). JSON after every section.

    python benchmarks/gpu_probe2.py --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_probe import SHAPES_7B, copy_bandwidth, timed  # noqa: E402
from reuse_exp.engine import triton_kernels as K  # noqa: E402
from reuse_exp.engine.ops import TORCH_OPS  # noqa: E402
from reuse_exp.engine.triton_ops import TritonOps, _locks, cdiv  # noqa: E402

OPS = TritonOps()


def plan_section(out: dict, bw: float) -> None:
    rows = {}
    for name, (N, Kd) in SHAPES_7B.items():
        if name == "gate_up":
            w = torch.randn(N, Kd, dtype=torch.bfloat16, device="cuda") * 0.02
        else:
            w = torch.randn(N, Kd, dtype=torch.bfloat16, device="cuda") * 0.02
        row = {}
        for M in (8, 256):
            a = torch.randn(M, Kd, dtype=torch.bfloat16, device="cuda")
            f = (lambda: OPS.swiglu(a, w)) if name == "gate_up" else (lambda: OPS.linear(a, w))
            g = (lambda: TORCH_OPS.swiglu(a, w)) if name == "gate_up" else (lambda: TORCH_OPS.linear(a, w))
            row[f"M{M}"] = {"triton": timed(f), "torch": timed(g), "floor_ms": N * Kd * 2 / bw / 1e6,
                            "max_abs_diff": (f().float() - g().float()).abs().max().item()}
        rows[name] = row
        del w
    out["plan"] = rows


def variant(a, w, BM, BN, BK, splits, warps, stages):
    M, Kd = a.shape
    N = w.shape[0]
    out = torch.empty(M, N, dtype=a.dtype, device=a.device)
    k_steps = cdiv(Kd, BK)
    k_split = k_steps // splits * BK
    K.matmul_kernel[(cdiv(N, BN), cdiv(M, BM), 1)](a, w, out, out, _locks(a.device), out, out, out, M, N, Kd,
                                                   k_split, BM=BM, BN=BN, BK=BK, SPLITS=splits, SERIAL=True,
                                                   HAS_BIAS=False, HAS_RES=False, PRECISION="tf32",
                                                   PREDICATED=False, num_warps=warps, num_stages=stages)
    return out


def variants_section(out: dict) -> None:
    """Tile variants of the serial kernel (one split, and four) against the base tile (64, 64, 128,
    4 warps): the same bits? and their times at 8 and 256 rows."""
    res = []
    for name in ("o", "down"):
        N, Kd = SHAPES_7B[name]
        w = torch.randn(N, Kd, dtype=torch.bfloat16, device="cuda") * 0.02
        a = torch.randn(256, Kd, dtype=torch.bfloat16, device="cuda")
        for splits in (1, 4):
            base = variant(a, w, 64, 64, 128, splits, 4, 3)
            for BM, BN, BK, warps, stages in [(64, 64, 128, 4, 4), (64, 128, 128, 4, 3), (128, 64, 128, 4, 3),
                                              (128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (64, 256, 64, 8, 3),
                                              (16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (64, 32, 128, 4, 4),
                                              (64, 64, 64, 4, 4), (128, 256, 64, 8, 3)]:
                try:
                    got = variant(a, w, BM, BN, BK, splits, warps, stages)
                    entry = {"shape": name, "splits": splits, "tile": [BM, BN, BK, warps, stages],
                             "same_bits": bool(torch.equal(got, base)),
                             "M8": timed(lambda: variant(a[:8], w, BM, BN, BK, splits, warps, stages))["ms"],
                             "M256": timed(lambda: variant(a, w, BM, BN, BK, splits, warps, stages))["ms"]}
                except Exception as e:  # a variant that does not compile: recorded, the next one tried
                    entry = {"shape": name, "splits": splits, "tile": [BM, BN, BK, warps, stages],
                             "error": f"{type(e).__name__}: {str(e)[:200]}"}
                res.append(entry)
        del w
    out["variants"] = res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json", required=True)
    args = p.parse_args()
    out = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d")}
    path = Path(args.json)
    bw = copy_bandwidth()
    out["copy_GBps"] = bw
    for section in (lambda o: plan_section(o, bw), variants_section):
        t0 = time.perf_counter()
        section(out)
        out.setdefault("seconds", []).append(round(time.perf_counter() - t0, 1))
        path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

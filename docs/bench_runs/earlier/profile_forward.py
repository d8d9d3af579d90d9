"""Where one small-block forward's time goes (7B shape, bf16, batch 1, CUDA graphs).

    python docs/bench_runs/profile_forward.py --json out.json

Times the graphed small-block forward, lists its kernels by device time (torch.profiler
over graph replays), and times each projection's matrix product alone at 8, 32 and 256
rows, rotating over the 28 layers' weights so that the L2 cache does not serve them.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from reuse_exp.engine.config import shape
from reuse_exp.engine.fast import FastRunner
from reuse_exp.engine.loading import random_model
from reuse_exp.engine.model import ForwardKind


def timed(fn, iters=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def graphed(fn):
    """`fn` captured as a CUDA graph: its replay, without host launch costs."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    out = {}
    model = random_model(shape("7b"), "bfloat16", device="cuda", seed=0)
    with torch.inference_mode():
        runner = FastRunner(model, compile_layers=args.compile)
        prefix = 384
        cache = runner.new_cache(1, prefix + 32, 32)
        toks = torch.randint(0, 150000, (1, prefix + 32), device="cuda")
        runner(toks[:, :prefix], ForwardKind.PREFILL, cache)
        blk = toks[:, prefix:].contiguous()
        t0 = time.perf_counter()
        runner(blk, ForwardKind.FULL_BLOCK, cache)
        torch.cuda.synchronize()
        out["first_full_block_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        runner(blk[:, 8:16], ForwardKind.SMALL_BLOCK, cache, 8)
        torch.cuda.synchronize()
        out["first_small_block_s"] = time.perf_counter() - t0

        def small():
            runner(blk[:, 8:16], ForwardKind.SMALL_BLOCK, cache, 8)
        out["small_block_ms"] = timed(small)
        (_, graph, _), = [v for k, v in runner.graphs.items() if k[0] is ForwardKind.SMALL_BLOCK]
        out["graph_replay_ms"] = timed(graph.replay)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                graph.replay()
            torch.cuda.synchronize()
        kernels = {}
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if t > 0:
                kernels[e.key] = {"us_per_forward": t / 10, "calls_per_forward": e.count / 10}
        out["kernels"] = dict(sorted(kernels.items(), key=lambda kv: -kv[1]["us_per_forward"]))
        print(f"small-block forward {out['small_block_ms']:.3f} ms, replay alone {out['graph_replay_ms']:.3f} ms")
        for name, k in list(out["kernels"].items())[:25]:
            print(f"{k['us_per_forward']:9.1f} us {k['calls_per_forward']:6.1f}x  {name[:110]}")
        # each projection alone, rotating over the layers' weights
        layers = [layer.weights() for layer in model.model.layers]
        gemms = {}
        for rows in (8, 32, 256):
            x = torch.randn(rows, 3584, device="cuda", dtype=torch.bfloat16)
            xi = torch.randn(rows, 18944, device="cuda", dtype=torch.bfloat16)
            for name, pick, inp in (("qkv", lambda w: w.wqkv, x), ("o", lambda w: w.wo, x),
                                    ("gate_up", lambda w: w.wgu, x), ("down", lambda w: w.wd, xi)):
                ws = [pick(w) for w in layers]
                ms = timed(graphed(lambda: [F.linear(inp, w) for w in ws]), iters=10) / len(ws)
                nbytes = ws[0].numel() * 2
                gemms[f"{name}_m{rows}"] = {"ms": ms, "gbs": nbytes / ms / 1e6}
            head = model.lm_head.weight
            ms = timed(graphed(lambda: F.linear(x, head)), iters=10)
            gemms[f"lm_head_m{rows}"] = {"ms": ms, "gbs": head.numel() * 2 / ms / 1e6}
        out["gemms"] = gemms
        for k, v in gemms.items():
            print(f"{k:14s} {v['ms'] * 1e3:8.1f} us {v['gbs']:7.0f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

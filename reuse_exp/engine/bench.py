"""Benchmark: random weights of a named shape, a fixed trajectory, warm-up, then timing.

    python -m reuse_exp.engine.bench --shape tiny                       # CPU
    python -m reuse_exp.engine.bench --shape 7b --device cuda --dtype bfloat16 --markdown docs/bench.md

Random weights never pass the unmasking threshold, so every step unmasks exactly one
token and the trajectory is fixed; the stop token is ignored. Reported: the device's
copy bandwidth and the memory-bandwidth floor of one forward (weights read / bandwidth,
measured in the same run), milliseconds per forward kind (median), the reuse saving
against the ideal (the bytes of the skipped layers), end-to-end tokens/s (median of
timed runs after an untimed warm-up), and peak memory.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from .config import shape as named_shape
from .decoding import DecodeConfig, EagerRunner, generate
from .fast import FastRunner
from .loading import parse_dtype, random_model
from .model import FastDLLM, ForwardKind
from .reuse import LayerReuse, ReusePolicy, RowMask


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, iters=10)
    return 2 * nbytes / (ms / 1e3)


def weight_bytes(model: FastDLLM, layers: tuple[int, ...] | None = None) -> int:
    """Bytes a forward reads: every weight but the embedding (a gather, not a read of it all)."""
    if layers is not None:
        return sum(p.numel() * p.element_size() for i in layers for p in model.model.layers[i].parameters())
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if not n.startswith("model.embed_tokens"))


@dataclass
class BenchResult:
    machine: dict
    settings: dict
    bandwidth_gbs: float
    weights_gb: float
    floor_ms: float
    forward_ms: dict = field(default_factory=dict)      # kind -> ms
    reuse: list = field(default_factory=list)           # per config: small-block ms, saving, ideal
    end_to_end: list = field(default_factory=list)      # per config and batch: tokens/s
    peak_memory_gb: float | None = None
    path_check: dict | None = None                      # eager vs fast tokens at k=1
    path_name: str = ""


def machine_info(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def time_forward_kinds(model: FastDLLM, runner, batch: int, prefix: int, block: int, small: int,
                       policies: list[ReusePolicy], iters: int) -> tuple[dict, dict]:
    """Milliseconds of each forward kind, logits of the 8 needed positions included, at a
    prefix of `prefix` tokens; and of the small-block forward under each reuse policy."""
    dev = model.device
    cache = runner.new_cache(batch, prefix + block, block)
    tokens = torch.randint(0, model.config.vocab_size, (batch, prefix + block), device=dev)
    runner(tokens[:, :prefix], ForwardKind.PREFILL, cache)
    blk = tokens[:, prefix:].contiguous()
    window = list(range(small))

    def full():
        model.logits(runner(blk, ForwardKind.FULL_BLOCK, cache)[:, window])

    def small_block(plan=None):
        model.logits(runner(blk[:, 8:8 + small], ForwardKind.SMALL_BLOCK, cache, 8, plan)[:, window])

    def finalize():
        cache.prefix_len = prefix  # re-commit the same block each time
        model.logits(runner(blk, ForwardKind.FINALIZE, cache)[:, -1:])

    kinds = {"full_block": median_ms(full, dev, iters), "small_block": median_ms(small_block, dev, iters),
             "finalize": median_ms(finalize, dev, iters)}
    cache.prefix_len = prefix
    reused = {}
    everyone, no_one = RowMask.of([True] * batch, dev), RowMask.of([False] * batch, dev)
    for policy in policies:
        rc = runner.new_reuse_cache(policy, batch, block)
        runner(blk, ForwardKind.FULL_BLOCK, cache, 0, LayerReuse(frozenset(policy.layers), no_one, everyone, rc, 0))
        plan = LayerReuse(frozenset(policy.layers), everyone, no_one, rc, 8)
        reused[(policy.k, policy.subset)] = median_ms(lambda: small_block(plan), dev, iters)
    return kinds, reused


def end_to_end(model: FastDLLM, runner, batch: int, prompt_len: int, new_tokens: int,
               policy: ReusePolicy | None, repeats: int, mask_id: int) -> dict:
    cfg = DecodeConfig(mask_id=mask_id, stop_id=-1, pad_id=0, max_new_tokens=new_tokens,
                       threshold=1.0, ignore_stop=True)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, mask_id, (batch, prompt_len), generator=gen).tolist()
    generate(model, prompts, cfg, policy, runner=runner)  # warm-up: first-call costs (graph capture) are not throughput
    runs = [generate(model, prompts, cfg, policy, runner=runner).report for _ in range(repeats)]
    tps = [r.tokens_per_second for r in runs]
    return {"tokens_per_second": statistics.median(tps), "tokens": runs[0].generated_tokens,
            "seconds": statistics.median(r.wall_seconds for r in runs),
            "forwards": dict(runs[0].batch_forwards), "skipped_fraction": runs[0].skipped_fraction}


@torch.no_grad()
def compare_paths(model: FastDLLM, n_tokens: int, prompt_len: int, compile_layers: bool = False) -> dict:
    """Tokens of the eager and the fast path at k=1 on the fixed trajectory: equal, or where
    they first part and how far apart the two paths' logits were at that step's forward."""
    mask_id = model.config.vocab_size - 1
    cfg = DecodeConfig(mask_id=mask_id, stop_id=-1, pad_id=0, max_new_tokens=n_tokens, threshold=1.0, ignore_stop=True)
    prompt = torch.randint(0, mask_id, (1, prompt_len), generator=torch.Generator().manual_seed(1)).tolist()
    eager = generate(model, prompt, cfg).tokens[0][:n_tokens]
    fast = generate(model, prompt, cfg, runner=FastRunner(model, compile_layers=compile_layers)).tokens[0][:n_tokens]
    first = next((i for i, (a, b) in enumerate(zip(eager, fast)) if a != b), None)
    out = {"tokens_compared": len(eager), "equal": eager == fast, "first_divergence": first}
    # logits of one full-block forward over the same tokens, eager against fast
    P = prompt_len // 32 * 32
    if P >= 32:
        toks = torch.tensor(prompt[0][:P] + (eager + [0] * 32)[:32], device=model.device)[None]
        runner = FastRunner(model)
        ce, cf = model.new_cache(1, P + 32, 32), runner.new_cache(1, P + 32, 32)
        model(toks[:, :P], ForwardKind.PREFILL, ce)
        runner(toks[:, :P], ForwardKind.PREFILL, cf)
        le = model.logits(model(toks[:, P:], ForwardKind.FULL_BLOCK, ce)).float()
        lf = model.logits(runner(toks[:, P:], ForwardKind.FULL_BLOCK, cf)).float()
        out["full_block_logit_max_abs_diff"] = float((le - lf).abs().max())
        out["full_block_logit_scale"] = float(le.abs().max())
    return out


def run_bench(args) -> BenchResult:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = random_model(named_shape(args.shape), args.dtype, device=str(device), seed=0)
    n = model.num_layers
    bw = copy_bandwidth(device, args.copy_mb << 20)
    wbytes = weight_bytes(model)
    runner = FastRunner(model, compile_layers=args.compile) if args.path == "fast" else EagerRunner(model)
    result = BenchResult(machine=machine_info(device), settings=vars(args).copy(), bandwidth_gbs=bw / 1e9,
                         weights_gb=wbytes / 1e9, floor_ms=wbytes / bw * 1e3, path_name=runner.name)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    policies = [ReusePolicy.create(k, s, n, mode=args.mode) for k in args.k if k > 1 for s in args.subset]
    prefix = (args.prompt_len + args.new_tokens // 2) // 32 * 32  # the middle of the trajectory
    kinds, reused = time_forward_kinds(model, runner, 1, prefix, 32, 8, policies, args.iters)
    result.forward_ms = kinds
    base = kinds["small_block"]
    for p in policies:
        skipped = weight_bytes(model, p.layers)
        ms = reused[(p.k, p.subset)]
        result.reuse.append({"k": p.k, "subset": p.subset, "small_block_ms": ms,
                             "saving": 1 - ms / base, "ideal_saving": skipped / wbytes,
                             "floor_ms": (wbytes - skipped) / bw * 1e3})
    mask_id = model.config.vocab_size - 1
    for batch in args.batch:
        for k in sorted(set(args.k)):
            for s in (args.subset if k > 1 else args.subset[:1]):
                policy = ReusePolicy.create(k, s, n, mode=args.mode) if k > 1 else None
                row = end_to_end(model, runner, batch, args.prompt_len, args.new_tokens, policy, args.repeats, mask_id)
                result.end_to_end.append({"batch": batch, "k": k, "subset": s if k > 1 else "-", **row})
    if device.type == "cuda":
        result.peak_memory_gb = torch.cuda.max_memory_allocated(device) / 1e9
    if args.check_tokens:
        result.path_check = compare_paths(model, args.check_tokens, args.prompt_len, args.compile)
    return result


def markdown(r: BenchResult) -> str:
    m, s = r.machine, r.settings
    path = r.path_name
    lines = [f"# Benchmark: shape {s['shape']}, {s['dtype']}, {s['device']}, {path} path",
             "", f"Machine: {m.get('gpu', 'CPU')} · torch {m['torch']} · CUDA {m.get('cuda', '-')} · "
             f"python {m['python']} · {m['date']}",
             f"Trajectory: prompt {s['prompt_len']}, {s['new_tokens']} new tokens, stop ignored, one token per step "
             f"(random weights); reuse mode {s['mode']}. Warm-up excluded; medians.",
             "", "| quantity | value |", "| --- | --- |",
             f"| copy bandwidth (read + write) | {r.bandwidth_gbs:.0f} GB/s |",
             f"| weights read per forward (all but the embedding) | {r.weights_gb:.2f} GB |",
             f"| floor per forward at batch 1 | {r.floor_ms:.2f} ms |"]
    for kind, ms in r.forward_ms.items():
        lines.append(f"| {kind} forward, k=1 | {ms:.2f} ms ({ms / r.floor_ms:.2f}x the floor) |")
    if r.peak_memory_gb is not None:
        lines.append(f"| peak GPU memory | {r.peak_memory_gb:.1f} GB |")
    if r.reuse:
        lines += ["", "| reuse (small-block forward) | ms | x its floor | saving | ideal saving | saving / ideal |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for x in r.reuse:
            lines.append(f"| k={x['k']} {x['subset']} | {x['small_block_ms']:.2f} | {x['small_block_ms'] / x['floor_ms']:.2f} "
                         f"| {x['saving']:.1%} | {x['ideal_saving']:.1%} | {x['saving'] / x['ideal_saving']:.2f} |")
    lines += ["", "| batch | k | subset | tokens/s | tokens | seconds | skipped fraction |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for x in r.end_to_end:
        lines.append(f"| {x['batch']} | {x['k']} | {x['subset']} | {x['tokens_per_second']:.1f} | {x['tokens']} "
                     f"| {x['seconds']:.2f} | {x['skipped_fraction']:.3f} |")
    if r.path_check:
        c = r.path_check
        lines += ["", f"Eager vs fast path, k=1, first {c['tokens_compared']} tokens: "
                  + ("identical" if c["equal"] else f"first divergence at token {c['first_divergence']}")
                  + (f"; one full-block forward's logits differ by at most {c['full_block_logit_max_abs_diff']:.3g} "
                     f"(logit scale {c['full_block_logit_scale']:.3g})" if "full_block_logit_max_abs_diff" in c else "")]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m reuse_exp.engine.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", help="named shape: tiny, 1.5b, 7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batch", type=lambda v: [int(x) for x in v.split(",")], default=[1])
    ap.add_argument("--k", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2, 3])
    ap.add_argument("--subset", type=lambda v: v.split(","), default=["first", "middle", "last"])
    ap.add_argument("--mode", default="output", choices=["output", "delta"])
    ap.add_argument("--path", default="fast", choices=["eager", "fast"],
                    help="fast: static-shape forwards, CUDA graphs on a GPU; eager: plain PyTorch")
    ap.add_argument("--iters", type=int, default=20, help="timed iterations per forward kind")
    ap.add_argument("--repeats", type=int, default=3, help="timed end-to-end runs per config")
    ap.add_argument("--copy-mb", type=int, default=None, help="bytes copied to measure bandwidth")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="fast path: fuse each layer with torch.compile (default: on a GPU)")
    ap.add_argument("--check-tokens", type=int, default=0,
                    help="also compare the eager and fast paths' first N tokens at k=1")
    ap.add_argument("--json", default=None, help="write the result as JSON here")
    ap.add_argument("--markdown", default=None, help="write the markdown table here")
    args = ap.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    parse_dtype(args.dtype)
    if args.copy_mb is None:
        args.copy_mb = 2048 if args.device.startswith("cuda") else 256
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run_bench(args)
    text = markdown(result)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(result), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

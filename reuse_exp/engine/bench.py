"""Benchmark: random weights of a named shape, fixed trajectories, warm-up, then timing.

    reuse-exp bench --shape tiny                                  # CPU
    reuse-exp bench --shape 7b --batch 1,8,32,64 --json b.json --markdown b.md

Random weights never pass the unmasking threshold, so every step unmasks exactly one
token (the `one-token` trajectory); a recorded trajectory (engine/trajectory.py, e.g. the
bundled `tiny_gsm`) replays how many tokens each step of a real decode unmasked, and the
end-to-end rows are run per trajectory. The stop token is ignored. Everything runs under
`torch.inference_mode` with weights that need no grad. One row per batch size, every
ratio against ceilings measured in the same run (a device-to-device copy for bandwidth,
a large bf16 matrix product for the dense peak):
- milliseconds per forward kind (median of timed forwards, min and max kept in the JSON);
- the small-block forward's bytes (weights but the embedding, plus the K/V it attends
  to) over the copy bandwidth: its floor, the ratio to it and the bandwidth achieved;
- the full-block forward's FLOPs over its time, and that as a fraction of the peak;
- the small-block forward with the policy's layers skipped for every row: its saving
  against the ideal (the skipped layers' share of the bytes);
- end to end, tokens/s at each k (median of timed decodes after an untimed one), and
  the time saved against k=1 beside the ideal (each skipped layer evaluation free);
- where a decode's time goes (bench_decode.py): per forward kind its device time (CUDA events
  around each graph), the device time between forwards (logits, unmasking, waiting for the
  host), and the host's time waiting for the device against its own work;
- warm-up: the first decode of the run (compilation, graph captures) over a warm one; and
  the first decodes of fresh processes in a row, on an empty and then a kept compile cache
  (bench_paths.py).
The result is handed to `on_row` after every batch row (the CLI rewrites its JSON then: a
benchmark cut short keeps what it measured).
"""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field, replace

import torch

from .config import shape as named_shape
from .decoding import DecodeConfig, EagerRunner, generate
from .fast import FastRunner
from .kernels import kernels_per_call
from .loading import parse_dtype, random_model
from .model import FastDLLM, ForwardKind
from .bench_ceilings import copy_bandwidth, forward_flops, kv_bytes, matmul_peak, timed_ms, weight_bytes
from .bench_decode import decode_rows, end_to_end
from .bench_goals import goals
from .bench_paths import fresh_processes, warmup_settings
from .bench_report import row_line
from .policies import ReusePolicy
from .policies.fixed import FixedPolicy
from .reuse import told_plan
from .trajectory import ONE_TOKEN, Trajectory


def time_forward_kinds(model: FastDLLM, runner, batch: int, prefix: int, block: int, small: int,
                       policies: list[ReusePolicy], iters: int) -> tuple[dict, dict, dict]:
    """Milliseconds of each forward kind, logits of the needed positions included, at a
    prefix of `prefix` tokens; and of the small-block forward with each policy's layers
    skipped for every row; and the kernels a small-block and a full-block forward launch."""
    dev = model.device
    cache = runner.new_cache(batch, prefix + block, block)
    tokens = torch.randint(0, model.config.vocab_size, (batch, prefix + block), device=dev)
    runner(tokens[:, :prefix], ForwardKind.PREFILL, cache)
    blk = tokens[:, prefix:].contiguous()
    window = list(range(small))

    def full():
        runner.logits(runner(blk, ForwardKind.FULL_BLOCK, cache)[:, window])

    def small_block(plan=None):
        runner.logits(runner(blk[:, 8:8 + small], ForwardKind.SMALL_BLOCK, cache, 8, plan)[:, window])

    def finalize():
        cache.prefix_len = prefix  # re-commit the same block each time
        runner.logits(runner(blk, ForwardKind.FINALIZE, cache)[:, -1:])

    kinds = {"full_block": timed_ms(full, dev, iters), "small_block": timed_ms(small_block, dev, iters),
             "finalize": timed_ms(finalize, dev, iters)}
    kernels = {"small_block": kernels_per_call(small_block, dev), "full_block": kernels_per_call(full, dev)}
    cache.prefix_len = prefix
    reused = {}
    for policy in policies:
        rc = runner.new_reuse_cache(policy, batch, block)
        runner(blk, ForwardKind.FULL_BLOCK, cache, 0,
               told_plan(policy.layers, [False] * batch, rc, 0, dev, ForwardKind.FULL_BLOCK, runner.buffer))
        every_row = told_plan(policy.layers, [True] * batch, rc, 8, dev, buffer=runner.buffer)
        reused[policy] = timed_ms(lambda: small_block(every_row), dev, iters)
    return kinds, reused, kernels


@dataclass
class BenchResult:
    machine: dict
    settings: dict
    command: str
    bandwidth_gbs: float
    peak_tflops: float
    weights_gb: float
    path_name: str = ""
    warmup: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)            # one per batch size
    peak_memory_gb: float | None = None
    path_check: dict | None = None                      # eager vs fast tokens at k=1
    fresh_processes: list = field(default_factory=list)  # warm-up in fresh processes, one per path
    goals: list = field(default_factory=list)           # each goal beside this run's figure (bench_goals.py)


def machine_info(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def bench_batch(model, runner, args, batch: int, policies: list[ReusePolicy], bw: float, peak: float,
                trajectories: list[tuple[str, Trajectory | None]]) -> dict:
    bs, sbs = 32, 8
    prefix = (args.prompt_len + args.new_tokens // 2) // bs * bs  # the middle of the trajectory
    kv_len = prefix + bs
    kinds, reused, kernels = time_forward_kinds(model, runner, batch, prefix, bs, sbs, policies, args.iters)
    small_ms, full_ms = kinds["small_block"]["median"], kinds["full_block"]["median"]
    small_bytes = weight_bytes(model) + kv_bytes(model, batch, kv_len)
    flops = forward_flops(model, batch, bs, kv_len, sbs)
    row = {"batch": batch, "forward_ms": kinds, "kernels": kernels,
           "small_block": {"bytes": small_bytes, "floor_ms": small_bytes / bw * 1e3,
                           "x_floor": small_ms / (small_bytes / bw * 1e3), "gbs": small_bytes / small_ms / 1e6},
           "full_block": {"flops": flops, "tflops": flops / full_ms / 1e9, "of_peak": flops / full_ms / 1e-3 / peak},
           "reuse_forward": [], "end_to_end": [], "extra": []}
    for p in policies:
        ms = reused[p]["median"]
        skipped = weight_bytes(model, p.layers)
        row["reuse_forward"].append({"k": p.k, "subset": p.subset, "ms": reused[p], "saving": 1 - ms / small_ms,
                                     "ideal_saving": skipped / small_bytes,
                                     "of_ideal": (1 - ms / small_ms) / (skipped / small_bytes)})
    for name, trajectory in trajectories if args.decode_batches is None or batch in args.decode_batches else ():
        e2e, extra = decode_rows(model, runner, args, batch, trajectory, small_bytes)
        row["end_to_end"] += [e | {"trajectory": name} for e in e2e]
        row["extra"] += [e | {"trajectory": name} for e in extra]
    return row


@torch.no_grad()
def compare_paths(model: FastDLLM, n_tokens: int, prompt_len: int) -> dict:
    """Tokens of the eager and the fast path at k=1 on the fixed trajectory: equal, or where they first part."""
    mask_id = model.config.vocab_size - 1
    cfg = DecodeConfig(mask_id=mask_id, stop_id=-1, pad_id=0, max_new_tokens=n_tokens, threshold=1.0, ignore_stop=True)
    prompt = torch.randint(0, mask_id, (1, prompt_len), generator=torch.Generator().manual_seed(1)).tolist()
    eager = generate(model, prompt, cfg).tokens[0][:n_tokens]
    fast = generate(model, prompt, cfg, runner=FastRunner(model)).tokens[0][:n_tokens]
    first = next((i for i, (a, b) in enumerate(zip(eager, fast)) if a != b), None)
    return {"tokens_compared": len(eager), "equal": eager == fast, "first_divergence": first}


@dataclass(frozen=True)
class BenchArgs:
    """What one benchmark run measures (`reuse-exp bench`'s options); None: the device's default."""
    shape: str = "tiny"                       # named shape: tiny, 1.5b, 7b
    device: str | None = None                 # cuda when there is one, else cpu
    dtype: str | None = None                  # bfloat16 on a GPU, float32 on the CPU
    prompt_len: int = 256
    new_tokens: int = 256
    batch: tuple[int, ...] = (1, 8, 32, 64)
    k: tuple[int, ...] = (1, 2, 3)
    subset: tuple[str, ...] = ("first",)
    mode: str = "output"
    path: str = "fast"                        # fast: static shapes, CUDA graphs on a GPU; eager: plain PyTorch
    extra: tuple[str, ...] = ()               # more policies end to end: replay:K, adaptive-replay:T, ...
    iters: int = 20                           # timed iterations per forward kind
    repeats: int = 2                          # timed end-to-end decodes per configuration
    copy_mb: int | None = None                # bytes copied to measure the bandwidth
    matmul_n: int | None = None               # size of the matrix product for the peak
    warmup_batches: tuple[int, ...] = (1, 8, 32)  # first decodes of fresh processes at these batch sizes
    warmup_processes: int | None = None       # fresh processes in a row (default 2 on a GPU, 0 on the CPU)
    check_tokens: int = 0                     # also compare the eager and fast paths' first N tokens at k=1
    trajectories: tuple[str, ...] = (ONE_TOKEN,)  # end to end on each: one-token, tiny_gsm, FILE.json, run:ID
    decode_batches: tuple[int, ...] | None = None  # end to end at these batch sizes only (None: every one)

    def resolved(self) -> "BenchArgs":
        """Every None filled with the device's default; an unknown dtype refused."""
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        on_gpu = device.startswith("cuda")
        dtype = self.dtype or ("bfloat16" if on_gpu else "float32")
        parse_dtype(dtype)
        processes = (2 if on_gpu else 0) if self.warmup_processes is None else self.warmup_processes
        return replace(self, device=device, dtype=dtype, copy_mb=self.copy_mb or (2048 if on_gpu else 256),
                       matmul_n=self.matmul_n or (8192 if on_gpu else 512), warmup_processes=processes)


# `--quick`: what fits one 600 s call of a lent GPU on the 7B shape (forwards at batch 1 and 32,
# decodes at both on both trajectories, k=2 and the adaptive policy at drift 0 and 1.0).
QUICK = dict(batch=(1, 32), decode_batches=(1, 32), k=(1, 2), new_tokens=128, iters=10, repeats=3,
             trajectories=(ONE_TOKEN, "tiny_gsm"), extra=("adaptive-delta:0", "adaptive-delta:1.0"),
             warmup_processes=0)


def run_bench(args: BenchArgs, command: str = "", run_trace=None, on_row=None) -> BenchResult:
    """`run_trace`: fetches a tracked run's reuse_trace.json for a `run:ID` trajectory; `on_row`
    is called with the result so far after each batch row."""
    args = args.resolved()
    trajectories = [(spec, Trajectory.load(spec, run_trace)) for spec in args.trajectories]
    device = torch.device(args.device)
    # Fresh processes first, while this one holds nothing on the device.
    fresh = [fresh_processes(warmup_settings(args), args.warmup_processes)] \
        if args.warmup_processes and args.path == "fast" else []
    torch.manual_seed(0)
    model = random_model(named_shape(args.shape), args.dtype, device=str(device), seed=0)
    assert not any(p.requires_grad for p in model.parameters())
    with torch.inference_mode():
        bw = copy_bandwidth(device, args.copy_mb << 20)
        peak = matmul_peak(device, model.dtype, args.matmul_n)
        runner = FastRunner(model) if args.path == "fast" else EagerRunner(model)
        result = BenchResult(machine=machine_info(device), settings=vars(args).copy(), command=command,
                             bandwidth_gbs=bw / 1e9, peak_tflops=peak / 1e12, weights_gb=weight_bytes(model) / 1e9,
                             path_name=runner.name, fresh_processes=fresh)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # Warm-up first, in a fresh process: the first decode pays compilation and captures.
        mask_id = model.config.vocab_size - 1
        b0 = args.batch[0]
        cold = end_to_end(model, runner, b0, args.prompt_len, args.new_tokens, None, 1, mask_id)
        result.warmup = {"batch": b0, "first_call_seconds": cold["first_call_seconds"],
                         "warm_call_seconds": cold["seconds"],
                         "warmup_seconds": cold["first_call_seconds"] - cold["seconds"]}
        policies = [FixedPolicy.create(model.num_layers, k=k, subset=s, mode=args.mode)
                    for k in sorted(set(args.k)) if k > 1 for s in args.subset]
        for batch in args.batch:
            result.rows.append(bench_batch(model, runner, args, batch, policies, bw, peak, trajectories))
            print(row_line(result.rows[-1]), flush=True)
            if on_row is not None:
                on_row(result)
        if device.type == "cuda":
            result.peak_memory_gb = torch.cuda.max_memory_allocated(device) / 1e9
    if args.check_tokens:
        result.path_check = compare_paths(model, args.check_tokens, args.prompt_len)
    result.goals = goals(result)
    return result

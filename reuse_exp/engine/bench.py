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
- warm-up: the first decode of the run (compilation, graph captures) over a warm one; and
  the first decodes of fresh processes in a row, on an empty and then a kept compile cache
  (bench_paths.py), for the default path and, with --compare-compiled, the compiled one, whose
  forwards and k=1 tokens/s each row then shows beside the default's.
"""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field, replace

import torch

from ..errors import SettingError
from .config import shape as named_shape
from .decoding import DecodeConfig, EagerRunner, generate
from .fast import FastRunner
from .kernels import kernels_per_call
from .loading import parse_dtype, random_model
from .model import FastDLLM, ForwardKind
from .bench_paths import fresh_processes, path_cost, warmup_settings
from .bench_report import row_line
from .policies import ReusePolicy, get as get_policy
from .policies.fixed import FixedPolicy
from .reuse import told_plan
from .trajectory import ONE_TOKEN, Trajectory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device, iters: int, warmup: int = 3) -> dict:
    """Median, min and max milliseconds of `fn` (host clock around a device sync)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (timed_ms(lambda: dst.copy_(src), device, iters=10)["median"] / 1e3)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n x n x n matrix product on random data (two input sets, rotated)."""
    sets = [(torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype))
            for _ in range(2)]
    out = torch.empty(n, n, device=device, dtype=dtype)
    i = [0]

    def step():
        a, b = sets[i[0] % 2]
        i[0] += 1
        torch.matmul(a, b, out=out)
    return 2 * n ** 3 / (timed_ms(step, device, iters=10)["median"] / 1e3)


def weight_bytes(model: FastDLLM, layers: tuple[int, ...] | None = None) -> int:
    """Bytes a forward reads: every weight but the embedding (a gather, not a read of it all)."""
    if layers is not None:
        return sum(p.numel() * p.element_size() for i in layers for p in model.model.layers[i].parameters())
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if not n.startswith("model.embed_tokens"))


def kv_bytes(model: FastDLLM, batch: int, kv_len: int) -> int:
    """Bytes of the keys and values one forward attends to, every layer."""
    c = model.config
    return 2 * c.num_hidden_layers * batch * c.num_key_value_heads * kv_len * c.head_dim * model.lm_head.weight.element_size()


def forward_flops(model: FastDLLM, batch: int, tokens: int, kv_len: int, logit_positions: int) -> int:
    """Matrix FLOPs of one forward: the layers' projections, attention, and the logits needed."""
    c = model.config
    layer_params = sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2)
    attention = 4 * c.num_hidden_layers * batch * c.num_attention_heads * tokens * kv_len * c.head_dim
    return 2 * batch * tokens * layer_params + attention + 2 * batch * logit_positions * c.hidden_size * c.vocab_size


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
        model.logits(runner(blk, ForwardKind.FULL_BLOCK, cache)[:, window])

    def small_block(plan=None):
        model.logits(runner(blk[:, 8:8 + small], ForwardKind.SMALL_BLOCK, cache, 8, plan)[:, window])

    def finalize():
        cache.prefix_len = prefix  # re-commit the same block each time
        model.logits(runner(blk, ForwardKind.FINALIZE, cache)[:, -1:])

    kinds = {"full_block": timed_ms(full, dev, iters), "small_block": timed_ms(small_block, dev, iters),
             "finalize": timed_ms(finalize, dev, iters)}
    kernels = {"small_block": kernels_per_call(small_block, dev), "full_block": kernels_per_call(full, dev)}
    cache.prefix_len = prefix
    reused = {}
    for policy in policies:
        rc = runner.new_reuse_cache(policy, batch, block)
        runner(blk, ForwardKind.FULL_BLOCK, cache, 0,
               told_plan(policy.layers, [False] * batch, rc, 0, dev, ForwardKind.FULL_BLOCK))
        reused[policy] = timed_ms(lambda: small_block(told_plan(policy.layers, [True] * batch, rc, 8, dev)), dev, iters)
    return kinds, reused, kernels


def end_to_end(model: FastDLLM, runner, batch: int, prompt_len: int, new_tokens: int,
               policy: ReusePolicy | None, repeats: int, mask_id: int, trajectory: Trajectory | None = None) -> dict:
    cfg = DecodeConfig(mask_id=mask_id, stop_id=-1, pad_id=0, max_new_tokens=new_tokens,
                       threshold=1.0, ignore_stop=True, trajectory=trajectory)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, mask_id, (batch, prompt_len), generator=gen).tolist()
    first = generate(model, prompts, cfg, policy, runner=runner).report  # compiles and captures: not throughput
    timing = getattr(runner, "timings", False) is None and model.device.type == "cuda"
    if timing:
        runner.timings = []  # each graphed forward's device time, for the reuse saving in situ
    runs = [generate(model, prompts, cfg, policy, runner=runner).report for _ in range(repeats)]
    times = runner.forward_times() if timing else []
    if timing:
        runner.timings = None
    seconds = [r.wall_seconds for r in runs]
    s = runs[0].summary()
    return {"tokens_per_second": statistics.median(r.tokens_per_second for r in runs),
            "seconds": statistics.median(seconds), "seconds_min": min(seconds), "seconds_max": max(seconds),
            "first_call_seconds": first.wall_seconds, "tokens": runs[0].generated_tokens,
            "tokens_per_step": runs[0].tokens_per_step,
            "batch_forwards": s["batch_forwards"], "sample_forwards": s["sample_forwards"],
            "layer_evals_run": s["layer_evals_run"], "layer_evals_skipped": s["layer_evals_skipped"],
            "skipped_fraction": s["skipped_fraction"], "forward_times": times}


def saving_in_situ(times: list[dict], share: float) -> dict | None:
    """The forwards of one decode that skipped layers, each against the median of the same
    decode's forwards of its kind and row count that skipped nothing: the time they saved,
    beside the ideal (the skipped layers' `share` of a forward, for the rows that reused)."""
    base: dict = {}
    for t in times:
        if not t["skip"]:
            base.setdefault((t["kind"], t["rows"]), []).append(t["ms"])
    saved = ideal = 0.0
    matched = unmatched = 0
    for t in times:
        if t["skip"]:
            ref = base.get((t["kind"], t["rows"]))
            if not ref:
                unmatched += 1
                continue
            m = statistics.median(ref)
            saved += m - t["ms"]
            ideal += m * share * t["reusing"] / t["active"]
            matched += 1
    if not matched:
        return None
    total = sum(t["ms"] for t in times)
    return {"saved_ms": saved, "ideal_ms": ideal, "of_ideal": saved / ideal, "forward_ms": total,
            "saved_of_forward_time": saved / total, "ideal_of_forward_time": ideal / total,
            "skipping_forwards": matched, "unmatched_forwards": unmatched}


def summarize_times(times: list[dict]) -> dict:
    """Forward device time by kind and whether layers were skipped: count, total ms."""
    out: dict = {}
    for t in times:
        key = f"{t['kind']}{'+skip' if t['skip'] else ''}"
        c = out.setdefault(key, {"count": 0, "ms": 0.0})
        c["count"] += 1
        c["ms"] += t["ms"]
    return out


def ideal_saving(model: FastDLLM, row: dict) -> float:
    """Time a decode would save if each layer evaluation its samples skip were free: the
    skipped layers' bytes over all the bytes its samples' forwards read (a replayed step
    also skips the embedding, the final norm and the LM head)."""
    layer = weight_bytes(model, (0,))
    other = weight_bytes(model) - model.num_layers * layer
    evals = row["layer_evals_run"] + row["layer_evals_skipped"]
    forwards = sum(row["sample_forwards"].values())
    replays = row["sample_forwards"].get("replay", 0)
    return (row["layer_evals_skipped"] * layer + replays * other) / (evals * layer + forwards * other)


def extra_policy(spec: str, num_layers: int):
    """`replay:K` (the replay control every K-th step), or POLICY-MODE:T[:CAP] for a policy that
    reads drift (`adaptive-replay:T`, `adaptive-delta:T`, `depth-delta:T`: drift T, at most CAP
    reuses in a row, 8 unless given; at T=0 nothing is reused: what the decisions cost against k=1)."""
    name, _, value = spec.partition(":")
    if name == "replay":
        return FixedPolicy.create(num_layers, k=int(value), subset="first", mode="replay")
    policy, _, mode = name.rpartition("-")
    if not policy or "drift" not in (cls := get_policy(policy)).reads:
        raise ValueError(f"unknown policy {spec!r}: use replay:K, adaptive-replay:T, adaptive-delta:T or depth-delta:T")
    drift, _, cap = value.partition(":")
    return cls.create(num_layers, drift=float(drift), max_reuse=int(cap or 8), mode=mode)


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


def machine_info(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def decode_rows(model, runner, args, batch: int, trajectory: Trajectory | None, small_bytes: int):
    """End to end on one trajectory: a row per k and subset, and one per extra policy, with
    the time each saves against k=1 on the same trajectory."""
    mask_id = model.config.vocab_size - 1
    base, rows, extra = None, [], []
    for k in sorted(set(args.k)):
        for s in (args.subset if k > 1 else args.subset[:1]):
            policy = FixedPolicy.create(model.num_layers, k=k, subset=s, mode=args.mode) if k > 1 else None
            e = end_to_end(model, runner, batch, args.prompt_len, args.new_tokens, policy, args.repeats, mask_id,
                           trajectory)
            e |= {"k": k, "subset": s if k > 1 else "-"}
            if k == 1:
                base = e
            elif base is not None:
                e["saving"] = 1 - e["seconds"] / base["seconds"]
                e["ideal_saving"] = ideal_saving(model, e)
                e["of_ideal"] = e["saving"] / e["ideal_saving"] if e["ideal_saving"] else None
                share = weight_bytes(model, policy.layers) / small_bytes
                e["in_situ"] = saving_in_situ(e["forward_times"], share)
            e["forward_times"] = summarize_times(e["forward_times"])
            rows.append(e)
    for spec in args.extra:
        e = end_to_end(model, runner, batch, args.prompt_len, args.new_tokens,
                       extra_policy(spec, model.num_layers), args.repeats, mask_id, trajectory)
        e |= {"policy": spec, "forward_times": summarize_times(e["forward_times"])}
        if base is not None:
            e["saving"] = 1 - e["seconds"] / base["seconds"]
            e["ideal_saving"] = ideal_saving(model, e)
            e["of_ideal"] = e["saving"] / e["ideal_saving"] if e["ideal_saving"] else None
        extra.append(e)
    return rows, extra


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
    for name, trajectory in trajectories:
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
    compile: bool = False                     # fast path: each layer compiled (decode path `compiled`)
    compare_compiled: bool = False            # also the compiled path: its forwards, k=1 tok/s and warm-up
    warmup_batches: tuple[int, ...] = (1, 8, 32)  # first decodes of fresh processes at these batch sizes
    warmup_processes: int | None = None       # fresh processes in a row (default 2 on a GPU, 0 on the CPU)
    check_tokens: int = 0                     # also compare the eager and fast paths' first N tokens at k=1
    trajectories: tuple[str, ...] = (ONE_TOKEN,)  # end to end on each: one-token, tiny_gsm, FILE.json, run:ID

    def resolved(self) -> "BenchArgs":
        """Every None filled with the device's default; an unknown dtype refused."""
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        on_gpu = device.startswith("cuda")
        dtype = self.dtype or ("bfloat16" if on_gpu else "float32")
        parse_dtype(dtype)
        if self.compare_compiled and (self.compile or self.path != "fast"):
            raise SettingError("--compare-compiled sets the compiled path beside the default fast one: "
                               "drop --compile and --path eager")
        processes = (2 if on_gpu else 0) if self.warmup_processes is None else self.warmup_processes
        return replace(self, device=device, dtype=dtype, copy_mb=self.copy_mb or (2048 if on_gpu else 256),
                       matmul_n=self.matmul_n or (8192 if on_gpu else 512), warmup_processes=processes)


def run_bench(args: BenchArgs, command: str = "", run_trace=None) -> BenchResult:
    """`run_trace`: fetches a tracked run's reuse_trace.json for a `run:ID` trajectory."""
    args = args.resolved()
    trajectories = [(spec, Trajectory.load(spec, run_trace)) for spec in args.trajectories]
    device = torch.device(args.device)
    # Fresh processes first, while this one holds nothing on the device.
    paths = (args.compile, True) if args.compare_compiled else (args.compile,)
    fresh = [fresh_processes(warmup_settings(args, c), args.warmup_processes)
             for c in paths if args.warmup_processes and args.path == "fast"]
    torch.manual_seed(0)
    model = random_model(named_shape(args.shape), args.dtype, device=str(device), seed=0)
    assert not any(p.requires_grad for p in model.parameters())
    with torch.inference_mode():
        bw = copy_bandwidth(device, args.copy_mb << 20)
        peak = matmul_peak(device, model.dtype, args.matmul_n)
        runner = FastRunner(model, compile_layers=args.compile) if args.path == "fast" else EagerRunner(model)
        result = BenchResult(machine=machine_info(device), settings=vars(args).copy(), command=command,
                             bandwidth_gbs=bw / 1e9, peak_tflops=peak / 1e12, weights_gb=weight_bytes(model) / 1e9,
                             path_name=runner.name, fresh_processes=fresh)
        compiled = FastRunner(model, compile_layers=True) if args.compare_compiled else None
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
            if compiled is not None:  # forwards and k=1 only: the speed the compiled path buys
                row = bench_batch(model, compiled, replace(args, k=(1,), extra=()), batch, [], bw, peak,
                                  trajectories[:1])
                result.rows[-1]["compiled"] = path_cost(row)
            print(row_line(result.rows[-1]), flush=True)
        if device.type == "cuda":
            result.peak_memory_gb = torch.cuda.max_memory_allocated(device) / 1e9
    if args.check_tokens:
        result.path_check = compare_paths(model, args.check_tokens, args.prompt_len)
    return result

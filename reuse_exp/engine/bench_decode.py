"""The benchmark end to end: timed decodes on a trajectory (one-token or recorded), what
reuse saved against k=1 on the same trajectory, in the decode and beside the ideal."""
from __future__ import annotations

import statistics

import torch

from .bench_ceilings import weight_bytes
from .decoding import DecodeConfig, generate
from .model import FastDLLM
from .policies import ReusePolicy, get as get_policy
from .policies.fixed import FixedPolicy
from .trajectory import Trajectory


def end_to_end(model: FastDLLM, runner, batch: int, prompt_len: int, new_tokens: int,
               policy: ReusePolicy | None, repeats: int, mask_id: int, trajectory: Trajectory | None = None) -> dict:
    cfg = DecodeConfig(mask_id=mask_id, stop_id=-1, pad_id=0, max_new_tokens=new_tokens,
                       threshold=1.0, ignore_stop=True, trajectory=trajectory)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, mask_id, (batch, prompt_len), generator=gen).tolist()
    first = generate(model, prompts, cfg, policy, runner=runner).report  # compiles and captures: not throughput
    timing = getattr(runner, "timings", False) is None and model.device.type == "cuda" and runner.use_graphs
    runs, per_run = [], []
    for _ in range(repeats):
        if timing:
            runner.timings = []  # each graphed forward's device time, for the reuse saving in situ
        runs.append(generate(model, prompts, cfg, policy, runner=runner).report)
        if timing:
            per_run.append(runner.forward_times())
            runner.timings = None
    times = [t for run in per_run for t in run]
    seconds = [r.wall_seconds for r in runs]
    median_run = sorted(range(len(runs)), key=lambda i: seconds[i])[len(runs) // 2]
    s = runs[0].summary()
    return {"tokens_per_second": statistics.median(r.tokens_per_second for r in runs),
            "seconds": statistics.median(seconds), "seconds_min": min(seconds), "seconds_max": max(seconds),
            "first_call_seconds": first.wall_seconds, "tokens": runs[0].generated_tokens,
            "tokens_per_step": runs[0].tokens_per_step,
            "batch_forwards": s["batch_forwards"], "sample_forwards": s["sample_forwards"],
            "layer_evals_run": s["layer_evals_run"], "layer_evals_skipped": s["layer_evals_skipped"],
            "skipped_fraction": s["skipped_fraction"], "forward_times": times,
            "time": where_time_goes(runs[median_run], per_run[median_run]) if per_run else None}


def where_time_goes(report, forwards: list[dict]) -> dict:
    """One decode's wall time, its forwards' device time by kind (`+skip`: some group skipped by
    every row), the device time between its forwards, and the host's time blocked on the device."""
    kinds: dict = {}
    for t in forwards:
        c = kinds.setdefault(t["kind"] + ("+skip" if t["skip"] else ""), {"count": 0, "ms": 0.0})
        c["count"] += 1
        c["ms"] += t["ms"]
    return {"wall_ms": report.wall_seconds * 1e3, "forwards": kinds,
            "forward_ms": sum(t["ms"] for t in forwards), "between_ms": sum(t["gap_ms"] for t in forwards[1:]),
            "host_wait_ms": report.host_wait_seconds * 1e3}


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
        policy = extra_policy(spec, model.num_layers)
        e = end_to_end(model, runner, batch, args.prompt_len, args.new_tokens, policy, args.repeats, mask_id,
                       trajectory)
        e |= {"policy": spec, "policy_name": policy.name, "mode": policy.mode, "drift": getattr(policy, "drift", None),
              "forward_times": summarize_times(e["forward_times"])}
        if base is not None:
            e["saving"] = 1 - e["seconds"] / base["seconds"]
            e["ideal_saving"] = ideal_saving(model, e)
            e["of_ideal"] = e["saving"] / e["ideal_saving"] if e["ideal_saving"] else None
        extra.append(e)
    return rows, extra

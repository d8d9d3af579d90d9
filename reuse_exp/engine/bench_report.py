"""The benchmark's report: one line per batch row while it runs, and the markdown table."""
from __future__ import annotations

from .bench_goals import goals_table


def row_line(r: dict) -> str:
    ms = {k: v["median"] for k, v in r["forward_ms"].items()}
    tps = "; ".join(f"{e.get('trajectory', '')} k={e['k']} {e['subset']} {e['tokens_per_second']:.1f}"
                     for e in r["end_to_end"])
    return (f"batch {r['batch']}: full {ms['full_block']:.2f} ms, small {ms['small_block']:.2f} ms "
            f"({r['small_block']['x_floor']:.2f}x floor), finalize {ms['finalize']:.2f} ms; tok/s {tps}")


def trajectories(r) -> list[tuple[str, float]]:
    """The trajectories the decodes followed, each with its tokens per step (at k=1)."""
    out: dict[str, float] = {}
    for row in r.rows:
        for e in row["end_to_end"]:
            out.setdefault(e.get("trajectory", ""), e["tokens_per_step"])
    return list(out.items())


def _kernels(row: dict, kind: str) -> str:
    k = (row.get("kernels") or {}).get(kind)
    return f"{k['kernels']:.0f}" if k else "-"


def forwards_table(r) -> list[str]:
    """Per batch size: each forward kind's time, the small-block forward against its floor and
    the full-block one against the dense peak, and the small-block forward with layers skipped."""
    reuse_cfgs = [(x["k"], x["subset"]) for x in r.rows[0]["reuse_forward"]]
    head = (["batch", "full ms", "small ms", "finalize ms", "small floor ms", "small x floor", "small GB/s",
             "kernels: small / full", "full TFLOP/s (of peak)"]
            + [f"k={k} {sub} saving / ideal: forward, every row skips" for k, sub in reuse_cfgs])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in r.rows:
        ms = {k: v["median"] for k, v in row["forward_ms"].items()}
        sb = row["small_block"]
        cells = [str(row["batch"]), f"{ms['full_block']:.2f}", f"{ms['small_block']:.2f}", f"{ms['finalize']:.2f}",
                 f"{sb['floor_ms']:.2f}", f"{sb['x_floor']:.2f}", f"{sb['gbs']:.0f}",
                 f"{_kernels(row, 'small_block')} / {_kernels(row, 'full_block')}",
                 f"{row['full_block']['tflops']:.0f} ({row['full_block']['of_peak']:.0%})"]
        cells += [f"{x['saving']:.1%} / {x['ideal_saving']:.1%} = {x['of_ideal']:.2f}" for x in row["reuse_forward"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def decodes_table(r) -> list[str]:
    """One line per batch size, trajectory and policy decoded end to end."""
    lines = ["| batch | trajectory | policy | tok/s (min-max) | skipped fraction | steps replayed "
             "| saving / ideal: in the decode | decode time vs k=1 (ideal) | first decode s (warm s) |",
             "|" + " --- |" * 9]
    for row in r.rows:
        for e in row["end_to_end"] + row.get("extra", []):
            name = e.get("policy") or (f"k={e['k']} {e['subset']}" if e["k"] > 1 else "k=1")
            fw = e["sample_forwards"]
            steps = sum(fw.get(k, 0) for k in ("full_block", "small_block", "replay"))
            slow, fast = e["tokens"] / e["seconds_max"], e["tokens"] / e["seconds_min"]
            i = e.get("in_situ")
            cells = [str(row["batch"]), e.get("trajectory", ""), name,
                     f"{e['tokens_per_second']:.1f} ({slow:.1f}-{fast:.1f})", f"{e['skipped_fraction']:.3f}",
                     f"{fw.get('replay', 0) / steps:.1%}" if steps else "-",
                     f"{i['saved_of_forward_time']:.1%} / {i['ideal_of_forward_time']:.1%} = {i['of_ideal']:.2f}"
                     if i else "-",
                     f"{-e['saving']:+.1%} ({-e['ideal_saving']:+.1%})" if "saving" in e else "-",
                     f"{e['first_call_seconds']:.1f} ({e['seconds']:.2f})"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(r) -> str:
    """The markdown tables of a BenchResult."""
    m, s = r.machine, r.settings
    w = r.warmup
    lines = [f"Machine: {m.get('gpu', 'CPU')} · torch {m['torch']} · CUDA {m.get('cuda', '-')} · "
             f"python {m['python']} · {m['date']} · shape {s['shape']}, {s['dtype']}, {r.path_name} path",
             f"Command: `{r.command}`" if r.command else "",
             f"Trajectories: prompt {s['prompt_len']}, {s['new_tokens']} new tokens, stop ignored; "
             + "; ".join(f"{name} {tps:.2f} tokens per step" for name, tps in trajectories(r))
             + f" (one-token: random weights never pass the threshold; a recorded trajectory replays a real "
             f"decode's tokens per step). Reuse mode {s['mode']}. Forwards at a prefix of "
             f"{(s['prompt_len'] + s['new_tokens'] // 2) // 32 * 32} tokens. Medians.",
             f"Ceilings measured in this run: copy {r.bandwidth_gbs:.0f} GB/s (read + write), dense "
             f"{s['dtype']} matrix product {r.peak_tflops:.0f} TFLOP/s. Weights read per forward: {r.weights_gb:.2f} GB.",
             f"Warm-up in this process: the first decode (batch {w['batch']}, k=1) took {w['first_call_seconds']:.1f} s, "
             f"a warm one {w['warm_call_seconds']:.2f} s."
             + (f" Peak GPU memory {r.peak_memory_gb:.1f} GB." if r.peak_memory_gb is not None else ""), ""]
    lines += forwards_table(r)
    lines += ["", "Floor: the small-block forward's bytes (weights but the embedding, and the K/V it attends to) "
              "at the copy bandwidth. Kernels: per forward, counted by the profiler inside the graph replay "
              "(GPU only). Saving / ideal, forward: the small-block forward with the policy's layers skipped for "
              "every row, against the skipped layers' share of its bytes.", ""]
    lines += decodes_table(r)
    lines += ["", "Tok/s: median of the timed decodes (slowest-fastest). Saving / ideal in the decode: each "
              "forward of the timed decode that skipped layers, against the median of the same decode's forwards "
              "of its kind and row count that skipped none (device time, CUDA events), beside the skipped layers' "
              "share of those forwards for the rows that reused; as fractions of the decode's forward time. "
              "Decode time vs k=1: wall time of the whole decode against k=1 on the same trajectory, beside the "
              "bytes of the skipped layer evaluations over the bytes of all."]
    lines += time_table(r) + goals_table(r) + warmup_table(r)
    if r.path_check:
        c = r.path_check
        lines += ["", f"Eager vs fast path, k=1, first {c['tokens_compared']} tokens: "
                  + ("identical" if c["equal"] else f"first divergence at token {c['first_divergence']}")]
    return "\n".join(x for x in lines if x is not None) + "\n"


def time_table(r) -> list[str]:
    """Where each decode's time went: device time of each forward kind, device time between
    forwards, and the host's time waiting for the device (the timed decodes' medians, ms)."""
    rows = [(row["batch"], e) for row in r.rows for e in row["end_to_end"] + row.get("extra", []) if e.get("time")]
    if not rows:
        return []
    kinds = sorted({k for _, e in rows for k in e["time"]["forwards"]})
    lines = ["", "| batch | trajectory | policy | wall ms | " + " | ".join(f"{k} ms (n)" for k in kinds)
             + " | between forwards ms | host waiting ms | host working ms |", "|" + " --- |" * (len(kinds) + 7)]
    for batch, e in rows:
        t = e["time"]
        name = e.get("policy") or (f"k={e['k']} {e['subset']}" if e["k"] > 1 else "k=1")
        cells = [str(batch), e.get("trajectory", ""), name, f"{t['wall_ms']:.1f}"]
        cells += [f"{t['forwards'][k]['ms']:.1f} ({t['forwards'][k]['count']})" if k in t["forwards"] else "-"
                  for k in kinds]
        cells += [f"{t['between_ms']:.1f}", f"{t['host_wait_ms']:.1f}", f"{t['wall_ms'] - t['host_wait_ms']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", "Per decode (the median timed one): each forward kind's device time and count (CUDA events "
                    "around each graph replay; `+skip`: forwards in which some group was skipped by every row), the "
                    "device time between forwards (logits, unmasking, the host's next launch), and the host's time "
                    "blocked on its one read per step against the rest of the wall time."]


def warmup_table(r) -> list[str]:
    """Fresh processes in a row, per path: each one's first and warm decode at each batch size,
    the goals beside the first decodes of the first (empty cache) and the second process."""
    if not r.fresh_processes:
        return []
    batches = r.fresh_processes[0]["settings"]["batches"]
    lines = ["", "| path | process (kernel cache) | model ready s | "
             + " | ".join(f"batch {b}: first decode s (warm s)" for b in batches) + " | process s | goal |",
             "|" + " --- |" * (len(batches) + 5)]
    for w in r.fresh_processes:
        goals = [f"first decode ≤ {w['goals']['first_s']:g} s: " + ("met" if w["met"]["first"] else "not met")]
        if w["met"]["second_process"] is not None:
            goals.append(f"second process ≤ {w['goals']['second_process_s']:g} s: "
                         + ("met" if w["met"]["second_process"] else "not met"))
        for i, p in enumerate(w["processes"]):
            cells = [w["path"], f"{i + 1} ({p['cache']})", f"{p['model_ready_s']:.1f}"]
            cells += [f"{b['first_s']:.2f} ({b['warm_s']:.2f})" for b in p["batches"]]
            cells += [f"{p['process_s']:.1f}", goals[i] if i < len(goals) else ""]
            lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", "Each process is fresh (`python -m reuse_exp.engine.warmup`), one after another on one "
                    "cache root of their own: the first finds it empty, the next find the compiled kernels the "
                    "first kept; CUDA graphs are captured again by every process. First decode: the first at "
                    "that batch size in that process; the goals are the first batch size's."]

"""The fast path's goals, each beside the figure a benchmark run measured for it: met, not met,
or not measured by this run (the run's settings left it out).

The anchor is the public implementation on an H100 (the shared performance-anchor notes:
bf16, batch 1, the 7B shape, one token per step, k=1 and k=2): its ratios mean most on that
machine kind, and say so.
"""
from __future__ import annotations

from .bench_paths import GOAL_FIRST_S, GOAL_SECOND_PROCESS_S

SMALL_X_FLOOR = 1.25           # small-block forward at batch 1, over its bytes at the copy bandwidth
DECISION_COST = 0.03           # a measuring policy at drift 0 (no skip) against k=1, batch 1
SAVING_OF_IDEAL = 0.8          # a decode's saving against k=1, of the bytes its skipped layer evaluations read
FULL_OF_PEAK = 0.70            # full-block forward at batch 64, of the dense matrix-product peak
PUBLIC_SMALL_MS, PUBLIC_TPS = 26.7, {1: 29.7, 2: 41.4}   # public code on an H100, small-block ms and tok/s
PUBLIC_TPS_FACTOR = 5.0


def _row(r, batch: int) -> dict | None:
    return next((row for row in r.rows if row["batch"] == batch), None)


def _goal(name: str, target: str, figure: str | None, met: bool | None) -> dict:
    return {"goal": name, "target": target, "figure": figure or "not measured in this run",
            "met": None if figure is None else met}


def goals(r) -> list[dict]:
    """Every goal of the fast path beside this run's figure."""
    out = []
    b1, b64 = _row(r, 1), _row(r, 64)
    x = b1["small_block"]["x_floor"] if b1 else None
    out.append(_goal("small-block forward, batch 1", f"<= {SMALL_X_FLOOR}x the copy floor",
                     f"{b1['forward_ms']['small_block']['median']:.2f} ms = {x:.2f}x the floor "
                     f"({b1['small_block']['floor_ms']:.2f} ms)" if b1 else None, x is not None and x <= SMALL_X_FLOOR))
    of_peak = b64["full_block"]["of_peak"] if b64 else None
    out.append(_goal("full-block forward, batch 64", f">= {FULL_OF_PEAK:.0%} of the dense peak",
                     f"{of_peak:.0%} ({b64['full_block']['tflops']:.0f} of {r.peak_tflops:.0f} TFLOP/s)" if b64 else None,
                     of_peak is not None and of_peak >= FULL_OF_PEAK))
    default = next(iter(r.fresh_processes), None)
    if default:
        first = default["processes"][0]["batches"][0]["first_s"]
        out.append(_goal(f"first decode of a fresh process ({default['path']})", f"<= {GOAL_FIRST_S:g} s",
                         f"{first:.1f} s", first <= GOAL_FIRST_S))
        second = default["processes"][1]["batches"][0]["first_s"] if len(default["processes"]) > 1 else None
        out.append(_goal("first decode of a second process (caches kept)", f"<= {GOAL_SECOND_PROCESS_S:g} s",
                         f"{second:.1f} s" if second is not None else None,
                         second is not None and second <= GOAL_SECOND_PROCESS_S))
    else:
        out.append(_goal("first decode of a fresh process", f"<= {GOAL_FIRST_S:g} s", None, None))
    for e in (b1 or {}).get("extra", []):
        # a measuring policy at drift 0 skips nothing: what is left against k=1 is its decisions
        if e.get("trajectory") == "one-token" and e.get("mode") == "delta" and e.get("drift") == 0 and "saving" in e:
            cost = -e["saving"]
            out.append(_goal(f"decisions of {e['policy_name']}-{e['mode']} (drift 0: no skip) against k=1, batch 1",
                             f"<= {DECISION_COST:.0%} of the decode", f"{cost:+.1%}", cost <= DECISION_COST))
    for row in r.rows:   # the end-to-end saving of k=2 and of the adaptive policy at T=1, where decoded
        for e in row["end_to_end"] + row.get("extra", []):
            reuses = e.get("k", 1) > 1 or (e.get("mode") == "delta" and e.get("drift") == 1.0)
            if reuses and e.get("of_ideal") is not None:
                name = e.get("policy") or f"k={e['k']} {e['subset']}"
                out.append(_goal(f"decode saving of {name}, batch {row['batch']}, {e.get('trajectory', '')}",
                                 f">= {SAVING_OF_IDEAL:g} of the ideal",
                                 f"{e['saving']:.1%} of {e['ideal_saving']:.1%} = {e['of_ideal']:.2f}",
                                 e["of_ideal"] >= SAVING_OF_IDEAL))
    if r.path_check:
        c = r.path_check
        out.append(_goal(f"the default path ({r.path_name}) decodes eager's tokens, k=1", "identical",
                         f"first {c['tokens_compared']} tokens " + ("identical" if c["equal"] else
                                                                     f"part at token {c['first_divergence']}"),
                         c["equal"]))
    k1 = next((e for e in (b1 or {}).get("end_to_end", []) if e["k"] == 1 and e.get("trajectory") == "one-token"), None)
    if k1 and b1:
        small = b1["forward_ms"]["small_block"]["median"]
        ratio = k1["tokens_per_second"] / PUBLIC_TPS[1]
        out.append(_goal("tok/s at k=1, batch 1, one token per step, against the public code (H100 anchor)",
                         f">= {PUBLIC_TPS_FACTOR:g}x", f"{k1['tokens_per_second']:.1f} = {ratio:.1f}x its "
                         f"{PUBLIC_TPS[1]} (small-block forward {PUBLIC_SMALL_MS / small:.1f}x faster)",
                         ratio >= PUBLIC_TPS_FACTOR))
    return out


def goals_table(r) -> list[str]:
    lines = ["", "| goal | target | this run | met |", "| --- | --- | --- | --- |"]
    for g in goals(r):
        met = "-" if g["met"] is None else ("yes" if g["met"] else "no")
        lines.append(f"| {g['goal']} | {g['target']} | {g['figure']} | {met} |")
    return lines

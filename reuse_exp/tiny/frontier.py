"""Accuracy against the fraction of layer compute skipped, on the bundled tiny model.

    reuse-exp frontier [--limit 200] [--delta 0.5,0.75,1,1.25] [--replay 0.5,0.75,1,1.1] [--out DIR]
                       [--readme README.md]

Every fixed configuration (k x subset x mode, and the replay control) and the adaptive
policy at several drift thresholds, on tiny_gsm (generative, 200 items) and tiny_mc
(loglikelihood: one forward per request, so reuse cannot act and every configuration
scores the same; it is measured once and said so). Writes frontier.md, frontier.json and
frontier.png to --out, and the README's `frontier` and `tiny_table` sections with --readme.
A configuration *dominates* another when it skips at least as much and is more accurate.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import MODEL_DIR
from . import data as tiny_data
from ..engine.policies.drift import DriftPolicy
from ..engine.loading import load_model, load_tokenizer
from .table import (EvalResult, fixed_policies, machine_description, markdown, mc_accuracy, measure,
                    update_readme)

MAX_REUSE = 8


def adaptive_policies(num_layers: int, delta: list[float], replay: list[float]) -> dict[str, DriftPolicy]:
    out = {f"adaptive delta {t:g}": DriftPolicy.create(num_layers, drift=t, max_reuse=MAX_REUSE, mode="delta") for t in delta}
    out |= {f"adaptive replay {t:g}": DriftPolicy.create(num_layers, drift=t, max_reuse=MAX_REUSE, mode="replay") for t in replay}
    return out


def dominated_by(results: dict[str, EvalResult], name: str) -> list[str]:
    """Adaptive configurations that skip at least as much as `name` and are more accurate."""
    r = results[name]
    return [a for a, x in results.items() if a.startswith("adaptive")
            and x.skipped_fraction >= r.skipped_fraction and x.accuracy > r.accuracy]


def frontier_table(results: dict[str, EvalResult], mc: float, n: int) -> str:
    base = results["k=1"]
    lines = [f"tiny_gsm, {n} items: accuracy ± stderr against the fraction of layer evaluations skipped, "
             f"sorted by skip. Paired against k=1: text changed / correct → wrong / wrong → correct. "
             f"Adaptive: max {MAX_REUSE} reuses in a row.", "",
             "| configuration | skipped | replayed steps | accuracy | Δ vs k=1 | paired vs k=1 | tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in sorted(results.items(), key=lambda kv: (kv[1].skipped_fraction, kv[0])):
        lines.append(f"| {name} | {r.skipped_fraction:.3f} | {r.replayed_fraction:.3f} | {r.accuracy:.1%} ± "
                     f"{r.stderr:.1%} | {100 * (r.accuracy - base.accuracy):+.1f} pt | "
                     "{} / {} / {}".format(*r.paired(base)) + f" | {r.tokens_per_second:.0f} |")
    goal = [a for a, r in results.items() if a.startswith("adaptive") and r.skipped_fraction >= 0.30
            and r.accuracy >= base.accuracy - 0.01]
    fixed = [f for f in results if not f.startswith("adaptive") and f != "k=1"]
    undominated = [f for f in fixed if not dominated_by(results, f)]
    lines += ["", "Goal (adaptive skips >= 30% within 1 point of k=1): "
              + (f"met by {', '.join(goal)}." if goal else "not met by any threshold measured."),
              "Fixed configurations no adaptive one dominates (skips at least as much, more accurate): "
              + (", ".join(undominated) + "." if undominated else "none."),
              f"tiny_mc (loglikelihood, one forward per request: reuse cannot act, so every configuration "
              f"scores the same and skips 0): {mc:.1%}."]
    return "\n".join(lines)


def plot(results: dict[str, EvalResult], path: Path, n: int) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    families = {"k=1": ("black", "*"), "output": ("tab:blue", "o"), "delta": ("tab:orange", "s"),
                "replay": ("tab:green", "^"), "adaptive delta": ("tab:red", "D"), "adaptive replay": ("tab:purple", "v")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), dpi=110)
    x_max = max(40.0, 10 * -(-120 * max(r.skipped_fraction for r in results.values()) // 10))
    low = 100 * min(r.accuracy - r.stderr for r in results.values())
    zoom_from = max(0.0, 5 * (low // 5) - 5)
    for ax, y_from in zip(axes, (0.0, zoom_from)):
        for family, (colour, marker) in families.items():
            pts = [(r.skipped_fraction, r.accuracy, r.stderr) for name, r in results.items()
                   if name == family or (name.startswith(family + " ") and not
                                         (family in ("delta", "replay") and name.startswith("adaptive")))]
            if pts:
                xs, ys, es = zip(*sorted(pts))
                ax.errorbar([100 * x for x in xs], [100 * y for y in ys], yerr=[100 * e for e in es], fmt=marker,
                            color=colour, label=family, capsize=3,
                            linestyle="-" if family.startswith("adaptive") else "")
        ax.set_xlim(0, x_max)
        ax.set_ylim(y_from, 100.5)
        ax.set_xlabel("layer evaluations skipped (%)")
        ax.set_ylabel("tiny_gsm strict-match accuracy (%)" + (f"  [axis starts at {y_from:g}%]" if y_from else ""))
        ax.grid(True, alpha=0.3)
    axes[0].set_title("full scale")
    axes[1].set_title(f"zoom: accuracy axis broken at {zoom_from:g}%")
    axes[0].legend(title="policy", loc="lower left")
    fig.suptitle(f"Reuse frontier on the bundled tiny model (n = {n} items; bars: ±1 stderr)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run(limit: int, delta: list[float], replay: list[float], out: Path, readme: Path | None,
        threads: int = 1, batch_size: int = 200) -> dict:
    torch.set_num_threads(threads)
    model, _ = load_model(MODEL_DIR, dtype="float32")
    tok = load_tokenizer(MODEL_DIR)
    docs = tiny_data.read_task_docs("tiny_gsm_test.jsonl")[:limit]
    machine = machine_description(threads, "float32")
    t0 = time.perf_counter()
    policies = {**fixed_policies(model.num_layers), **adaptive_policies(model.num_layers, delta, replay)}
    results = measure(model, tok, docs, batch_size, policies)
    mc = mc_accuracy(model, tok, tiny_data.read_task_docs("tiny_mc_test.jsonl"))
    out.mkdir(parents=True, exist_ok=True)
    table = frontier_table(results, mc, len(docs))
    grid = markdown({k: v for k, v in results.items() if not k.startswith("adaptive")}, model.num_layers,
                    machine, len(docs), mc, batch_size)
    (out / "frontier.md").write_text(table + "\n\n" + grid + "\n")
    (out / "frontier.json").write_text(json.dumps({
        "machine": machine, "n": len(docs), "tiny_mc": mc, "seconds": time.perf_counter() - t0,
        "results": {k: {"accuracy": r.accuracy, "stderr": r.stderr, "skipped_fraction": r.skipped_fraction,
                        "replayed_fraction": r.replayed_fraction, "tokens_per_second": r.tokens_per_second,
                        "paired_vs_k1": r.paired(results["k=1"]), "correct": r.correct}
                    for k, r in results.items()}}, indent=1) + "\n")
    plot(results, out / "frontier.png", len(docs))
    if readme is not None:
        update_readme(readme, table, "frontier")
        update_readme(readme, grid, "tiny_table")
    print(table + "\n\n" + grid)
    return {"table": table, "grid": grid, "results": results}


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--delta", type=floats, default=[0.5, 0.75, 1.0, 1.25])
    ap.add_argument("--replay", type=floats, default=[0.5, 0.75, 1.0, 1.1])
    ap.add_argument("--out", type=Path, default=Path("frontier_out"))
    ap.add_argument("--readme", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    run(args.limit, args.delta, args.replay, args.out, args.readme, args.threads)


if __name__ == "__main__":
    main()

"""The frontier report's rows, text and plot: the table sorted by skip with the goal and dominance
lines, the k x subset tables of the README, and accuracy against the skipped fraction."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..engine.reuse import SUBSETS
from .frontier import ADAPTIVE, THREADS, Config
from .measures import Accuracy, Paired
from .speed import noise_text, timing_of
from .store import RunRecord

GOAL_SKIP, GOAL_POINTS = 0.30, 0.01   # a learned policy skipping 30% within a point of k=1
LAYER_MODES = ("output", "delta")


@dataclass(frozen=True)
class Row:
    """One configuration: its run and what the run measured."""
    config: Config
    run: RunRecord
    accuracy: Accuracy
    records: list[dict]
    paired: Paired | None = None     # against k=1; None for k=1 itself and tiny_mc

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def commit(self) -> str:
        return (self.run.commit or "unknown")[:7]

    def metric(self, name: str) -> float:
        return self.run.metrics.get(name, 0.0)

    @property
    def skipped(self) -> float:
        return self.metric("skipped_fraction")

    @property
    def replayed(self) -> float:
        return self.metric("replayed_fraction")

    @property
    def tokens_per_second(self) -> float:
        return self.metric("tokens_per_second")

    @property
    def contended(self) -> bool:
        return timing_of(self.run).contended

    def speed_text(self) -> str:
        """`319 ±2%`: tokens/s with its run's noise, starred where its timing was contended."""
        return f"{self.tokens_per_second:.0f} {noise_text(timing_of(self.run).noise)}" + ("*" if self.contended else "")

    def figures(self) -> dict:
        p = self.paired
        return {"run_id": self.run.run_id, "commit": self.run.commit, "settings": dict(self.config.settings),
                "n": self.accuracy.n, "accuracy": self.accuracy.mean, "stderr": self.accuracy.stderr,
                "skipped_fraction": self.skipped, "replayed_fraction": self.replayed,
                "tokens_per_second": self.tokens_per_second,
                "tokens_per_second_noise": timing_of(self.run).noise, "timing_quality": timing_of(self.run).quality,
                "paired_vs_k1": None if p is None else [p.changed, p.correct_to_wrong, p.wrong_to_correct],
                "correct": {str(r["doc_id"]): r["correct"] for r in self.records}}


@dataclass(frozen=True)
class Report:
    rows: list[Row]                  # the tiny_gsm configurations, in the declaration's order
    mc: Row | None
    limit: int | None
    experiment: str

    @property
    def commits(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows + ([self.mc] if self.mc else []):
            out[r.commit] = out.get(r.commit, 0) + 1
        return out

    @property
    def mixed(self) -> bool:
        return len(self.commits) > 1

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    @property
    def base(self) -> Row:
        """The row at its policy's baseline (k=1): what every other row is paired against."""
        return next(r for r in self.rows if r.config.baseline)


def paired_text(r: Row) -> str:
    p = r.paired
    return "0 / 0 / 0" if p is None else f"{p.changed} / {p.correct_to_wrong} / {p.wrong_to_correct}"


def accuracy_text(r: Row) -> str:
    return f"{r.accuracy.mean:.1%} ± {r.accuracy.stderr:.1%}"


def dominated_by(rows: list[Row], name: str) -> list[str]:
    """Learned-policy rows that skip at least as much as `name` and are more accurate."""
    r = next(x for x in rows if x.name == name)
    return [x.name for x in rows if x.config.learned and x.skipped >= r.skipped and x.accuracy.mean > r.accuracy.mean]


def commits_line(report: Report) -> str:
    if not report.mixed:
        return f"Every row is a FINISHED run of commit {next(iter(report.commits))}."
    listed = ", ".join(f"{c} ({n} run{'s' if n > 1 else ''})" for c, n in report.commits.items())
    return (f"**Mixed commits: {listed}.** These rows were not all made by one code; re-run "
            "`reuse-exp frontier run` at one commit before reading them together.")


def timing_lines(report: Report) -> list[str]:
    """Under a table: what its tokens/s columns hold, and why each starred one is starred."""
    out = ["tokens/s ± the run's timing noise (its fixed probe before and after, its CPU wait: "
           "reuse_exp/tracking/timing.py); differences inside the two rows' noises added are noise."]
    out += [f"\\* {r.name} ({r.run.run_id[:8]}): timing {timing_of(r.run).quality}"
            for r in report.rows + ([report.mc] if report.mc else []) if r.contended]
    return out


def frontier_table(report: Report) -> str:
    rows, base = report.rows, report.base
    n = base.accuracy.n
    lines = [f"tiny_gsm, {n} items: accuracy ± stderr against the fraction of layer evaluations skipped, "
             f"sorted by skip. Paired against k=1: text changed / correct → wrong / wrong → correct. "
             f"Adaptive: max {ADAPTIVE['max_reuse']} reuses in a row. {commits_line(report)}", "",
             "| configuration | run | skipped | replayed steps | accuracy | Δ vs k=1 | paired vs k=1 | tokens/s ± noise |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r.skipped, r.name)):
        lines.append(f"| {r.name} | {r.run.run_id[:8]}@{r.commit} | {r.skipped:.3f} | {r.replayed:.3f} | "
                     f"{accuracy_text(r)} | {100 * (r.accuracy.mean - base.accuracy.mean):+.1f} pt | "
                     f"{paired_text(r)} | {r.speed_text()} |")
    goal = [r.name for r in rows if r.config.learned and r.skipped >= GOAL_SKIP
            and r.accuracy.mean >= base.accuracy.mean - GOAL_POINTS]
    fixed = [r.name for r in rows if not r.config.learned and not r.config.baseline]
    undominated = [f for f in fixed if not dominated_by(rows, f)]
    lines += ["", f"Goal (a learned policy skips >= {GOAL_SKIP:.0%} within {GOAL_POINTS * 100:g} point of k=1): "
              + (f"met by {', '.join(goal)}." if goal else "not met by any threshold measured."),
              "Fixed configurations no learned one dominates (skips at least as much, more accurate): "
              + (", ".join(undominated) + "." if undominated else "none.")]
    if report.mc is not None:
        m = report.mc
        lines.append(f"tiny_mc ({m.accuracy.n} items, run {m.run.run_id[:8]}@{m.commit}; loglikelihood, one "
                     f"forward per request: reuse cannot act, so every configuration scores the same and skips "
                     f"0): {accuracy_text(m)}.")
    lines += timing_lines(report)
    return "\n".join(lines)


def machine(report: Report) -> str:
    r = report.base.run
    return (f"{r.tags.get('device_name', r.params.get('resolved_device', '?'))}, {THREADS} torch thread(s) "
            f"(OMP_NUM_THREADS), torch {r.params.get('version_torch', '?')}, {r.params.get('resolved_dtype', '?')}")


def fixed_row(report: Report, mode: str, k: int, subset: str | None) -> Row | None:
    for r in report.rows:
        c = r.config
        if not c.learned and c.get("mode") == mode and c.get("k") == k and c.get("subset") == subset:
            return r
    return None


def cell(r: Row | None) -> str:
    return "—" if r is None else f"{r.accuracy.mean:.1%} / {r.speed_text()} / {r.skipped:.3f}"


def subset_layers(report: Report, subset: str) -> str:
    found = [r.run.params.get("layers", "?") for r in report.rows if r.config.get("subset") == subset]
    return found[0].replace(",", ", ") if found else "?"


def tiny_table(report: Report) -> str:
    base = report.base
    batch = base.config.get("batch_size") or base.run.params.get("batch_size")
    lines = [f"tiny_gsm test split, {base.accuracy.n} items, batches of {batch}, strict-match exact match; cell = "
             f"accuracy / generated tokens/s ± its noise / skipped-layer fraction. Measured on {machine(report)}. "
             f"{commits_line(report)}", "",
             "Subsets (the layers the runs logged): " + ", ".join(f"{s} = [{subset_layers(report, s)}]" for s in SUBSETS)
             + f". k=1 computes every layer (one run: {cell(base)}, ± {base.accuracy.stderr:.1%} stderr).", ""]
    for mode in LAYER_MODES:
        lines += [f"**{mode} mode**", "", "| k | " + " | ".join(SUBSETS) + " |", "| --- |" + " --- |" * len(SUBSETS),
                  "| 1 | " + " | ".join(cell(base) for _ in SUBSETS) + " |"]
        lines += [f"| {k} | " + " | ".join(cell(fixed_row(report, mode, k, s)) for s in SUBSETS) + " |" for k in (2, 3)]
        lines.append("")
    lines += ["**replay** (reuse steps skip the whole forward and unmask from the last logits; no subset)", "",
              "| k | all layers |", "| --- | --- |"]
    lines += [f"| {k} | {cell(fixed_row(report, 'replay', k, None))} |" for k in (2, 3)] + [""]
    lines += [f"**Paired against k=1** (items of {base.accuracy.n}: text changed / correct → wrong / wrong → correct)",
              "", "| config | first | middle | last |", "| --- | --- | --- | --- |"]
    for mode in LAYER_MODES:
        for k in (2, 3):
            found = [fixed_row(report, mode, k, s) for s in SUBSETS]
            lines.append(f"| {mode} k={k} | " + " | ".join("—" if r is None else paired_text(r) for r in found) + " |")
    for k in (2, 3):
        r = fixed_row(report, "replay", k, None)
        if r is not None:
            lines.append(f"| replay k={k} | {paired_text(r)} (no subset) | | |")
    lines.append("")
    lines += same_text_lines(report)
    lines += [""] + timing_lines(report)
    return "\n".join(lines).rstrip()


def outputs(r: Row) -> list:
    return [x["output"] for x in sorted(r.records, key=lambda x: (x["task"], str(x["doc_id"])))]


def same_text_lines(report: Report) -> list[str]:
    """Observed, not assumed: do the subsets decode alike, and as replay does? (output hashes)"""
    out = []
    for k in (2, 3):
        replay = fixed_row(report, "replay", k, None)
        for mode in LAYER_MODES:
            found = [fixed_row(report, mode, k, s) for s in SUBSETS]
            if None in found:
                continue
            texts = [outputs(r) for r in found]
            if all(t == texts[0] for t in texts[1:]):
                same = " (and as replay)" if replay is not None and outputs(replay) == texts[0] else ""
                out.append(f"{mode} mode, k={k}: first, middle and last generated identical text for every "
                           f"item{same}.")
    return out


def plot(report: Report, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report.rows
    families = list(dict.fromkeys(r.config.family for r in rows))
    markers = "*osD^vPXh<>"
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), dpi=110)
    x_max = max(40.0, 10 * -(-120 * max(r.skipped for r in rows) // 10))
    low = 100 * min(r.accuracy.mean - r.accuracy.stderr for r in rows)
    zoom_from = max(0.0, 5 * (low // 5) - 5)
    for ax, y_from in zip(axes, (0.0, zoom_from)):
        for i, family in enumerate(families):
            pts = sorted((r.skipped, r.accuracy.mean, r.accuracy.stderr) for r in rows if r.config.family == family)
            xs, ys, es = zip(*pts)
            learned = any(r.config.learned for r in rows if r.config.family == family)
            ax.errorbar([100 * x for x in xs], [100 * y for y in ys], yerr=[100 * e for e in es],
                        fmt=markers[i % len(markers)], color="black" if family == report.base.config.family else f"C{i}",
                        label=family, capsize=3, linestyle="-" if learned else "")
        ax.set_xlim(0, x_max)
        ax.set_ylim(y_from, 100.5)
        ax.set_xlabel("layer evaluations skipped (%)")
        ax.set_ylabel("tiny_gsm strict-match accuracy (%)" + (f"  [axis starts at {y_from:g}%]" if y_from else ""))
        ax.grid(True, alpha=0.3)
    axes[0].set_title("full scale")
    axes[1].set_title(f"zoom: accuracy axis broken at {zoom_from:g}%")
    axes[0].legend(title="policy", loc="lower left")
    commits = ", ".join(report.commits)
    fig.suptitle(f"Reuse frontier on the bundled tiny model (n = {report.base.accuracy.n} items; "
                 f"bars: ±1 stderr; commit {commits}{' MIXED' if report.mixed else ''})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

"""`reuse-exp compare --task T`: the grid's configurations against its policy's baseline (k=1
for the fixed policy), and a plot, from one commit's runs.

Each configuration's row: n, accuracy ± stderr, tokens/s (median of the timed batches, with
quartiles), the speed ratio to the baseline with an interval that prints noise as noise, and
the paired view against it (outputs changed, correct->wrong, wrong->correct); measures.py says
how. Per configuration the newest clean FINISHED run at the chosen commit (HEAD unless
--commit). A configuration that has runs only at other commits, or only dirty ones,
is refused by name unless --include-other-commits / --include-dirty say to use them;
then its cells are starred and the parent run says which commits it mixes. Runs of one table
that computed in different environments or read different data (study/environments.py) are
refused the same way, one line per difference, unless --include-other-environments: then the
odd cells are starred and the table and the parent run's tag say what was mixed. Runs whose
timing was contended (study/speed.py) are refused by name unless --allow-contended stars them;
a cell with clean repeats keeps those. Tokens/s shows its noise, and a ratio inside the two
runs' noise prints as noise.
The table, compare.json and the PNG are logged to a comparison run beside the grid's runs, with
every number as a metric NAME.CONFIG (the MLflow UI's compare view shows them) and the compared
run ids as a tag; the grid's runs stay at the top of the runs table, where the study's view
shows them (tracking/ui.py), never folded under it.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import Refused
from ..settings import SPECS, spec
from ..tracking.ui import ensure_view
from .cells import LOGLIKELIHOOD, LOGLIKELIHOOD_WHY, Cell, GridRequest, spanning_why, task_kind
from .environments import differences
from .figure import plot
from .measures import MIN_TIMINGS, Measured, Paired, Ratio, measured, median, pair, speed_ratio
from .speed import noise_text, pair_noise, probe_seconds, timing_of
from .store import RunRecord, client, experiment_id, experiment_name, fetch_runs, git_state


@dataclass(frozen=True)
class Pick:
    cell: Cell
    run: RunRecord | None
    starred: bool = False       # from another commit, or dirty: included on request only
    repeats: tuple[RunRecord, ...] = ()   # every clean FINISHED run of the cell at the commit, newest first
    contended: bool = False     # its runs' timing was contended: included on request only

    @property
    def runs(self) -> tuple[RunRecord, ...]:
        return self.repeats or ((self.run,) if self.run else ())


def pick(cells: list[Cell], runs: list[RunRecord], commit: str, other_commits: bool, dirty: bool,
         other_environments: bool = False) -> list[Pick]:
    picks, refused = [], []
    for cell in cells:
        mine = sorted((r for r in runs if r.role == "run" and r.status == "FINISHED" and cell.matches(r)),
                      key=lambda r: r.start_ms, reverse=True)
        clean = [r for r in mine if r.commit == commit and not r.dirty]
        if clean:
            picks.append(Pick(cell, clean[0], repeats=tuple(clean)))
            continue
        allowed = [r for r in mine if (dirty or not r.dirty) and (other_commits or r.commit == commit)]
        if allowed:
            picks.append(Pick(cell, allowed[0], starred=True))
        elif mine:
            refused.append(f"{cell.name}: {', '.join(r.short() for r in mine[:3])}")
            picks.append(Pick(cell, None))
        else:
            picks.append(Pick(cell, None))
    if refused:
        raise Refused(f"refusing runs not from clean {commit[:7]}: " + "; ".join(refused) +
                      " -- re-run them with `reuse-exp grid run`, or pass --include-other-commits / --include-dirty")
    if not any(p.run for p in picks):
        raise Refused(f"no FINISHED run of this grid at {commit[:7]}: run `reuse-exp grid run` first")
    differ = differing_settings([r for p in picks for r in p.runs])
    if differ:
        listed = "; ".join(f"{n}: " + ", ".join(f"{v or 'none'} ({ids})" for v, ids in vals.items())
                           for n, vals in differ.items())
        raise Refused(f"the runs differ in settings the grid did not pin: {listed} -- pin them with -P NAME=VALUE")
    return star_environments(picks, other_environments)


def refuse_contended(picks: list[Pick], allowed: bool) -> list[Pick]:
    """Cells whose runs' timing was contended: refused by name unless allowed, then starred. A cell
    with clean and contended repeats keeps its clean ones."""
    out, refused = [], []
    for p in picks:
        fair = tuple(r for r in p.runs if not timing_of(r).contended)
        if not p.runs or len(fair) == len(p.runs):
            out.append(p)
        elif fair:
            out.append(replace(p, run=fair[0], repeats=fair if p.repeats else ()))
        elif allowed:
            out.append(replace(p, contended=True))
        else:
            refused.append(f"{p.cell.name} run {p.run.short()}: {timing_of(p.run).quality}")
    if refused:
        raise Refused("refusing runs whose timing was contended (their tokens/s measured the machine's other "
                      "work too): " + "; ".join(refused) + " -- re-run them on a quiet machine "
                      "(`reuse-exp grid run --force` with their --k and --subset), or pass --allow-contended "
                      "to show them starred")
    return out


def labelled(picks: list[Pick]) -> list[tuple[str, RunRecord]]:
    return [(p.cell.name, r) for p in picks for r in p.runs]


def star_environments(picks: list[Pick], allowed: bool) -> list[Pick]:
    """Runs from different environments or data in one table: refused, one line per difference,
    unless allowed; then the cells holding the odd runs are starred."""
    diffs = differences(labelled(picks))
    if not diffs:
        return picks
    if not allowed:
        raise Refused("refusing to put runs of different environments or data in one table:\n  " +
                      "\n  ".join(map(str, diffs)) + "\n-- run the grid in one environment (`reuse-exp grid run` "
                      "there), or pass --include-other-environments to show them starred")
    odd = {rid for d in diffs for rid in d.run_ids}
    return [replace(p, starred=True) if any(r.run_id in odd for r in p.runs) else p for p in picks]


def differing_settings(runs: list[RunRecord]) -> dict[str, dict[str, str]]:
    """The params on which the runs disagree, of the settings that shaped every one of them off
    their policy's axes (schema.shaping_settings; the cells pinned them as given, so what is
    left is what they resolved to), e.g. a CPU and a GPU run of one configuration: their tokens/s
    do not belong in one table. A reuse setting the baseline does not compute (k=1's mode) is
    not among them."""
    if not runs:
        return {}
    common = set.intersection(*(set(r.shaping_names) for r in runs)) - {a for r in runs for a in r.axes}
    names = [s.name for s in SPECS if s.name in common]
    out = {}
    for param in dict.fromkeys(p for n in names for p in spec(n).key_params):
        values: dict[str, list[str]] = {}
        for r in runs:
            values.setdefault(r.resolved(names)[param], []).append(r.run_id[:8])
        if len(values) > 1:
            out[param] = {v: ",".join(ids[:3]) for v, ids in values.items()}
    return out


# -- the comparison's rows ------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One configuration: what its runs measured and how it stands against the baseline."""
    pick: Pick
    measured: Measured | None       # the newest run: accuracy, records
    repeats: tuple[Measured, ...] = ()   # every run of the cell at the commit (timings pool over them)
    ratio: Ratio | None = None      # None: the baseline itself, or nothing to compare
    paired: Paired | None = None

    @property
    def rates(self) -> list[list[float]]:
        return [m.rates for m in self.repeats or (self.measured,) if m and m.rates]

    @property
    def name(self) -> str:
        return self.pick.cell.name + ("*" if self.pick.starred or self.pick.contended else "")

    @property
    def noise(self) -> float | None:
        """The relative noise of its tokens/s: the largest of its runs' (None if one has none)."""
        noises = [timing_of(m.run).noise for m in self.repeats or (self.measured,) if m]
        return None if not noises or None in noises else max(noises)

    def figures(self) -> dict[str, float]:
        """Every number of the row, by metric name (the parent run's metrics, compare.json)."""
        m = self.measured
        if m is None:
            return {}
        out = {n: m.metric(n) for n in ("n_samples", "accuracy", "accuracy_stderr", "skipped_fraction")}
        rates = [r for run in self.rates for r in run]
        if rates:
            out |= {"runs": len(self.rates), "timed_batches": len(rates), "tokens_per_second_median": median(rates),
                    "tokens_per_second_p25": float(np.quantile(rates, 0.25)),
                    "tokens_per_second_p75": float(np.quantile(rates, 0.75)),
                    "tokens_per_second_noise": self.noise, "timing_contended": float(self.pick.contended)}
        if self.ratio is not None:
            out["speedup"] = self.ratio.point
            if self.ratio.has_interval:
                out |= {"speedup_low": self.ratio.low, "speedup_high": self.ratio.high}
            if self.ratio.known:   # without an interval or noise, whether it is noise is unknown: no metric says
                out["speedup_within_noise"] = float(self.ratio.within_noise)
        if self.paired is not None:
            p = self.paired
            out |= {"paired_documents": p.pairs, "outputs_changed": p.changed,
                    "correct_to_wrong": p.correct_to_wrong, "wrong_to_correct": p.wrong_to_correct}
        return {k: float(v) for k, v in out.items() if v is not None}


def rows(cl, picks: list[Pick]) -> list[Row]:
    """Rows in the grid's order, each measured against the baseline (its policy's) when there is one."""
    plain = []
    for p in picks:
        ms = tuple(measured(cl, r) for r in p.runs)
        plain.append(Row(p, ms[0] if ms else None, ms))
    base = next((r for r in plain if r.pick.cell.baseline and r.measured), None)
    out = []
    for r in plain:
        if r.measured is None or base is None or r is base:
            out.append(r)
            continue
        ratio = speed_ratio(base.rates, r.rates) if base.rates and r.rates else None
        if ratio is not None:
            ratio = replace(ratio, noise=pair_noise(base.noise, r.noise, probe_seconds(base.pick.runs),
                                                    probe_seconds(r.pick.runs)))
        a, b = base.measured.records, r.measured.records
        out.append(Row(r.pick, r.measured, r.repeats, ratio, pair(a, b) if a is not None and b is not None else None))
    return out


COLUMNS = (("config", 12), ("n", 6), ("accuracy", 16), ("tokens/s median [p25, p75] (batches) noise", 44),
           ("vs {base}", 12), ("95% interval", 16), ("skipped", 8), ("changed", 9), ("c->w", 5), ("w->c", 5))


def row_cells(r: Row) -> list[str]:
    f = r.figures()
    if not f:
        return [r.name, "missing"]
    acc, se = f.get("accuracy"), f.get("accuracy_stderr")
    accuracy = "n/a" if acc is None else f"{acc:.1%} ± " + ("?" if se is None else f"{se * 100:.1f}")
    speed = "n/a"
    if "tokens_per_second_median" in f:
        speed = f"{f['tokens_per_second_median']:.1f}"
        if f["timed_batches"] > 1:
            speed += f" [{f['tokens_per_second_p25']:.1f}, {f['tokens_per_second_p75']:.1f}]"
        runs = int(f["runs"])
        speed += f" ({int(f['timed_batches'])}" + (f" in {runs} runs)" if runs > 1 else ")")
        speed += " " + noise_text(r.noise)
    if r.pick.cell.baseline:
        versus, interval = "baseline", "-"
    elif r.ratio is None:
        versus, interval = "n/a", "-"
    else:
        versus, interval = r.ratio.text(), r.ratio.interval_text()
    p = r.paired
    paired = ["-", "-", "-"] if p is None else [p.text(), str(p.correct_to_wrong), str(p.wrong_to_correct)]
    n = f.get("n_samples")
    skipped = f.get("skipped_fraction")
    return [r.name, "?" if n is None else str(int(n)), accuracy, speed, versus, interval,
            "n/a" if skipped is None else f"{skipped:.3f}", *paired]


def format_rows(rows_: list[Row], base: str = "k=1") -> str:
    heads = [t.format(base=base) for t, _ in COLUMNS]
    widths = [max(w, len(h) + 1) for h, (_, w) in zip(heads, COLUMNS)]

    def line(cells: list[str]) -> str:
        return "".join(f"{c:<{w}}" for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(heads)] + [line(row_cells(r)) for r in rows_])


def legend(rows_: list[Row], base: str = "k=1") -> str:
    """What the columns mean (`base`: the baseline, `k=1`), with n stated once when every
    configuration shares it."""
    ns = {r.figures().get("n_samples") for r in rows_ if r.measured}
    n = f"n = {int(ns.pop())} documents per configuration" if len(ns) == 1 and None not in ns else "n per row"
    return (f"{n}; accuracy ± lm-eval's standard error (points); tokens/s: median of the timed batches' "
            f"rates [quartiles] (batches) ± the runs' timing noise (their probe and CPU wait; ±? not recorded)\n"
            f"vs {base}: ratio of median tokens/s with a 95% bootstrap interval over batches; '~1 (noise)' when the "
            f"interval holds 1 or the ratio is within the two runs' noise, 'x?' when a run has fewer than "
            f"{MIN_TIMINGS} timed batches and no noise recorded\n"
            f"changed: documents whose output differs from {base}'s (of those both scored); "
            f"c->w / w->c: correct at {base} and wrong here / the reverse")


def describe(picks: list[Pick]) -> str:
    mixed = differences(labelled(picks))
    lines = ["", "mixed environments or data (* cells):", *(f"  {d}" for d in mixed)] if mixed else []
    lines += ["", "runs:"]
    for p in picks:
        lines.append(f"  {p.cell.name:<10} " + (", ".join(r.short() for r in p.runs) +
                                               ("  * other commit, dirty or environment" if p.starred else "") +
                                               (f"  * {timing_of(p.run).quality}" if p.contended else "")
                                               if p.run else "missing"))
    return "\n".join(lines)


def log_parent(cl, exp_id: str, request: GridRequest, picks: list[Pick], commit: str, text: str,
               png: Path, rows_: list[Row]) -> str:
    """Log the comparison to the grid's comparison run (one per set of compared runs)."""
    used = [r for p in picks for r in p.runs]
    ids = sorted(r.run_id for r in used)
    digest = hashlib.sha256(",".join(ids).encode()).hexdigest()[:16]
    found = cl.search_runs([exp_id], filter_string=f"tags.`reuse_exp.compared` = '{digest}'", max_results=1)
    commits = sorted({r.commit or "unknown" for r in used})
    if found:
        run_id = found[0].info.run_id
    else:
        run_id = cl.create_run(exp_id, run_name=f"grid {request.task} @ {commit[:7]}", tags={
            "reuse_exp.role": "compare", "reuse_exp.compared": digest, "task": request.task,
            "git_commit": commits[0] if len(commits) == 1 else "mixed:" + ",".join(c[:7] for c in commits),
            "git_dirty": "true" if any(r.dirty for r in used) else "false",
            "grid_key": used[0].grid_key, "compared_runs": ",".join(ids)[:5000],
            **({"mixed_environments": "\n".join(map(str, mixed))[:5000]}
               if (mixed := differences(labelled(picks))) else {})}).info.run_id
    from mlflow.entities import Metric
    now = int(time.time() * 1000)
    metrics = [Metric(f"{name}.{r.pick.cell.name}", v, now, 0) for r in rows_ for name, v in r.figures().items()]
    for i in range(0, len(metrics), 1000):   # MLflow takes at most 1000 metrics per batch
        cl.log_batch(run_id, metrics=metrics[i:i + 1000])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "compare.txt").write_text(text + "\n")
        (Path(tmp) / "compare.json").write_text(json.dumps(
            {r.pick.cell.name: {"run_ids": [x.run_id for x in r.pick.runs], "starred": r.pick.starred,
                                "contended": r.pick.contended,
                                **r.figures()} for r in rows_}, indent=2) + "\n")
        cl.log_artifact(run_id, str(Path(tmp) / "compare.txt"))
        cl.log_artifact(run_id, str(Path(tmp) / "compare.json"))
    cl.log_artifact(run_id, str(png))
    unfold(cl, exp_id, used)
    ensure_view(cl, exp_id)
    cl.set_terminated(run_id, "FINISHED")
    return run_id


def unfold(cl, exp_id: str, runs: list[RunRecord]) -> None:
    """Runs an earlier version nested under a comparison run, back at the top of the runs table
    (a parent's children sit folded under it in the UI: the grid out of sight)."""
    folded = [r for r in runs if "mlflow.parentRunId" in r.tags]
    if not folded:
        return
    comparisons = {c.info.run_id for c in cl.search_runs([exp_id], filter_string="tags.`reuse_exp.role` = 'compare'")}
    for r in folded:
        if r.tags["mlflow.parentRunId"] in comparisons:
            cl.delete_tag(r.run_id, "mlflow.parentRunId")


def compare(request: GridRequest, experiment: str | None, commit: str | None = None, *,
            include_other_commits: bool = False, include_dirty: bool = False,
            include_other_environments: bool = False, allow_contended: bool = False, out: Path | None = None,
            log: bool = True, echo: Callable[[str], None] = print) -> str | None:
    """Per configuration: n, accuracy ± stderr, tokens/s with spread, speed against the baseline
    with an interval, outputs changed against it; and a plot. From one commit. Echoes the table; returns
    the parent run it logged to (None with `log` off). Raises Refused when it would mix code."""
    code = git_state()
    commit = commit or code.commit
    cl = client()
    exp_id = experiment_id(cl, experiment)
    runs = fetch_runs(cl, exp_id, request.task)
    kind = task_kind(request.task, runs)
    cells = request.cells(kind)
    picks = pick(cells, runs, commit, include_other_commits, include_dirty, include_other_environments)
    picks = refuse_contended(picks, allow_contended)
    rows_ = rows(cl, picks)
    header = (f"compare {request.task} in experiment {experiment_name(experiment)!r} at {commit[:7]}"
              + (f" (HEAD of {code.root})" if commit == code.commit else ""))
    base = request.describe_baseline()
    if kind == LOGLIKELIHOOD:
        header += "\n" + LOGLIKELIHOOD_WHY.format(task=request.task, baseline=base)
    elif (baseline := next((c for c in cells if c.baseline), None)) is not None:
        every = f" of every {' and '.join(baseline.spans)}" if baseline.spans else ""
        header += f"\n{baseline.name} is the baseline{every} ({spanning_why(baseline, request) if every else base})"
    text = "\n".join([header, legend(rows_, base), "", format_rows(rows_, base)]) + "\n" + describe(picks)
    echo(text)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out) if out else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        png = plot(rows_, folder / "compare.png", f"{request.task}: accuracy vs tokens/s at {commit[:7]}",
                   tuple(n for n, _ in request.axes), base)
        if out:
            (folder / "compare.txt").write_text(text + "\n")
        if log:
            return log_parent(cl, exp_id, request, picks, commit, text, png, rows_)
    return None

"""`reuse-exp compare --task T`: the grid's 3x3 tables and plot, from one commit's runs.

Per configuration the newest clean FINISHED run at the chosen commit (HEAD unless
--commit). A configuration that has runs only at other commits, or only dirty ones,
is refused by name unless --include-other-commits / --include-dirty say to use them;
then its cells are starred and the parent run says which commits it mixes.
The tables and the PNG are logged to a parent run of the grid, and the grid's runs
are nested under it in the MLflow UI.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click

from ..engine.config import ConfigError
from .cells import LOGLIKELIHOOD, LOGLIKELIHOOD_WHY, Cell, GridRequest, build_request, grid_options, task_kind
from .store import RunRecord, client, experiment_id, experiment_name, fetch_runs, git_head

TABLES = (("accuracy", "accuracy", "{:.1%}"), ("tokens/s", "tokens_per_second", "{:.2f}"),
          ("speedup over k=1", None, "{:.2f}x"), ("skipped fraction", "skipped_fraction", "{:.3f}"))


@dataclass(frozen=True)
class Pick:
    cell: Cell
    run: RunRecord | None
    starred: bool = False       # from another commit, or dirty: included on request only


class Refused(ConfigError):
    """The comparison would mix code; the message names the runs and the flags."""


def pick(cells: list[Cell], runs: list[RunRecord], commit: str, other_commits: bool, dirty: bool) -> list[Pick]:
    picks, refused = [], []
    for cell in cells:
        mine = sorted((r for r in runs if r.role == "run" and r.status == "FINISHED" and cell.matches(r)),
                      key=lambda r: r.start_ms, reverse=True)
        clean = [r for r in mine if r.commit == commit and not r.dirty]
        if clean:
            picks.append(Pick(cell, clean[0]))
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
    differ = differing_settings([p.run for p in picks if p.run])
    if differ:
        listed = "; ".join(f"{n}: " + ", ".join(f"{v or 'none'} ({ids})" for v, ids in vals.items())
                           for n, vals in differ.items())
        raise Refused(f"the runs differ in settings the grid did not pin: {listed} -- pin them with -P NAME=VALUE")
    return picks


def differing_settings(runs: list[RunRecord]) -> dict[str, dict[str, str]]:
    """Result-shaping settings (other than k and subset) on which the runs disagree, e.g. a
    CPU and a GPU run of one configuration: their tokens/s do not belong in one table."""
    out = {}
    for name in runs[0].shaping() if runs else ():
        values: dict[str, list[str]] = {}
        for r in runs:
            values.setdefault(r.shaping()[name], []).append(r.run_id[:8])
        if len(values) > 1:
            out[name] = {v: ",".join(ids[:3]) for v, ids in values.items()}
    return out


def value(p: Pick | None, metric: str) -> float | None:
    return None if p is None or p.run is None else p.run.metrics.get(metric)


def tables(picks: list[Pick], ks: list[int], subsets: list[str]) -> dict[str, dict[tuple[int, str], float | None]]:
    by = {(p.cell.k, p.cell.subset): p for p in picks}
    out = {}
    for title, metric, _ in TABLES:
        if metric:
            out[title] = {c: value(by.get(c), metric) for c in by}
    speed = out["tokens/s"]
    base = {s: speed.get((1, s)) for s in subsets}
    out["speedup over k=1"] = {(k, s): (speed[(k, s)] / base[s] if speed[(k, s)] and base[s] else None)
                               for (k, s) in by}
    return out


def format_tables(picks: list[Pick], values: dict, ks: list[int], subsets: list[str]) -> str:
    by = {(p.cell.k, p.cell.subset): p for p in picks}
    lines = []
    for title, _, fmt in TABLES:
        lines += ["", title, "k     " + "".join(f"{s:>12}" for s in subsets)]
        for k in ks:
            cells = []
            for s in subsets:
                v, p = values[title].get((k, s)), by.get((k, s))
                text = "n/a" if v is None else fmt.format(v)
                cells.append(f"{text + ('*' if p and p.starred else ''):>12}")
            lines.append(f"k={k:<4}" + "".join(cells))
    return "\n".join(lines)


def describe(picks: list[Pick]) -> str:
    lines = ["", "runs:"]
    for p in picks:
        lines.append(f"  {p.cell.name:<10} " + (p.run.short() + ("  * other commit or dirty" if p.starred else "")
                                               if p.run else "missing"))
    return "\n".join(lines)


def plot(picks: list[Pick], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")  # no display on a cluster or in CI
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 6), dpi=100)
    for i, p in enumerate(picks):
        acc, tps = value(p, "accuracy"), value(p, "tokens_per_second")
        if acc is None or tps is None:
            continue
        ax.scatter([tps], [acc], marker="o" if not p.starred else "x", s=40)
        # configurations often tie on accuracy: stagger the labels above and below, with a leader line
        dy = (8 + 12 * (i // 2)) * (1 if i % 2 == 0 else -1)
        ax.annotate(p.cell.name + ("*" if p.starred else ""), (tps, acc), textcoords="offset points",
                    xytext=(6, dy), fontsize=8, arrowprops={"arrowstyle": "-", "lw": 0.5, "alpha": 0.5})
    ax.margins(x=0.15, y=0.15)   # room for the labels
    ax.set_xlabel("tokens/s")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def log_parent(cl, exp_id: str, request: GridRequest, picks: list[Pick], commit: str, text: str,
               png: Path, values: dict) -> str:
    """Log the comparison to the grid's parent run (one per set of compared runs) and nest the runs."""
    used = [p.run for p in picks if p.run]
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
            "grid_key": used[0].grid_key, "compared_runs": ",".join(ids)[:5000]}).info.run_id
    for title, metric, _ in TABLES:
        key = (metric or "speedup").replace("/", "_")
        for (k, s), v in values[title].items():
            if v is not None:
                cl.log_metric(run_id, f"{key}.k{k}_{s}", float(v))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "compare.txt").write_text(text + "\n")
        (Path(tmp) / "compare.json").write_text(json.dumps(
            {p.cell.name: {"run_id": p.run.run_id if p.run else None, "starred": p.starred,
                           **{t: values[t].get((p.cell.k, p.cell.subset)) for t in values}} for p in picks},
            indent=2) + "\n")
        cl.log_artifact(run_id, str(Path(tmp) / "compare.txt"))
        cl.log_artifact(run_id, str(Path(tmp) / "compare.json"))
    cl.log_artifact(run_id, str(png))
    for r in used:
        if "mlflow.parentRunId" not in r.tags:   # a run already nested elsewhere stays there
            cl.set_tag(r.run_id, "mlflow.parentRunId", run_id)
    cl.set_terminated(run_id, "FINISHED")
    return run_id


@click.command("compare")
@grid_options
@click.option("--commit", default=None, help="compare runs of this commit (default: HEAD)")
@click.option("--include-other-commits", is_flag=True, help="fill configurations missing at the commit "
              "with their newest run from another commit (starred)")
@click.option("--include-dirty", is_flag=True, help="allow runs from uncommitted changes (starred)")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="also write compare.txt and "
              "compare.png here")
@click.option("--no-log", is_flag=True, help="print only; log nothing to MLflow")
def compare_cmd(task, ks, subsets, mode, limit, model, params, experiment, stuck_after, commit,
                include_other_commits, include_dirty, out, no_log) -> None:
    """3x3 tables (accuracy, tokens/s, speedup over k=1, skipped fraction) and a plot, from one commit."""
    try:
        request = build_request(task, ks, subsets, mode, limit, model, params)
        commit = commit or git_head()
        cl = client()
        exp_id = experiment_id(cl, experiment)
        runs = fetch_runs(cl, exp_id, task)
        kind = task_kind(task, runs)
        cells = request.cells(kind)
        picks = pick(cells, runs, commit, include_other_commits, include_dirty)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    ks_ = sorted({c.k for c in cells})
    subsets_ = [s for s in request.subsets if any(c.subset == s for c in cells)]
    values = tables(picks, ks_, subsets_)
    header = f"compare {task} in experiment {experiment_name(experiment)!r} at {commit[:7]}"
    if kind == LOGLIKELIHOOD:
        header += "\n" + LOGLIKELIHOOD_WHY.format(task=task, subset=cells[0].subset)
    text = header + "\n" + format_tables(picks, values, ks_, subsets_) + "\n" + describe(picks)
    click.echo(text)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out) if out else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        png = plot(picks, folder / "compare.png", f"{task}: accuracy vs tokens/s at {commit[:7]}")
        if out:
            (folder / "compare.txt").write_text(text + "\n")
        if not no_log:
            parent = log_parent(cl, exp_id, request, picks, commit, text, png, values)
            click.echo(f"\nlogged to parent run {parent}")

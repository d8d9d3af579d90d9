"""The frontier's report, read from the store: one row per configuration, each a FINISHED clean
run whose commit is shown.

Accuracy, its standard error and the paired counts against k=1 come from the per-document
records each run logged from lm-eval's samples (measures.py); the skipped and replayed
fractions and tokens/s are the run's logged metrics. Runs of several commits are refused by
name, or with `allow_mixed` written with the commits flagged; so are runs whose timing was
contended (study/speed.py), or with `allow_contended` written with their tokens/s starred.
Every tokens/s carries its run's noise. Writes frontier.md,
frontier.json (every figure with its run id and commit, and the commands that made them) and
frontier.png, and optionally the README's `frontier` and `tiny_table` sections.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ConfigError
from ..errors import Refused
from .frontier import CONFIGS, EXPERIMENT, LIMIT, MC, Config, FrontierCell, cells, frontier_runs
from .frontier_tables import Report, Row, frontier_table, plot, tiny_table
from .measures import accuracy, measured, pair
from .speed import timing_of
from .store import RunRecord

RUN_COMMAND = "reuse-exp frontier run --limit {limit} --experiment {experiment}"
REPORT_COMMAND = "reuse-exp frontier report --limit {limit} --experiment {experiment} --out {out}"


def newest_finished(cell: FrontierCell, runs: list[RunRecord]) -> RunRecord | None:
    """The configuration's newest FINISHED run of a clean tree: only such a run is a figure. Of
    the runs at that run's commit, the newest whose timing was not contended, if there is one."""
    mine = [r for r in runs if r.role == "run" and r.status == "FINISHED" and not r.dirty and cell.matches(r)]
    newest = max(mine, key=lambda r: r.start_ms, default=None)
    fair = [r for r in mine if newest is not None and r.commit == newest.commit and not timing_of(r).contended]
    return max(fair, key=lambda r: r.start_ms, default=newest)


def refuse_contended(wanted: list[FrontierCell], picked: list[RunRecord]) -> None:
    contended = [f"{c.name} ({r.short()})" for c, r in zip(wanted, picked) if timing_of(r).contended]
    if contended:
        raise Refused(f"the timing of {len(contended)} run(s) was contended, their tokens/s measured other work "
                      f"too: {', '.join(contended[:5])}{' ...' if len(contended) > 5 else ''} -- run them again "
                      "on a quiet machine (`reuse-exp frontier run --rerun-contended`), or pass --allow-contended "
                      "to write them starred")


def pick(wanted: list[FrontierCell], runs: list[RunRecord], allow_mixed: bool,
         allow_contended: bool = False) -> list[RunRecord]:
    picked = [newest_finished(c, runs) for c in wanted]
    missing = [c.name for c, r in zip(wanted, picked) if r is None]
    if missing:
        raise Refused(f"no FINISHED clean run of {', '.join(missing)}: run `reuse-exp frontier run` first")
    commits: dict[str, list[str]] = {}
    for c, r in zip(wanted, picked):
        commits.setdefault((r.commit or "unknown")[:7], []).append(c.name)
    if len(commits) > 1 and not allow_mixed:
        listed = "; ".join(f"{c}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                           for c, names in commits.items())
        raise Refused(f"the frontier's runs come from {len(commits)} commits ({listed}): re-run "
                      "`reuse-exp frontier run` at one commit, or pass --allow-mixed-commits to write "
                      "the report with the commits flagged")
    if not allow_contended:
        refuse_contended(wanted, picked)
    return picked


def read_row(cl, config: Config, run: RunRecord) -> Row:
    records = measured(cl, run).records
    if not records:
        raise Refused(f"run {run.short()} ({config.name}) logged no per-sample results (per_sample.jsonl)")
    return Row(config, run, accuracy(records), records)


def build(limit: int | None = LIMIT, experiment: str = EXPERIMENT, allow_mixed: bool = False,
          configs: tuple[Config, ...] = CONFIGS, mc: Config | None = MC, allow_contended: bool = False) -> Report:
    """The report of the frontier's runs in `experiment`; Refused names what is missing or mixed."""
    cl, exp_id, runs = frontier_runs(experiment)
    if exp_id is None:
        raise Refused(f"no experiment {experiment!r}: run `reuse-exp frontier run` first")
    wanted = cells(limit, configs, mc)
    picked = pick(wanted, runs, allow_mixed, allow_contended)
    rows = [read_row(cl, c, r) for c, r in zip(configs, picked)]
    base = next((r for r in rows if r.config.baseline), None)
    if base is None:
        raise ConfigError("the frontier declares no configuration at its policy's baseline (k=1) to pair against")
    rows = [r if r is base else Row(r.config, r.run, r.accuracy, r.records, pair(base.records, r.records))
            for r in rows]
    mc_row = read_row(cl, mc, picked[-1]) if mc else None
    return Report(rows, mc_row, limit, experiment)


def commands(report: Report, out: Path, readme: Path | None) -> list[str]:
    fill = {"limit": "none" if report.limit is None else report.limit, "experiment": report.experiment, "out": out}
    return [RUN_COMMAND.format(**fill), REPORT_COMMAND.format(**fill) + (f" --readme {readme}" if readme else "")]


def write(report: Report, out: Path, readme: Path | None = None) -> dict[str, Path]:
    """frontier.md, frontier.json and frontier.png under `out`; the README's sections with `readme`."""
    table, grid = frontier_table(report), tiny_table(report)
    made_by = "Made by: " + " && ".join(f"`{c}`" for c in commands(report, out, readme)) + "."
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "frontier.md", "json": out / "frontier.json", "png": out / "frontier.png"}
    paths["md"].write_text(table + "\n\n" + grid + "\n\n" + made_by + "\n")
    paths["json"].write_text(json.dumps({
        "experiment": report.experiment, "limit": report.limit, "commands": commands(report, out, readme),
        "commits": report.commits, "mixed_commits": report.mixed,
        "results": {r.name: r.figures() for r in report.rows},
        "tiny_mc": report.mc.figures() if report.mc else None}, indent=1) + "\n")
    plot(report, paths["png"])
    if readme is not None:
        image = os.path.relpath(paths["png"], readme.parent)
        update_readme(readme, table + f"\n\n![frontier]({image})\n\n" + made_by, "frontier")
        update_readme(readme, grid, "tiny_table")
    return paths


def update_readme(path: Path, text: str, section: str) -> None:
    """Replace what lies between the README's `<!-- section:start -->` and `:end -->` markers."""
    content = path.read_text()
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    if start not in content or end not in content:
        raise ConfigError(f"{path} has no {start} ... {end} section: add the two markers where it goes")
    head, rest = content.split(start, 1)
    path.write_text(head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1])

"""`reuse-exp audit`: the CI guard over a tracking store.

Exits non-zero, one line per run id and reason, when a run cannot be trusted in a
comparison: it is dirty or names no commit, it is stuck RUNNING past a timeout (a
job that died without ending its run), or a grid's newest runs come from more than
one commit (the study's three-commits-in-one-table failure).
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import click

from .store import STUCK_AFTER_S, RunRecord, client, experiment_name, fetch_runs, tracking_uri


@dataclass(frozen=True)
class Finding:
    run_id: str
    reason: str

    def __str__(self) -> str:
        return f"{self.run_id}  {self.reason}"


def provenance(r: RunRecord) -> list[str]:
    if r.commit is None:
        return [f"no git commit (git_commit={r.tags.get('git_commit', '<missing>')!r})"]
    if r.commit.startswith("mixed:"):
        return [f"a comparison over several commits ({r.commit[6:]}): once the grid is whole at one commit, "
                f"compare again and delete this one (`mlflow runs delete --run-id {r.run_id}`)"]
    if "git_dirty" not in r.tags:
        return ["no git_dirty tag: cannot tell the code it ran"]
    if r.dirty:
        return [f"dirty: ran from uncommitted changes at {r.commit[:7]}"]
    return []


def stuck(r: RunRecord, now_ms: int, after_s: float) -> list[str]:
    age = (now_ms - r.start_ms) / 1000
    if r.status in ("RUNNING", "SCHEDULED") and age > after_s:
        return [f"stuck {r.status} for {age / 3600:.1f} h (> {after_s:.0f} s): a dead job; "
                "end it with `mlflow runs` or MlflowClient.set_terminated(run_id, 'FAILED')"]
    return []


def mixed_grids(runs: list[RunRecord]) -> list[Finding]:
    """Per grid (task + every setting but k and subset), the newest clean FINISHED run of each
    cell: if those come from more than one commit, the grid's table would mix code."""
    grids: dict[tuple, dict] = defaultdict(dict)
    for r in sorted(runs, key=lambda r: r.start_ms):
        if r.role == "run" and r.status == "FINISHED" and r.commit and not r.dirty:
            grids[(r.params.get("task", "?"), r.grid_key)][r.cell] = r   # newest wins
    out = []
    for (task, _), cells in grids.items():
        commits = sorted({r.commit for r in cells.values()})
        if len(commits) > 1:
            where = ", ".join(f"{c[:7]}: {sum(r.commit == c for r in cells.values())} config(s)" for c in commits)
            for r in sorted(cells.values(), key=lambda r: r.cell):
                out.append(Finding(r.run_id, f"grid {task} mixes commits ({where}); this is k{r.cell[0]}_"
                                             f"{r.cell[1]} at {r.commit[:7]}: re-run `reuse-exp grid run`"))
    return out


def audit(runs: list[RunRecord], now_ms: int | None = None, stuck_after_s: float = STUCK_AFTER_S) -> list[Finding]:
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    found = [Finding(r.run_id, why) for r in runs for why in provenance(r) + stuck(r, now_ms, stuck_after_s)]
    return found + mixed_grids(runs)


@click.command("audit")
@click.option("--experiment", default=None, help="experiment to check (default: MLFLOW_EXPERIMENT_NAME or Default)")
@click.option("--all-experiments", is_flag=True, help="check every experiment of the store")
@click.option("--stuck-after", type=float, default=STUCK_AFTER_S, show_default=True,
              help="seconds after which a RUNNING run counts as a dead job")
def audit_cmd(experiment, all_experiments, stuck_after) -> None:
    """Fail, listing run ids and reasons, if any run is untrustworthy (CI guard)."""
    cl = client()
    if all_experiments:
        exps = cl.search_experiments()
    else:
        exp = cl.get_experiment_by_name(experiment_name(experiment))
        if exp is None:
            raise click.ClickException(f"no experiment {experiment_name(experiment)!r} in {tracking_uri()}: "
                                       "pass --experiment NAME or set MLFLOW_TRACKING_URI to the store to check")
        exps = [exp]
    runs = [r for e in exps for r in fetch_runs(cl, e.experiment_id)]
    findings = audit(runs, stuck_after_s=stuck_after)
    names = ", ".join(e.name for e in exps)
    if findings:
        for f in findings:
            click.echo(str(f))
        raise click.ClickException(f"audit failed: {len(findings)} finding(s) over {len(runs)} run(s) in {names}")
    click.echo(f"audit ok: {len(runs)} run(s) in {names} ({tracking_uri()})")

"""`reuse-exp audit`: the CI guard over a tracking store.

Exits non-zero, one line per run id and reason, when a run cannot be trusted in a
comparison: it is dirty or evaluated without a commit, it is dead (RUNNING, with no
heartbeat for `--stale-after`: a job killed without a word), or a grid's newest runs
come from more than one commit (the study's three-commits-in-one-table failure), or at one
commit from different environments or data (study/environments.py: one line per difference).
Runs refused before they evaluated (a typo, a dirty tree) are counted apart, never
findings: they hold no result; most are deleted with their record (out of the UI's runs
table), and counted all the same. With `--speed`, a configuration whose tokens/s at a commit
fell below the commit before's by more than the runs' noise is one too (study/speed.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from ..errors import AuditFailed, ConfigError
from ..tracking.schema import REFUSED_TAG
from .environments import any_environment, differences
from .speed import speed_changes
from .store import (LIVE, STALE_AFTER_S, RunRecord, cell_name, client, end_command, experiment_name, fetch_runs,
                    format_duration, tracking_uri)


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


def dead(r: RunRecord, now_ms: int, stale_after_s: float) -> list[str]:
    if r.is_dead(now_ms, stale_after_s):
        return [f"dead: {r.status} with {r.last_sign_of_life(now_ms)}, more than {format_duration(stale_after_s)}: "
                f"its process is gone; end it with `{end_command(r.run_id, stale_after_s)}`"]
    return []


def newest_cells(runs: list[RunRecord]) -> dict[tuple, dict]:
    """Per grid, the newest clean FINISHED run of each cell. A grid is what its runs pin off their
    policy's axes (RunRecord.grid_part: the task, the policy, its other settings, the model...);
    a run that pins less, because less shapes it (k=1 computes no mode), belongs to every grid
    whose pins hold its own: one k=1 run is the baseline of the output and the delta grid."""
    done = [r for r in sorted(runs, key=lambda r: r.start_ms)
            if r.role == "run" and r.status == "FINISHED" and r.commit and not r.dirty]
    parts = {r.run_id: frozenset(r.grid_part().items()) for r in done}
    distinct = set(parts.values())
    grids: dict[tuple, dict] = {}
    for g in sorted((p for p in distinct if not any(p < q for q in distinct)), key=sorted):
        cells = grids.setdefault((dict(g).get("task", "?"), hash(g)), {})
        for r in done:
            if parts[r.run_id] <= g:
                cells[r.cell] = r   # newest wins
    return grids


def mixed_environments(runs: list[RunRecord]) -> list[Finding]:
    """A grid at one commit whose cells ran in different environments or read different data:
    one finding per difference, naming the cells. A grid told the environment does not matter
    (every run tagged so) is checked for its data only."""
    out = []
    for (task, _), cells in newest_cells(runs).items():
        if len({r.commit for r in cells.values()}) > 1:
            continue   # mixed commits: said by mixed_grids
        labelled = [(cell_name(c), r) for c, r in sorted(cells.items())]
        for d in differences(labelled, any_environment([r for _, r in labelled])):
            out.append(Finding(",".join(d.run_ids), f"grid {task} mixes environments or data at "
                                                    f"{labelled[0][1].commit[:7]}: {d.line}"))
    return out


def mixed_grids(runs: list[RunRecord]) -> list[Finding]:
    """The newest clean FINISHED run of each cell of a grid: if those come from more than one
    commit, the grid's table would mix code."""
    out = []
    for (task, _), cells in newest_cells(runs).items():
        commits = sorted({r.commit for r in cells.values()})
        if len(commits) > 1:
            where = ", ".join(f"{c[:7]}: {sum(r.commit == c for r in cells.values())} config(s)" for c in commits)
            for r in sorted(cells.values(), key=lambda r: r.cell):
                out.append(Finding(r.run_id, f"grid {task} mixes commits ({where}); this is {cell_name(r.cell)} "
                                             f"at {r.commit[:7]}: re-run `reuse-exp grid run`"))
    return out


def never_began(r: RunRecord) -> bool:
    """Has not logged its code (MLflow's CLI opens the run before the package starts, and a kill in
    start-up can come first): it holds no result, so its provenance cannot be judged; a dead one
    is still found dead, and an ended one is counted apart, like a refused run."""
    return r.status != "FINISHED" and "git_commit" not in r.tags


def speed_regressions(runs: list[RunRecord]) -> list[Finding]:
    return [Finding(r.run_id, r.line) for r in speed_changes(runs)[0]]


def audit(runs: list[RunRecord], now_ms: int | None = None, stale_after_s: float = STALE_AFTER_S,
          speed: bool = False) -> list[Finding]:
    """The findings over `runs`; refused runs are none of them. `speed`: speed regressions too."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    kept = [r for r in runs if not r.refused]
    found = [Finding(r.run_id, why) for r in kept
             for why in ([] if never_began(r) else provenance(r)) + dead(r, now_ms, stale_after_s)]
    return found + mixed_grids(kept) + mixed_environments(kept) + (speed_regressions(kept) if speed else [])


def deleted_refusals(cl, exp_id: str) -> int:
    """Refused runs deleted with their record (out of the runs table; tracking/aftercare.py)."""
    from mlflow.entities import ViewType
    found, token = 0, None
    while True:
        page = cl.search_runs([exp_id], filter_string=f"tags.`{REFUSED_TAG}` = 'true'",
                              run_view_type=ViewType.DELETED_ONLY, max_results=1000, page_token=token)
        found += len(page)
        token = page.token
        if not token:
            return found


def audit_store(experiment: str | None = None, all_experiments: bool = False,
                stale_after_s: float = STALE_AFTER_S, echo: Callable[[str], None] = print,
                speed: bool = False) -> None:
    """Echo a line per finding and raise AuditFailed when there is one; else echo that all is well."""
    cl = client(must_exist=True)   # an audit of a store that is not there fails; it never makes one
    if all_experiments:
        exps = cl.search_experiments()
    else:
        exp = cl.get_experiment_by_name(experiment_name(experiment))
        if exp is None:
            raise ConfigError(f"no experiment {experiment_name(experiment)!r} in {tracking_uri()}: "
                              "pass --experiment NAME or set MLFLOW_TRACKING_URI to the store to check")
        exps = [exp]
    runs = [r for e in exps for r in fetch_runs(cl, e.experiment_id)]
    findings = audit(runs, stale_after_s=stale_after_s, speed=speed)
    if speed:   # what was not a finding: speed-ups, commits that could not be compared
        for note in speed_changes([r for r in runs if not r.refused])[1]:
            echo(f"speed: {note}")
    names = ", ".join(e.name for e in exps)
    refused = sum(r.refused for r in runs)
    unbegun = sum(never_began(r) and r.status not in LIVE and not r.refused for r in runs)
    judged = len(runs) - refused - unbegun
    refused += sum(deleted_refusals(cl, e.experiment_id) for e in exps)
    apart = (f"; {refused} refused run(s), ignored" if refused else "") + \
            (f"; {unbegun} run(s) ended before they began, ignored" if unbegun else "")
    if findings:
        for f in findings:
            echo(str(f))
        raise AuditFailed(f"audit failed: {len(findings)} finding(s) over {judged} run(s) in {names} "
                          f"({tracking_uri()}){apart}")
    echo(f"audit ok: {judged} run(s) in {names} ({tracking_uri()}){apart}")

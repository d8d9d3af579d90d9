"""Tokens/s as far as it can be trusted: a run's timing quality and noise as it logged them
(tracking/timing.py), and the speed regressions between commits that `audit --speed` names.

A regression, the way asv and conbench report one: the same configuration (its config_key),
task, environment and data (study/environments.py) and torch threads, at two commits, whose
tokens/s differ by more than the two runs' noise added up, in one line:

    k2_middle_tiny_gsm: 18 % slower at 1a2b3c4 than at 9f8e7d6 (noise 3 %)

Each commit is compared with the one measured before it (commits ordered by their first run).
Only runs whose timing was clean count; a commit whose runs were all contended, or that
predate the timing record, is said in a note and compared with nothing. Several clean runs at
one commit: their median, whose noise is the larger of their own noises and twice their
standard deviation, over the square root of their number (repeats are how a small change shows
through a shared machine's noise: docs/speed.md). The fixed probe (tracking/probe.py: the
machine's speed, whatever the code) widens the noise of two runs by PROBE_SENSITIVITY times the
change in its seconds between them: the machine that was slower for one run than for the other.
The decode moved 0.69 times the probe's change where it was measured (probe.py); 2.5 errs
towards calling a change noise, never towards a regression the machine made. Two runs whose probes
differ by more than DRIFT_LIMIT ran on machines too different to compare (another node,
another clock): a note, never a regression.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ..tracking.timing import CLEAN, CONTENDED, DRIFT_LIMIT, NOISE_FLOOR, QUALITY_TAG
from .environments import fingerprint
from .store import RunRecord, cell_name

NOISE_METRIC = "tokens_per_second_noise"
PROBE_SENSITIVITY = 2.5   # above the measured 0.69 (probe.py): wider noise, never a false regression


@dataclass(frozen=True)
class Timing:
    """How a run's tokens/s can be read: its timing_quality tag and its relative noise."""
    quality: str | None      # `clean`, `contended: why`, or None: the run recorded none
    noise: float | None

    @property
    def contended(self) -> bool:
        return (self.quality or "").startswith(CONTENDED)

    @property
    def clean(self) -> bool:
        return self.quality == CLEAN

    @property
    def reason(self) -> str:
        if self.quality is None:
            return "no timing quality recorded (a run older than the timing record)"
        return self.quality


def timing_of(r: RunRecord) -> Timing:
    return Timing(r.tags.get(QUALITY_TAG), r.metrics.get(NOISE_METRIC))


def percent(x: float) -> str:
    return f"{round(100 * x)} %"


def noise_text(noise: float | None) -> str:
    """`±3%`, or `±?` for a run that estimated none."""
    return "±?" if noise is None else f"±{100 * noise:.0f}%"


def probe_seconds(runs) -> float | None:
    """The median of the runs' probes, before and after (None where none was timed)."""
    probes = [p for r in runs for p in (r.metrics.get("probe_seconds_before"), r.metrics.get("probe_seconds_after"))
              if p]
    return float(np.median(probes)) if probes else None


def machine_change(a: float | None, b: float | None) -> float:
    """How much faster or slower the machine was for one than for the other, by their probes (log)."""
    return abs(math.log(b / a)) if a and b else 0.0


def pair_noise(a: float | None, b: float | None, probe_a: float | None = None,
               probe_b: float | None = None) -> float | None:
    """The noise of a ratio of two runs' tokens/s: their noises added (each bounds its own error),
    widened by the machine's change between them as their probes saw it."""
    return None if a is None or b is None else a + b + PROBE_SENSITIVITY * machine_change(probe_a, probe_b)


def contended_runs(runs: list[RunRecord]) -> list[tuple[RunRecord, str]]:
    """The runs whose timing was contended, each with why."""
    return [(r, t.quality) for r in runs if (t := timing_of(r)).contended]


# -- regressions between commits ---------------------------------------------------------------
@dataclass(frozen=True)
class Regression:
    run_id: str       # the slower commit's newest run
    line: str


@dataclass(frozen=True)
class AtCommit:
    """One configuration's clean runs at one commit."""
    commit: str
    runs: tuple[RunRecord, ...]
    first_ms: int             # its first run's start, contended ones too: the commit's place in time

    @property
    def newest(self) -> RunRecord:
        return max(self.runs, key=lambda r: r.start_ms)

    @property
    def tokens_per_second(self) -> float:
        return float(np.median([r.metrics["tokens_per_second"] for r in self.runs]))

    @property
    def noise(self) -> float:
        """One run: its own. Several: the noise of their median, from their own noises and from their
        spread (twice the standard deviation), each over the square root of their number."""
        own = [timing_of(r).noise or NOISE_FLOOR for r in self.runs]
        if len(self.runs) == 1:
            return own[0]
        rates = np.array([r.metrics["tokens_per_second"] for r in self.runs])
        spread = 2 * rates.std(ddof=1) / rates.mean()
        return max(NOISE_FLOOR, float(np.median(own)), spread) / math.sqrt(len(rates))

    @property
    def probe_seconds(self) -> float | None:
        return probe_seconds(self.runs)


def speed_key(r: RunRecord) -> tuple:
    """Runs of one key measure the same work on the same kind of machine the same way."""
    return (r.params.get("task", "?"), r.tags.get("config_key", "?"), tuple(sorted(fingerprint(r).items())),
            r.tags.get("env.torch_threads", "?"))


def name_of(r: RunRecord) -> str:
    return r.tags.get("mlflow.runName") or cell_name(r.cell)


def speed_changes(runs: list[RunRecord]) -> tuple[list[Regression], list[str]]:
    """The regressions between consecutive commits of each configuration, and notes: speed-ups,
    commits that could not be compared and why."""
    groups: dict[tuple, dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r.role == "run" and r.status == "FINISHED" and r.commit and not r.dirty \
                and r.metrics.get("tokens_per_second"):
            groups[speed_key(r)][r.commit].append(r)
    regressions, notes = [], []
    for by_commit in groups.values():
        measured = []
        for commit, mine in by_commit.items():
            clean = tuple(r for r in mine if timing_of(r).clean)
            if clean:
                measured.append(AtCommit(commit, clean, min(r.start_ms for r in mine)))
            else:
                newest = max(mine, key=lambda r: r.start_ms)
                notes.append(f"{name_of(newest)} at {commit[:7]}: not compared, {timing_of(newest).reason}")
        measured.sort(key=lambda a: a.first_ms)
        for before, after in zip(measured, measured[1:]):
            found = compare_commits(before, after)
            if isinstance(found, Regression):
                regressions.append(found)
            elif found:
                notes.append(found)
    return regressions, notes


def compare_commits(before: AtCommit, after: AtCommit) -> Regression | str | None:
    """`after` against `before`: a Regression, a note (faster; machines too different), or None."""
    name = name_of(after.newest)
    change = after.tokens_per_second / before.tokens_per_second - 1
    pa, pb = after.probe_seconds, before.probe_seconds
    if pa and pb and abs(pa / pb - 1) > DRIFT_LIMIT and abs(change) > before.noise + after.noise:
        return (f"{name}: {percent(abs(change))} {'slower' if change < 0 else 'faster'} at {after.commit[:7]} "
                f"than at {before.commit[:7]}, not compared: the fixed probe ran {percent(abs(pa / pb - 1))} "
                f"{'slower' if pa > pb else 'faster'} there, another machine or clock")
    noise = pair_noise(before.noise, after.noise, pb, pa)
    where = f"at {after.commit[:7]} than at {before.commit[:7]} (noise {percent(noise)})"
    if abs(change) <= noise:
        return None
    if change < 0:
        return Regression(after.newest.run_id, f"{name}: {percent(-change)} slower {where}")
    return f"{name}: {percent(change)} faster {where}"

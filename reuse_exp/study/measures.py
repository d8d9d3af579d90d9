"""What a compared run measured, and how a configuration stands against the k=1 baseline:
the speed ratio with an interval that says when it is noise, and the paired per-document view.

Speed. A run times each decoding (or scoring) batch; a configuration's tokens/s is the
median of its per-batch rates, with the quartiles as spread. The ratio to k=1 is the ratio
of the two medians, and its 95% interval a percentile bootstrap: each side's per-batch
rates are resampled with replacement, independently, and the ratio of the resampled
medians taken DRAWS times. Resampling each side on its own (not pairing batch i with
batch i) lets the interval carry what differs between batches, prompt lengths and early
stops included: it is wider than a paired one and errs towards "noise". An interval that
holds 1 is printed as noise, never as a ratio. Below MIN_TIMINGS rates on either side
there is no interval (one big batch is one timing): the ratio is printed with a question
mark and the count.

Batches of one run share its machine state; a machine that drifts between runs (another
job, clocks, a shared CPU) moves all of them at once, and one run cannot show it. Where a
configuration has repeated runs at the commit (`grid run --force`), the bootstrap is
hierarchical: each draw resamples the runs, then the batches within each drawn run, so
the interval carries the drift between runs too. Repeating k=1 alone widens every ratio
by the baseline's drift, which is the cheap check; a single run's interval is within-run only.

Pairs. Generation is deterministic, so the documents two runs share pair exactly (by task
and doc_id) and their counts need no interval: outputs that changed, correct->wrong and
wrong->correct. They are far more sensitive than two accuracies side by side.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..evaluation.stats import sample_records
from .store import RunRecord

MIN_TIMINGS = 6   # a distribution-free 95% interval of a median needs 6 values: 2 * 0.5**6 < 0.05
DRAWS = 4000
LEVEL = 0.95


@dataclass(frozen=True)
class Ratio:
    """Median tokens/s of a configuration over the baseline's, with a bootstrap interval."""
    point: float
    low: float | None
    high: float | None
    timings: int                  # the fewer of the two sides' timed batches
    noise: float | None = None    # the two runs' timing noise added (their probes and CPU waits), relative

    @property
    def has_interval(self) -> bool:
        return self.low is not None

    @property
    def known(self) -> bool:
        """Can it be told from noise: a bootstrap interval, or the runs' own noise?"""
        return self.has_interval or self.noise is not None

    @property
    def within_noise(self) -> bool:
        """The interval holds 1, or the ratio is within the runs' noise (what the batches cannot see:
        a machine that is slower for one run than for the other)."""
        inside = self.noise is not None and abs(self.point - 1) <= self.noise
        return inside or (self.has_interval and self.low <= 1.0 <= self.high)

    def text(self) -> str:
        if not self.known:
            return f"{self.point:.2f}x?"
        return "~1 (noise)" if self.within_noise else f"{self.point:.2f}x"

    def interval_text(self) -> str:
        if self.has_interval:
            return f"[{self.low:.2f}, {self.high:.2f}]"
        if self.noise is not None:
            return f"±{100 * self.noise:.0f}% (runs)"
        return f"none: {self.timings} timing{'s' if self.timings != 1 else ''}"


def median(xs: list[float]) -> float:
    return float(np.quantile(xs, 0.5))


def speed_ratio(base: list[list[float]], other: list[list[float]], draws: int = DRAWS, seed: int = 0) -> Ratio:
    """Ratio of median per-batch rates, `other` over `base`, each given as one list of rates per
    run, with a percentile bootstrap interval (fixed seed: the same runs give the same table)."""
    point = median([r for run in other for r in run]) / median([r for run in base for r in run])
    n = min(sum(map(len, base)), sum(map(len, other)))
    if n < MIN_TIMINGS:
        return Ratio(point, None, None, n)
    rng = np.random.default_rng(seed)
    ratios = resampled_medians(other, draws, rng) / resampled_medians(base, draws, rng)
    low, high = np.quantile(ratios, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Ratio(point, float(low), float(high), n)


def resampled_medians(runs: list[list[float]], draws: int, rng):
    """Medians of `draws` bootstrap resamples: of the batches of one run, or of the runs and
    then the batches within each drawn run (the drift between runs included)."""
    import numpy as np
    arrays = [np.asarray(run, dtype=float) for run in runs if run]
    if len(arrays) == 1:
        a = arrays[0]
        return np.median(a[rng.integers(0, len(a), (draws, len(a)))], axis=1)
    out = np.empty(draws)
    for d in range(draws):
        drawn = [arrays[i] for i in rng.integers(0, len(arrays), len(arrays))]
        out[d] = np.median(np.concatenate([a[rng.integers(0, len(a), len(a))] for a in drawn]))
    return out


@dataclass(frozen=True)
class Paired:
    """One configuration against the baseline, document by document."""
    pairs: int
    changed: int              # the raw outputs differ
    correct_to_wrong: int
    wrong_to_correct: int
    unpaired: int             # documents scored by one run only

    def text(self) -> str:
        return f"{self.changed}/{self.pairs}"


def pair(base: list[dict], other: list[dict]) -> Paired:
    a = {(r["task"], r["doc_id"]): r for r in base}
    b = {(r["task"], r["doc_id"]): r for r in other}
    shared = a.keys() & b.keys()
    changed = sum(a[d]["output"] != b[d]["output"] for d in shared)
    c2w = sum(a[d]["correct"] is True and b[d]["correct"] is False for d in shared)
    w2c = sum(a[d]["correct"] is False and b[d]["correct"] is True for d in shared)
    return Paired(len(shared), changed, c2w, w2c, len(a.keys() ^ b.keys()))


# -- what one run measured ------------------------------------------------------------------
@dataclass(frozen=True)
class Measured:
    run: RunRecord
    rates: list[float]             # per timed batch tokens/s; one aggregate rate for runs without timings.json
    records: list[dict] | None     # per-document records; None when the run logged none

    def metric(self, name: str) -> float | None:
        return self.run.metrics.get(name)

    @property
    def n(self) -> int | None:
        v = self.metric("n_samples")
        return None if v is None else int(v)


def measured(cl, run: RunRecord) -> Measured:
    """A run's metrics with its per-batch timings and per-document records, read from its
    artifacts (timings.json, per_sample.jsonl; lm-eval's samples_<task>.jsonl for runs older
    than per_sample.jsonl)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file otherwise
    names = {a.path for a in cl.list_artifacts(run.run_id)}
    with tempfile.TemporaryDirectory() as tmp:
        def read(name: str) -> str:
            return Path(cl.download_artifacts(run.run_id, name, tmp)).read_text()

        rates = []
        if "timings.json" in names:   # as the run's tokens_per_second_median: with all its ranks decoding
            ranks = int(run.params.get("world_size") or 1)
            rates = [ranks * t / s for t, s in json.loads(read("timings.json"))["batches"] if s > 0]
        if not rates and run.metrics.get("tokens_per_second"):
            rates = [run.metrics["tokens_per_second"]]
        records = None
        if "per_sample.jsonl" in names:
            records = [json.loads(line) for line in read("per_sample.jsonl").splitlines() if line]
        else:
            samples = {n[len("samples_"):-len(".jsonl")]: [json.loads(line) for line in read(n).splitlines() if line]
                       for n in names if n.startswith("samples_") and n.endswith(".jsonl")}
            primary = run.tags.get("accuracy_metric")
            if samples:
                records = sample_records(samples, None if primary in (None, "none") else primary)
    return Measured(run, rates, records)


@dataclass(frozen=True)
class Accuracy:
    """A run's accuracy from its per-document records, with lm-eval's standard error of it."""
    n: int
    correct: int
    mean: float
    stderr: float


def accuracy(records: list[dict]) -> Accuracy:
    """Over the documents with a score (lm-eval's per-sample value of the primary metric); the
    stderr is lm-eval's own (`mean_stderr`: sample standard deviation / sqrt(n))."""
    from lm_eval.api.metrics import mean_stderr
    scores = [r["score"] for r in records if r["score"] is not None]
    if not scores:
        raise ValueError("no scored documents")
    return Accuracy(len(scores), sum(r["correct"] is True for r in records), sum(scores) / len(scores),
                    mean_stderr(scores) if len(scores) > 1 else 0.0)

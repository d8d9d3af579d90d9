"""What the lm-eval model measured: decoding reports, scoring counts, per-batch timings,
warm-up, generations; and the compact per-sample records a comparison pairs by document."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field, fields

import numpy as np

from ..engine.instrument import DecodeReport, SampleStats

SCORING_KIND = "masked"  # the forward kind of loglikelihood scoring (FastDLLM.forward_masked)
LOGLIKELIHOOD_NOTE = ("reuse cannot act on loglikelihood: each request is scored by masked forwards "
                      "of every layer, so every k and subset give the same result")


@dataclass
class ScoringStats:
    """Loglikelihood scoring: masked block-causal forwards, one row per scored position."""
    requests: int = 0
    scored_tokens: int = 0            # continuation tokens whose log-probability entered a score
    truncated_continuations: int = 0  # first_token scoring: continuations of >1 token, scored on the first
    ties: int = 0                     # documents whose best choices share one score exactly
    positions: int = 0                # tokens run through the model, padding included
    rows: int = 0                     # sequences run (per-request forwards)
    batch_forwards: int = 0
    seconds: float = 0.0
    batches: list[tuple[int, float]] = field(default_factory=list)  # (scored tokens, seconds) per batch
    kept: int = 0                     # of `requests`, those a run before this one scored (request cache)

    def add_kept(self, record: dict) -> None:
        """A request the request cache answered: its counts, not its time."""
        self.kept += 1
        self.requests += 1
        self.scored_tokens += record["scored_tokens"]
        self.rows += record["rows"]
        self.truncated_continuations += record["truncated_continuation"]


# The figures that cover only the requests this run computed (time, rates, batches, the machine's
# load); every other count and fraction covers every request, those a resumed run found in its
# request cache too. Patterns as fnmatch reads them.
COMPUTED_ONLY = ("seconds", "tokens_per_second*", "timed_batches", "batch_forwards_*", "*_seconds",
                 "positions_per_second", "rank*/seconds", "rank*/tokens_per_second*", "gpu_*", "rank*/gpu_*",
                 "torch_peak_memory_mb", "peak_rss_mb", "system/*", "timing_*", "probe_*", "rank*/timing_*",
                 "rank*/probe_*")


def computed_only(name: str) -> bool:
    """Is metric `name` one that covers only what this run computed (a timing, not a result)?"""
    from fnmatch import fnmatchcase
    return any(fnmatchcase(name, p) for p in COMPUTED_ONLY)


def rate_metrics(timings: list[tuple[float, float]], ranks: int = 1) -> dict[str, float]:
    """The median of per-batch tokens/s with its quartiles and the number of timed batches:
    the spread a comparison needs (one aggregate rate has none). `ranks` decoding at once: a
    batch's rate counts them all (times `ranks`), as tokens_per_second does."""
    rates = [ranks * t / s for t, s in timings if s > 0]
    if not rates:
        return {"timed_batches": 0}
    p25, median, p75 = (float(q) for q in np.quantile(rates, [0.25, 0.5, 0.75]))
    return {"timed_batches": len(rates), "tokens_per_second_median": median,
            "tokens_per_second_p25": p25, "tokens_per_second_p75": p75}


@dataclass
class HarnessStats:
    decode: list[DecodeReport] = field(default_factory=list)
    scoring: ScoringStats = field(default_factory=ScoringStats)
    warmup_seconds: float = 0.0
    truncated_prompts: int = 0
    generations: list[dict] = field(default_factory=list)  # one record per generate_until request
    # generate_until requests the request cache answered (a run before this one decoded them):
    # their per-sample counts and adaptive drifts, which the counts and fractions include
    kept: list[SampleStats] = field(default_factory=list)
    kept_drifts: list[float] = field(default_factory=list)
    requests_total: int = 0   # requests lm-eval handed over so far (progress: done of total)
    phase: str = ""           # what the model is doing now: decoding or scoring

    @property
    def requests_done(self) -> int:
        return len(self.generations) + self.scoring.requests

    @property
    def requests(self) -> int:
        """Requests this process computed (decoded or scored), not those the request cache answered."""
        return len(self.generations) - len(self.kept) + self.scoring.requests - self.scoring.kept

    def add_kept(self, record: dict) -> None:
        """A generate_until request the request cache answered, with what decoding it measured."""
        sample = dict(record["sample"])
        self.kept.append(SampleStats(**{**sample, "forwards": Counter(sample["forwards"])}))
        self.kept_drifts.extend(record["refresh_drifts"])
        self.generations.append(record["generation"])
        self.truncated_prompts += record["truncated_prompt"]

    def samples(self) -> list[SampleStats]:
        """Every generate_until request's counts: decoded here, or kept by the run before."""
        return [s for r in self.decode for s in r.samples] + self.kept

    @property
    def task_kind(self) -> str:
        kinds = [k for k, ran in (("generate_until", bool(self.decode or self.kept)),
                                  ("loglikelihood", self.scoring.requests > 0)) if ran]
        return "+".join(kinds) or "none"

    def timings(self) -> dict:
        """Per timed batch, (tokens, seconds): generated tokens when the run decoded, else scored."""
        if self.decode:
            return {"unit": "generated tokens", "batches": [[r.generated_tokens, r.wall_seconds] for r in self.decode]}
        return {"unit": "scored tokens", "batches": [list(b) for b in self.scoring.batches]}

    def metrics(self) -> dict[str, float]:
        """Throughput and reuse metrics (names: tracking/schema.py). Counts and fractions cover every
        request, those the request cache answered too; the THROUGHPUT ones only what this run computed."""
        m: dict[str, float] = {"warmup_seconds": self.warmup_seconds}
        samples = self.samples()
        if samples:
            sample_fw, batch_fw = Counter(), Counter()
            for s in samples:
                sample_fw.update(s.forwards)
            for r in self.decode:
                batch_fw.update(r.batch_forwards)
            run = sum(s.layer_evals_run for s in samples)
            skipped = sum(s.layer_evals_skipped for s in samples)
            tokens = sum(s.generated_tokens for s in samples)
            decoded = sum(r.generated_tokens for r in self.decode)
            seconds = sum(r.wall_seconds for r in self.decode)
            m |= {"generated_tokens": tokens, "seconds": seconds,
                  "tokens_per_second": decoded / seconds if seconds > 0 else 0.0,
                  "tokens_per_forward": tokens / model_forwards if (model_forwards := sum(
                      n for k, n in sample_fw.items() if k != "replay")) else 0.0,
                  "skipped_fraction": skipped / (run + skipped) if run + skipped else 0.0,
                  "truncated_prompts": self.truncated_prompts}
            drifts = [d for r in self.decode for d in r.refresh_drifts] + self.kept_drifts
            m |= reuse_metrics(samples, drifts, sample_fw)
            m |= {f"forwards_{k}": v for k, v in sample_fw.items()}
            m |= {f"batch_forwards_{k}": v for k, v in batch_fw.items()}
        sc = self.scoring
        if sc.requests:
            m |= {"scored_tokens": sc.scored_tokens, "scoring_seconds": sc.seconds,
                  "truncated_continuations": sc.truncated_continuations, "loglikelihood_ties": sc.ties,
                  f"forwards_{SCORING_KIND}": sc.rows, f"batch_forwards_{SCORING_KIND}": sc.batch_forwards,
                  "positions_per_second": sc.positions / sc.seconds if sc.seconds > 0 else 0.0}
            if not samples:  # a pure scoring run: its throughput is scored tokens/s
                m |= {"seconds": sc.seconds, "generated_tokens": 0, "skipped_fraction": 0.0,
                      "tokens_per_second": self.scored_here() / sc.seconds if sc.seconds > 0 else 0.0,
                      "tokens_per_forward": sc.scored_tokens / sc.rows}
        if samples or sc.requests:
            m |= rate_metrics(self.timings()["batches"])
        return m

    def scored_here(self) -> int:
        """Scored tokens this process computed (its timed batches')."""
        return sum(tokens for tokens, _ in self.scoring.batches)

    def decoded_here(self) -> int:
        return sum(r.generated_tokens for r in self.decode)

    @classmethod
    def merged(cls, shards: list["HarnessStats"]) -> "HarnessStats":
        """The ranks' shards as one: their batches, counts and generations together."""
        scoring = ScoringStats(**{f.name: _total([getattr(s.scoring, f.name) for s in shards])
                                  for f in fields(ScoringStats)})
        return cls(decode=[r for s in shards for r in s.decode], scoring=scoring,
                   warmup_seconds=max(s.warmup_seconds for s in shards),
                   truncated_prompts=sum(s.truncated_prompts for s in shards),
                   generations=[g for s in shards for g in s.generations],
                   kept=[k for s in shards for k in s.kept], kept_drifts=[d for s in shards for d in s.kept_drifts])

    def trace(self) -> dict:
        """The reuse trace: per-layer counts of every batch, one sample's decisions, every sample's unmasking."""
        if not self.decode:
            return {"note": LOGLIKELIHOOD_NOTE}
        totals = None
        for r in self.decode:
            t = r.layer_counts.totals()
            totals = t if totals is None else [[a + c, b + d] for (a, b), (c, d) in zip(totals, t)]
        first = self.decode[0]
        # every decoded sample's unmasking schedule: what `reuse-exp trajectory` replays
        return {"unmasking": [s for r in self.decode for s in r.unmasking if s],
                "layer_totals_computed_reused": totals,
                "first_batch_per_block": {str(b): rows for b, rows in first.layer_counts.per_block.items()},
                "first_batch_summary": first.summary(),
                "first_batch_sample0_trace": first.trace}


def reuse_metrics(samples: list[SampleStats], drifts: list[float], sample_fw: Counter) -> dict[str, float]:
    """How reuse acted: reuse steps (a sample's step that stood in cached layers or replayed),
    those whose logits came out bit for bit those of the sample's last computed step (output
    mode: all of them, docs/engine.md), the fraction of denoising steps fully replayed, and for the
    adaptive policy the drift that made a group recompute."""
    steps = sum(s.reuse_steps for s in samples)
    unchanged = sum(s.unchanged_reuse_steps for s in samples)
    denoising = sum(sample_fw[k] for k in ("full_block", "small_block", "replay"))
    layer_reuse = steps - sample_fw["replay"]
    return {"reuse_steps": steps, "unchanged_reuse_steps": unchanged,
            "adaptive_refreshes": len(drifts), "mean_refresh_drift": sum(drifts) / len(drifts) if drifts else 0.0,
            "unchanged_reuse_fraction": unchanged / layer_reuse if layer_reuse else 0.0,
            "replayed_fraction": sample_fw["replay"] / denoising if denoising else 0.0}


# -- per-sample records ---------------------------------------------------------------------------
def output_hash(resps) -> str:
    """A short hash of what the model returned for one document (texts, or scores)."""
    return hashlib.sha256(json.dumps(resps, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sample_records(samples: dict[str, list[dict]], primary: str | None,
                   repeats: dict[str, int] | None = None) -> list[dict]:
    """One record per scored document, from lm-eval's logged samples: task, doc_id, the primary
    metric's value (`score`), `correct` (that value is 1; None when the metric is not 0/1) and
    `output` (a hash of the raw responses). `primary` is lm-eval's key, e.g.
    `exact_match,strict-match`: lm-eval logs one row per document and filter, this keeps the
    primary metric's filter. Generation is deterministic, so two runs' records pair exactly.
    `repeats`: per task, the responses each request has (lm-eval's `repeats`, 1 by default): on
    several ranks lm-eval pads a short shard by sending its last request again and appends the
    padding's response to that request's, which the hash must not see (1 and N ranks hash alike)."""
    metric, _, filt = (primary or "").partition(",")
    out, seen = [], set()
    for task, rows in sorted(samples.items()):
        for r in rows:
            if (filt and r.get("filter", "none") != filt) or (task, r.get("doc_id")) in seen:
                continue
            seen.add((task, r.get("doc_id")))
            value = r.get(metric)
            score = float(value) if isinstance(value, (int, float)) else None
            out.append({"task": task, "doc_id": r.get("doc_id"), "score": score,
                        "correct": None if score not in (0.0, 1.0) else score == 1.0,
                        "output": output_hash(_unpadded(r.get("resps"), (repeats or {}).get(task, 1)))})
    # in document order: several ranks hand lm-eval's samples back rank by rank
    return sorted(out, key=lambda r: (r["task"], r["doc_id"] if isinstance(r["doc_id"], int) else -1))


def _unpadded(resps, repeats: int):
    """Each request's own `repeats` responses, without those a rank's padding appended."""
    if not isinstance(resps, list):
        return resps
    return [r[:repeats] if isinstance(r, list) else r for r in resps]


def repeats_of(results: dict) -> dict[str, int]:
    """Per task, lm-eval's `repeats` (responses per request) from its results' configs."""
    return {task: int(c.get("repeats") or 1) for task, c in (results.get("configs") or {}).items()}


def _total(values: list):
    """Counts add up; per-batch lists join."""
    return [x for v in values for x in v] if isinstance(values[0], list) else sum(values)


def world_metrics(shards: list[HarnessStats]) -> dict[str, float]:
    """The metrics of N ranks' shards as one run, with each rank's throughput beside them.

    The ranks decode at the same time, so the run's timed part lasts as long as its slowest
    rank: tokens/s = all ranks' tokens / the slowest rank's seconds (likewise for scoring).
    """
    if len(shards) == 1:
        return shards[0].metrics()
    merged = HarnessStats.merged(shards)
    m = merged.metrics()
    each = [s.metrics() for s in shards]
    if "seconds" in m:
        slowest = max(e.get("seconds", 0.0) for e in each)
        tokens = merged.decoded_here() if merged.samples() else merged.scored_here()
        m |= {"seconds": slowest, "tokens_per_second": tokens / slowest if slowest > 0 else 0.0}
    if merged.scoring.requests:
        slowest = max(s.scoring.seconds for s in shards)
        m |= {"scoring_seconds": slowest,
              "positions_per_second": merged.scoring.positions / slowest if slowest > 0 else 0.0}
    if merged.decode or merged.scoring.requests:   # all ranks': each batch's rate with every rank decoding
        m |= rate_metrics(merged.timings()["batches"], ranks=len(shards))
    for rank, e in enumerate(each):
        m |= {f"rank{rank}/{k}": e[k] for k in ("generated_tokens", "scored_tokens", "seconds", "tokens_per_second",
                                                 "tokens_per_second_median", "tokens_per_second_p25",
                                                 "tokens_per_second_p75") if k in e}
    return m

"""What the lm-eval model measured: decoding reports, scoring counts, warm-up, generations."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields

from ..engine.instrument import DecodeReport

SCORING_KIND = "masked"  # the forward kind of loglikelihood scoring (FastDLLM.forward_masked)
LOGLIKELIHOOD_NOTE = ("reuse cannot act on loglikelihood: each request is scored by one forward, "
                      "so every k and subset give the same result")


@dataclass
class ScoringStats:
    """Loglikelihood scoring: one masked forward per request."""
    requests: int = 0
    scored_tokens: int = 0            # the masked first target token of each request
    truncated_continuations: int = 0  # continuations of >1 token, scored on their first token
    positions: int = 0                # tokens run through the model, padding included
    batch_forwards: int = 0
    seconds: float = 0.0


@dataclass
class HarnessStats:
    decode: list[DecodeReport] = field(default_factory=list)
    scoring: ScoringStats = field(default_factory=ScoringStats)
    warmup_seconds: float = 0.0
    truncated_prompts: int = 0
    generations: list[dict] = field(default_factory=list)  # one record per generate_until request

    @property
    def requests(self) -> int:
        """Requests this process computed (decoded or scored), not those a cache answered."""
        return len(self.generations) + self.scoring.requests

    @property
    def task_kind(self) -> str:
        kinds = [k for k, ran in (("generate_until", bool(self.decode)),
                                  ("loglikelihood", self.scoring.requests > 0)) if ran]
        return "+".join(kinds) or "none"

    def metrics(self) -> dict[str, float]:
        """Throughput and reuse metrics (names: the schema in tracking.py)."""
        m: dict[str, float] = {"warmup_seconds": self.warmup_seconds}
        if self.decode:
            sample_fw, batch_fw = Counter(), Counter()
            for r in self.decode:
                for s in r.samples:
                    sample_fw.update(s.forwards)
                batch_fw.update(r.batch_forwards)
            run = sum(s.layer_evals_run for r in self.decode for s in r.samples)
            skipped = sum(s.layer_evals_skipped for r in self.decode for s in r.samples)
            tokens = sum(r.generated_tokens for r in self.decode)
            seconds = sum(r.wall_seconds for r in self.decode)
            m |= {"generated_tokens": tokens, "seconds": seconds,
                  "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
                  "tokens_per_forward": tokens / model_forwards if (model_forwards := sum(
                      n for k, n in sample_fw.items() if k != "replay")) else 0.0,
                  "skipped_fraction": skipped / (run + skipped) if run + skipped else 0.0,
                  "truncated_prompts": self.truncated_prompts}
            m |= reuse_metrics(self.decode, sample_fw)
            m |= {f"forwards_{k}": v for k, v in sample_fw.items()}
            m |= {f"batch_forwards_{k}": v for k, v in batch_fw.items()}
        sc = self.scoring
        if sc.requests:
            m |= {"scored_tokens": sc.scored_tokens, "scoring_seconds": sc.seconds,
                  "truncated_continuations": sc.truncated_continuations,
                  f"forwards_{SCORING_KIND}": sc.requests, f"batch_forwards_{SCORING_KIND}": sc.batch_forwards,
                  "positions_per_second": sc.positions / sc.seconds if sc.seconds > 0 else 0.0}
            if not self.decode:  # a pure scoring run: its throughput is scored tokens/s
                m |= {"seconds": sc.seconds, "generated_tokens": 0, "skipped_fraction": 0.0,
                      "tokens_per_second": sc.scored_tokens / sc.seconds if sc.seconds > 0 else 0.0,
                      "tokens_per_forward": sc.scored_tokens / sc.requests}
        return m

    @classmethod
    def merged(cls, shards: list["HarnessStats"]) -> "HarnessStats":
        """The ranks' shards as one: their batches, counts and generations together."""
        scoring = ScoringStats(**{f.name: sum(getattr(s.scoring, f.name) for s in shards)
                                  for f in fields(ScoringStats)})
        return cls(decode=[r for s in shards for r in s.decode], scoring=scoring,
                   warmup_seconds=max(s.warmup_seconds for s in shards),
                   truncated_prompts=sum(s.truncated_prompts for s in shards),
                   generations=[g for s in shards for g in s.generations])

    def trace(self) -> dict:
        """The reuse trace: per-layer counts of every batch, one sample's decisions."""
        if not self.decode:
            return {"note": LOGLIKELIHOOD_NOTE}
        totals = None
        for r in self.decode:
            t = r.layer_counts.totals()
            totals = t if totals is None else [[a + c, b + d] for (a, b), (c, d) in zip(totals, t)]
        first = self.decode[0]
        return {"layer_totals_computed_reused": totals,
                "first_batch_per_block": {str(b): rows for b, rows in first.layer_counts.per_block.items()},
                "first_batch_summary": first.summary(),
                "first_batch_sample0_trace": first.trace}


def reuse_metrics(reports: list[DecodeReport], sample_fw: Counter) -> dict[str, float]:
    """How reuse acted: reuse steps (a sample's step that stood in cached layers or replayed),
    those whose logits came out bit for bit those of the sample's last computed step (output
    mode: all of them, docs/engine.md), the fraction of denoising steps fully replayed, and for the
    adaptive policy the drift that made a group recompute."""
    steps = sum(s.reuse_steps for r in reports for s in r.samples)
    unchanged = sum(s.unchanged_reuse_steps for r in reports for s in r.samples)
    denoising = sum(sample_fw[k] for k in ("full_block", "small_block", "replay"))
    layer_reuse = steps - sample_fw["replay"]
    drifts = [d for r in reports for d in r.refresh_drifts]
    return {"reuse_steps": steps, "unchanged_reuse_steps": unchanged,
            "adaptive_refreshes": len(drifts), "mean_refresh_drift": sum(drifts) / len(drifts) if drifts else 0.0,
            "unchanged_reuse_fraction": unchanged / layer_reuse if layer_reuse else 0.0,
            "replayed_fraction": sample_fw["replay"] / denoising if denoising else 0.0}


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
        tokens = m["generated_tokens"] if merged.decode else merged.scoring.scored_tokens
        m |= {"seconds": slowest, "tokens_per_second": tokens / slowest if slowest > 0 else 0.0}
    if merged.scoring.requests:
        slowest = max(s.scoring.seconds for s in shards)
        m |= {"scoring_seconds": slowest,
              "positions_per_second": merged.scoring.positions / slowest if slowest > 0 else 0.0}
    for rank, e in enumerate(each):
        m |= {f"rank{rank}/{k}": e[k] for k in ("generated_tokens", "scored_tokens", "seconds", "tokens_per_second")
              if k in e}
    return m

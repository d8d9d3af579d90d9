"""What the lm-eval model measured: decoding reports, scoring counts, warm-up, generations."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

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
    requests_total: int = 0   # requests lm-eval handed over so far (progress: done of total)
    phase: str = ""           # what the model is doing now: decoding or scoring

    @property
    def requests_done(self) -> int:
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
                  "tokens_per_forward": tokens / sum(sample_fw.values()) if sample_fw else 0.0,
                  "skipped_fraction": skipped / (run + skipped) if run + skipped else 0.0,
                  "truncated_prompts": self.truncated_prompts}
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

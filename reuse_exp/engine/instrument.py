"""What a decoding call measured: per-sample statistics, per-layer counts, a trace."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class SampleStats:
    generated_tokens: int = 0          # up to and including the stop token; never pad
    forwards: Counter = field(default_factory=Counter)  # ForwardKind value -> count
    layer_evals_run: int = 0
    layer_evals_skipped: int = 0
    finished: bool = False             # produced the stop token
    reuse_steps: int = 0               # steps that stood in cached layers or replayed
    unchanged_reuse_steps: int = 0     # layer-reuse steps whose logits equal the last computed ones

    def as_dict(self) -> dict:
        return {"generated_tokens": self.generated_tokens, "forwards": dict(self.forwards),
                "layer_evals_run": self.layer_evals_run, "layer_evals_skipped": self.layer_evals_skipped,
                "finished": self.finished, "reuse_steps": self.reuse_steps,
                "unchanged_reuse_steps": self.unchanged_reuse_steps}


@dataclass
class LayerCounts:
    """Per block, per layer: evaluations computed and reused (batch forwards, not samples)."""
    num_layers: int
    per_block: dict[int, list[list[int]]] = field(default_factory=dict)  # block -> [layer] -> [computed, reused]

    def add(self, block: int, skipped: tuple[int, ...] | frozenset[int]) -> None:
        rows = self.per_block.setdefault(block, [[0, 0] for _ in range(self.num_layers)])
        for layer in range(self.num_layers):
            rows[layer][1 if layer in skipped else 0] += 1

    def totals(self) -> list[list[int]]:
        out = [[0, 0] for _ in range(self.num_layers)]
        for rows in self.per_block.values():
            for layer, (c, r) in enumerate(rows):
                out[layer][0] += c
                out[layer][1] += r
        return out


@dataclass
class DecodeReport:
    """Everything one `generate` call returns besides the tokens."""
    samples: list[SampleStats]
    wall_seconds: float
    layer_counts: LayerCounts
    batch_forwards: Counter = field(default_factory=Counter)     # kind -> batched forwards run
    replace_positions: Counter = field(default_factory=Counter)  # replace_position -> small-block forwards
    cache_shapes: set = field(default_factory=set)              # ReuseCache shapes seen
    trace: list[dict] = field(default_factory=list)             # one sample's decisions, forward by forward
    shadow: list[dict] = field(default_factory=list)            # rel_err records (shadow mode only)
    path: str = "eager"                                         # which forward implementation ran
    host_wait_seconds: float = 0.0                              # the host blocked on its reads of the device
    refresh_drifts: list = field(default_factory=list)          # adaptive: drift that made a group recompute
    # per sample, per small block in the order generated, the tokens each denoising step unmasked
    unmasking: list[list[list[int]]] = field(default_factory=list)

    @property
    def generated_tokens(self) -> int:
        return sum(s.generated_tokens for s in self.samples)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens unmasked per denoising step (a replayed step counts), over every sample."""
        steps = [n for sample in self.unmasking for block in sample for n in block]
        return sum(steps) / len(steps) if steps else 0.0

    @property
    def skipped_fraction(self) -> float:
        run = sum(s.layer_evals_run for s in self.samples)
        skipped = sum(s.layer_evals_skipped for s in self.samples)
        return skipped / (run + skipped) if run + skipped else 0.0

    def summary(self) -> dict:
        forwards = Counter()
        for s in self.samples:
            forwards.update(s.forwards)
        return {
            "path": self.path,
            "generated_tokens": self.generated_tokens,
            "wall_seconds": self.wall_seconds,
            "tokens_per_second": self.tokens_per_second,
            "sample_forwards": dict(forwards),
            "batch_forwards": dict(self.batch_forwards),
            "skipped_fraction": self.skipped_fraction,
            "layer_evals_run": sum(s.layer_evals_run for s in self.samples),
            "layer_evals_skipped": sum(s.layer_evals_skipped for s in self.samples),
            "reuse_steps": sum(s.reuse_steps for s in self.samples),
            "unchanged_reuse_steps": sum(s.unchanged_reuse_steps for s in self.samples),
            "replace_positions": dict(self.replace_positions),
            "cache_shapes": sorted(self.cache_shapes),
        }


@dataclass
class _Forward:
    """One batched forward as the host saw it; its reuse decisions are on the device until `resolve`."""
    kind: str
    block: int
    tokens: int
    replace_position: int | None
    sample_ids: list[int]
    active: list[bool]
    steps: list[int]
    groups: tuple[tuple[int, ...], ...] = ()
    log: object = None                 # [2, groups, batch] float32 on the device (reuse.Plan.log), cloned
    replayed: bool = False             # a replayed step: its rows skipped every layer
    cache_shape: tuple[int, ...] | None = None


class DecodeRecorder:
    """Accounts for every forward of one decoding call: per sample, per block and layer, and
    the trace of one sample's decisions. The decisions stay on the device while decoding runs
    (a copy of each forward's log, no host read); `resolve` reads them all at once."""

    def __init__(self, n_samples: int, num_layers: int, trace_sample: int | None):
        self.num_layers, self.trace_sample = num_layers, trace_sample
        self.report = DecodeReport(samples=[SampleStats() for _ in range(n_samples)], wall_seconds=0.0,
                                   layer_counts=LayerCounts(num_layers))
        self.forwards: list[_Forward] = []

    def record(self, forward: _Forward) -> None:
        if forward.log is not None:
            forward.log = forward.log.clone()
        self.forwards.append(forward)

    def resolve(self) -> None:
        """Read every forward's decisions from the device (one transfer) and account for them."""
        import torch
        logs = [f.log for f in self.forwards if f.log is not None]
        flat = torch.cat([log.flatten() for log in logs]).cpu() if logs else None
        at = 0
        for f in self.forwards:
            reused = drift = None
            if f.log is not None:
                n = f.log.numel()
                reused, drift = flat[at:at + n].view(f.log.shape)
                at += n
            self._account(f, reused, drift)
        self.forwards = []

    def _account(self, f: _Forward, reused, drift) -> None:
        every = tuple(range(self.num_layers))
        rows = range(len(f.active))
        if f.replayed:
            skipped = [every if f.active[b] else () for b in rows]
            batch_skipped = every if all(f.active) else ()
        elif reused is None:
            skipped, batch_skipped = [() for _ in rows], ()
        else:
            reuse = [[bool(reused[g, b] > 0.5) and f.active[b] for b in rows] for g in range(len(f.groups))]
            skipped = [tuple(sorted(i for g, grp in enumerate(f.groups) if reuse[g][b] for i in grp)) for b in rows]
            batch_skipped = tuple(sorted(i for g, grp in enumerate(f.groups)
                                         if any(reuse[g]) and not any(a and not r for a, r in zip(f.active, reuse[g]))
                                         for i in grp))
            for g in range(len(f.groups)):   # the drifts that made a group recompute
                self.report.refresh_drifts.extend(float(drift[g, b]) for b in rows
                                                  if f.active[b] and not reuse[g][b] and drift[g, b] == drift[g, b])
        kind = "replay" if f.replayed else f.kind
        denoising = kind in ("full_block", "small_block", "replay")
        for b, sample in enumerate(f.sample_ids):
            if not f.active[b]:
                continue
            s = self.report.samples[sample]
            s.forwards[kind] += 1
            s.reuse_steps += bool(skipped[b])
            s.layer_evals_skipped += len(skipped[b])
            s.layer_evals_run += self.num_layers - len(skipped[b])
            if sample == self.trace_sample:
                self.report.trace.append({
                    "block": f.block, "step": f.steps[b] if denoising else None, "kind": kind,
                    "replace_position": f.replace_position, "tokens": f.tokens,
                    "skipped": list(skipped[b]),
                    "reuse_cache_shape": list(f.cache_shape) if f.cache_shape is not None else None})
        self.report.batch_forwards[kind] += 1
        self.report.layer_counts.add(f.block, batch_skipped)
        if f.replace_position is not None:
            self.report.replace_positions[f.replace_position] += 1
        if f.cache_shape is not None:
            self.report.cache_shapes.add(f.cache_shape)

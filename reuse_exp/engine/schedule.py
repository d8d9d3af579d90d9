"""Where each batch row stands in its block, and the reuse plan every forward follows.

Counters and decisions are per row: a sample's steps do not depend on its neighbours, so it
decodes the same tokens in any batch as alone. The fixed policy decides from the step
counter (reuse.py), the adaptive one from measured drift (adaptive.py).
"""
from __future__ import annotations

import torch

from .adaptive import AdaptivePolicy, AdaptiveReuse, DriftState, ReplayDrift
from .model import FastDLLM, ForwardKind
from .reuse import LayerReuse, ReuseCache, ReusePolicy, RowMask, ShadowLog

DENOISING = (ForwardKind.FULL_BLOCK, ForwardKind.SMALL_BLOCK)


class ReuseSchedule:
    def __init__(self, policy: ReusePolicy | AdaptivePolicy | None, cache: ReuseCache | None, model: FastDLLM,
                 batch: int, block_size: int, shadow: bool = False, buffer=None):
        self.policy, self.cache, self.device = policy, cache, model.device
        self.shadow = ShadowLog() if shadow and cache is not None else None
        self.drift = self.replay_drift = None
        if isinstance(policy, AdaptivePolicy):
            args = (batch, block_size, model.config.hidden_size, model.dtype, model.device)
            if policy.mode == "replay":
                self.replay_drift = ReplayDrift(policy, model.model.embed_tokens, *args)
            else:  # the drift reference lives in a buffer of the runner's (graphs point into it)
                shape = (len(policy.groups), batch, block_size, model.config.hidden_size)
                ref = buffer(("drift", shape), shape, model.dtype) if buffer is not None else None
                self.drift = DriftState(policy, *args, ref=ref)
        self.block = 0
        self.step: list[int] = []           # per row: its denoising forwards so far in this block
        self.since_refresh: list[int] = []  # per row: its denoising forwards since its last full-block forward

    @property
    def layers(self) -> tuple[int, ...]:
        return self.policy.layers if self.policy is not None else ()

    @property
    def refresh_drifts(self) -> list[float]:
        state = self.drift or self.replay_drift
        return state.refresh_drifts if state is not None else []

    def new_block(self, block: int, n_rows: int) -> None:
        self.block, self.step, self.since_refresh = block, [0] * n_rows, [0] * n_rows
        for part in (self.cache, self.drift, self.replay_drift):
            if part is not None:
                part.new_block()

    def _counters(self) -> list[int]:
        return self.step if self.policy.scope == "block" else self.since_refresh

    def replaying(self, active: list[bool], window: torch.Tensor, offset: int) -> list[bool]:
        """Rows whose small-block step skips the whole forward (mode replay); `window` is the
        small block's tokens."""
        if self.policy is None or self.policy.mode != "replay" or not any(active):
            return [False] * len(active)
        if self.replay_drift is not None:
            return self.replay_drift.replaying(window, offset, active)
        return [a and bool(self.policy.skipped(ForwardKind.SMALL_BLOCK, c)) for a, c in zip(active, self._counters())]

    def plan(self, kind: ForwardKind, active: list[bool], tokens: torch.Tensor, replace_position: int):
        """The plan of one forward (LayerReuse or AdaptiveReuse); None when nothing can reuse.
        Prefill and finalize neither reuse nor refresh: their results are for other positions."""
        offset = replace_position if kind is ForwardKind.SMALL_BLOCK else 0
        if self.replay_drift is not None and kind in DENOISING:
            self.replay_drift.computed(kind, tokens, offset, active)
        if self.cache is None or kind not in DENOISING:
            return None
        if self.drift is not None:
            return AdaptiveReuse(self.drift, self.cache, list(active), offset,
                                 decide=kind is ForwardKind.SMALL_BLOCK, device=self.device)
        counters = [0] * len(active) if kind is ForwardKind.FULL_BLOCK else self._counters()
        reusing = [a and bool(self.policy.skipped(kind, c)) for a, c in zip(active, counters)]
        computing = [a and not r for a, r in zip(active, reusing)]
        if self.shadow is not None:
            self.shadow.where = {"block": self.block, "step": max(self.step), "replace_position": offset}
        return LayerReuse(frozenset(self.policy.layers), RowMask.of(reusing, self.device),
                          RowMask.of(computing, self.device), self.cache, offset, self.shadow)

    def advance(self, kind: ForwardKind, active: list[bool]) -> None:
        if kind is ForwardKind.FULL_BLOCK:
            self.since_refresh = [0 if a else c for a, c in zip(active, self.since_refresh)]
        if kind in DENOISING:
            self.step = [c + a for c, a in zip(self.step, active)]
            self.since_refresh = [c + a for c, a in zip(self.since_refresh, active)]

    def trim(self, keep: torch.Tensor) -> None:
        for part in (self.cache, self.drift, self.replay_drift):
            if part is not None:
                part.trim(keep)

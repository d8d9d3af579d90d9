"""Where each batch row stands in its block, and the reuse plan every forward follows.

Counters and decisions are per row: a sample's steps do not depend on its neighbours, so it
decodes the same tokens in any batch as alone. What decides is the policy's memory
(policies/); what it is told, and what stands in, is the same for every policy.
"""
from __future__ import annotations

import torch

from .model import FastDLLM, ForwardKind
from .reuse import Clock, Plan, ReuseCache, ShadowLog, relative_drift

DENOISING = (ForwardKind.FULL_BLOCK, ForwardKind.SMALL_BLOCK)


class EmbeddingRef:
    """Replay measures drift on the window's token embeddings, against those of the row's
    last computed step."""

    def __init__(self, embed, batch: int, block_size: int, hidden: int, dtype, device):
        self.embed = embed
        self.ref = torch.zeros(batch, block_size, hidden, dtype=dtype, device=device)

    def drift(self, tokens: torch.Tensor, offset: int) -> list[float]:
        return relative_drift(self.embed(tokens), self.ref[:, offset:offset + tokens.shape[1]]).tolist()

    def computed(self, tokens: torch.Tensor, offset: int, rows: list[bool]) -> None:
        """A forward ran for `rows`: their reference becomes its input."""
        window = self.ref[:, offset:offset + tokens.shape[1]]
        mask = torch.tensor(rows, device=window.device)[:, None, None]
        window.copy_(torch.where(mask, self.embed(tokens).to(window.dtype), window))

    def trim(self, keep: torch.Tensor) -> None:
        self.ref = self.ref[keep]


class ReuseSchedule:
    def __init__(self, policy, cache: ReuseCache | None, model: FastDLLM, batch: int, block_size: int,
                 shadow: bool = False, buffer=None):
        self.policy, self.cache, self.device = policy, cache, model.device
        self.memory = policy.memory(batch) if policy is not None and policy.reuses else None
        self.shadow = ShadowLog() if shadow and cache is not None else None
        self.ref = self.replay_ref = None   # what measured drift is measured against
        if self.memory is not None and policy.measures:
            hidden = model.config.hidden_size
            if policy.mode == "replay":
                self.replay_ref = EmbeddingRef(model.model.embed_tokens, batch, block_size, hidden, model.dtype,
                                               model.device)
            else:  # each group's input when it last computed, in a buffer of the runner's (graphs point into it)
                shape = (len(policy.groups), batch, block_size, hidden)
                self.ref = (buffer(("drift", shape), shape, model.dtype) if buffer is not None else
                            torch.zeros(shape, dtype=model.dtype, device=model.device)).zero_()
        self.block = 0
        self.step: list[int] = []           # per row: its denoising forwards so far in this block
        self.since_refresh: list[int] = []  # per row: its denoising forwards since its last full-block forward

    @property
    def layers(self) -> tuple[int, ...]:
        return self.policy.layers if self.policy is not None else ()

    @property
    def refresh_drifts(self) -> list[float]:
        return self.memory.refresh_drifts if self.memory is not None else []

    @property
    def clock(self) -> Clock:
        return Clock(list(self.step), list(self.since_refresh))

    def new_block(self, block: int, n_rows: int) -> None:
        self.block, self.step, self.since_refresh = block, [0] * n_rows, [0] * n_rows
        for part in (self.cache, self.memory):
            if part is not None:
                part.new_block()

    def replaying(self, active: list[bool], window: torch.Tensor, offset: int) -> list[bool]:
        """Rows whose small-block step skips the whole forward (mode replay); `window` is the
        small block's tokens."""
        if self.memory is None or self.policy.mode != "replay" or not any(active):
            return [False] * len(active)
        drift = self.replay_ref.drift(window, offset) if self.replay_ref is not None else None
        reuse = self.memory.decide(ForwardKind.SMALL_BLOCK, 0, list(active), self.clock, drift)
        return [bool(r) and a for r, a in zip(reuse, active)]

    def plan(self, kind: ForwardKind, active: list[bool], tokens: torch.Tensor, replace_position: int) -> Plan | None:
        """The plan of one forward; None when nothing can reuse. Prefill and finalize neither
        reuse nor refresh: their results are for other positions."""
        if self.memory is None or kind not in DENOISING:
            return None
        offset = replace_position if kind is ForwardKind.SMALL_BLOCK else 0
        if self.policy.mode == "replay":   # replay decides before the forward (`replaying`)
            if self.replay_ref is not None:
                self.replay_ref.computed(tokens, offset, active)
            if kind is ForwardKind.FULL_BLOCK:   # the memory hears of every denoising forward
                self.memory.decide(kind, 0, list(active), self.clock, None)
            return None
        if self.shadow is not None:
            self.shadow.where = {"block": self.block, "step": max(self.step), "replace_position": offset}
        return Plan(self.policy.groups, self.memory, kind, self.clock, list(active), self.cache, offset, self.device,
                    ref=self.ref, measure=self.ref is not None and kind is ForwardKind.SMALL_BLOCK,
                    shadow=self.shadow)

    def advance(self, kind: ForwardKind, active: list[bool]) -> None:
        if kind is ForwardKind.FULL_BLOCK:
            self.since_refresh = [0 if a else c for a, c in zip(active, self.since_refresh)]
        if kind in DENOISING:
            self.step = [c + a for c, a in zip(self.step, active)]
            self.since_refresh = [c + a for c, a in zip(self.since_refresh, active)]

    def trim(self, keep: torch.Tensor) -> None:
        for part in (self.cache, self.replay_ref):
            if part is not None:
                part.trim(keep)
        if self.memory is not None:
            self.memory.trim(keep.tolist())
        if self.ref is not None:
            self.ref = self.ref[:, keep]

"""Where each batch row stands in its block, and the reuse plan every forward follows.

Counters and decisions are per row: a sample's steps do not depend on its neighbours, so it
decodes the same tokens in any batch as alone. What decides is the policy's memory
(policies/); what it is told, and what stands in, is the same for every policy. The counters
live on the device (the policy reads them there) and, for the trace, on the host.
"""
from __future__ import annotations

import torch

from .model import FastDLLM, ForwardKind
from .policies import RowState
from .reuse import Clock, Plan, ReuseCache, ShadowLog, relative_drift

DENOISING = (ForwardKind.FULL_BLOCK, ForwardKind.SMALL_BLOCK)


class EmbeddingRef:
    """Replay measures drift on the window's token embeddings, against those of the row's
    last computed step."""

    def __init__(self, embed, batch: int, block_size: int, hidden: int, dtype, device):
        self.embed = embed
        self.ref = torch.zeros(batch, block_size, hidden, dtype=dtype, device=device)

    def drift(self, tokens: torch.Tensor, offset: int) -> torch.Tensor:
        return relative_drift(self.embed(tokens), self.ref[:, offset:offset + tokens.shape[1]])

    def computed(self, tokens: torch.Tensor, offset: int, rows: torch.Tensor) -> None:
        """A forward ran for `rows` (bool [batch], device): their reference becomes its input."""
        window = self.ref[:, offset:offset + tokens.shape[1]]
        window.copy_(torch.where(rows[:, None, None], self.embed(tokens).to(window.dtype), window))

    def trim(self, keep: torch.Tensor) -> None:
        self.ref = self.ref[keep]


class ReuseSchedule:
    def __init__(self, policy, cache: ReuseCache | None, model: FastDLLM, batch: int, block_size: int,
                 shadow: bool = False, buffer=None):
        self.policy, self.cache, self.device = policy, cache, model.device
        # the runner's buffers: graphs captured in one decoding call point into them in the next
        self.buffer = buffer or (lambda key, shape, dtype: torch.zeros(shape, dtype=dtype, device=model.device))
        self.state = RowState(batch, model.device, self.buffer)
        self.memory = policy.memory(self.state) if policy is not None and policy.reuses else None
        self.shadow = ShadowLog() if shadow and cache is not None else None
        self.ref = self.replay_ref = None   # what measured drift is measured against
        if self.memory is not None and policy.measures:
            hidden = model.config.hidden_size
            if policy.mode == "replay":
                self.replay_ref = EmbeddingRef(model.model.embed_tokens, batch, block_size, hidden, model.dtype,
                                               model.device)
            else:  # each group's input when it last computed
                shape = (len(policy.groups), batch, block_size, hidden)
                self.ref = self.buffer(("drift", shape), shape, model.dtype).zero_()
        self._clock(batch)
        self.block = 0
        self.step: list[int] = [0] * batch   # per row: its denoising forwards so far in this block (host copy)

    def _clock(self, batch: int, keep: torch.Tensor | None = None) -> None:
        old = getattr(self, "clock", None)
        step = self.buffer(("clock-step", batch), (batch,), torch.long)
        since = self.buffer(("clock-since", batch), (batch,), torch.long)
        if old is not None and keep is not None:
            step.copy_(old.step[keep])
            since.copy_(old.since_refresh[keep])
        else:
            step.zero_()
            since.zero_()
        self.clock = Clock(step, since)

    @property
    def layers(self) -> tuple[int, ...]:
        return self.policy.layers if self.policy is not None else ()

    def new_block(self, block: int, n_rows: int) -> None:
        self.block, self.step = block, [0] * n_rows
        self.clock.step.zero_()
        self.clock.since_refresh.zero_()
        if self.memory is not None:
            self.memory.new_block()

    def replaying(self, small: torch.Tensor, window: torch.Tensor, offset: int) -> torch.Tensor | None:
        """Rows (bool [batch], device) whose small-block step skips the whole forward (mode replay);
        `small` is the rows due a small-block forward, `window` the small block's tokens. None: no
        replay policy."""
        if self.memory is None or self.policy.mode != "replay":
            return None
        drift = self.replay_ref.drift(window, offset) if self.replay_ref is not None else None
        return self.memory.decide(ForwardKind.SMALL_BLOCK, 0, small, self.clock, drift) & small

    def plan(self, kind: ForwardKind, active: torch.Tensor, tokens: torch.Tensor, replace_position: int) -> Plan | None:
        """The plan of one forward for the rows `active` (bool [batch], device); None when nothing can
        reuse. Prefill and finalize neither reuse nor refresh: their results are for other positions."""
        if self.memory is None or kind not in DENOISING:
            return None
        offset = replace_position if kind is ForwardKind.SMALL_BLOCK else 0
        if self.policy.mode == "replay":   # replay decides before the forward (`replaying`)
            if self.replay_ref is not None:
                self.replay_ref.computed(tokens, offset, active)
            if kind is ForwardKind.FULL_BLOCK:   # the memory hears of every denoising forward
                self.memory.decide(kind, 0, active, self.clock, None)
            return None
        if self.shadow is not None:
            self.shadow.where = {"block": self.block, "step": max(self.step), "replace_position": offset}
        log = self.buffer(("log", len(self.policy.groups), len(self.step)), (2, len(self.policy.groups), len(self.step)),
                          torch.float32)
        return Plan(self.policy.groups, self.memory, kind, self.clock, active, self.cache, offset, log,
                    ref=self.ref, measure=self.ref is not None and kind is ForwardKind.SMALL_BLOCK, shadow=self.shadow)

    def advance(self, kind: ForwardKind, active: list[bool], active_rows: torch.Tensor) -> None:
        """A forward (or replayed step) of `kind` ran for `active` (host) = `active_rows` (device)."""
        if kind not in DENOISING:
            return
        self.step = [c + a for c, a in zip(self.step, active)]
        step = active_rows.long()
        self.clock.step.add_(step)
        if kind is ForwardKind.FULL_BLOCK:
            self.clock.since_refresh.copy_(torch.where(active_rows, 0, self.clock.since_refresh))
        self.clock.since_refresh.add_(step)

    def trim(self, keep: torch.Tensor) -> None:
        for part in (self.cache, self.replay_ref):
            if part is not None:
                part.trim(keep)
        self.state.trim(keep)
        self._clock(int(keep.sum()), keep)
        if self.ref is not None:
            shape = (self.ref.shape[0], int(keep.sum()), *self.ref.shape[2:])
            self.ref = self.buffer(("drift", shape), shape, self.ref.dtype).copy_(self.ref[:, keep])
        self.step = [s for s, k in zip(self.step, keep.tolist()) if k]

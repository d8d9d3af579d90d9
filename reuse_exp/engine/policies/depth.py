"""Depth-aware drift (`policy=depth`): per sample, recompute from the first layer group whose
input has drifted and every group after it; reuse the groups before it.

The groups, the drift (relative change of a group's input since it last computed) and
`max_reuse` are the adaptive policy's (drift.py); so is delta mode. What differs is
depth: a drift found at one group refreshes everything above it, as Elastic-Cache's
layer-aware refresh does, instead of each group deciding alone. A drift of 0 never reuses
(k=1, bit for bit); full-block forwards compute every group and renew every reference.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from ..model import ForwardKind
from . import RowState, register
from .drift import DriftMemory, DriftPolicy


@register
class DepthPolicy(DriftPolicy):
    name: ClassVar[str] = "depth"
    modes: ClassVar[tuple[str, ...]] = ("delta",)

    def memory(self, state: RowState) -> "DepthMemory":
        return DepthMemory(self, state)

    def note(self) -> str:
        return (f"depth (delta mode): groups {[list(g) for g in self.groups]} reuse up to the first whose input "
                f"drifts {self.drift} or more (or reused {self.max_reuse} times in a row); it and all after recompute")


class DepthMemory(DriftMemory):
    """The adaptive memory, plus per row whether a group below has recomputed in this forward."""

    def __init__(self, policy: DepthPolicy, state: RowState):
        super().__init__(policy, state)
        state.zeros("refreshing", dtype=torch.bool)

    def decide(self, kind: ForwardKind, group: int, active, clock, drift) -> torch.Tensor:
        refreshing = self.state["refreshing"]
        if group == 0:   # groups are decided in layer order: a new forward starts
            refreshing.zero_()
        below = refreshing.clone()
        # a row refreshing from a lower group computes this one too, and its drift made nothing recompute
        out = super().decide(kind, group, active & ~below, clock, drift)
        in_a_row = self.state["in_a_row"][:, group]
        in_a_row.copy_(torch.where(active & below, 0, in_a_row))
        refreshing.copy_(below | (active & ~out))
        return out

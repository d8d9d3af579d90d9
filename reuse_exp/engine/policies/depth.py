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

from ..model import ForwardKind
from . import register
from .drift import DriftMemory, DriftPolicy


@register
class DepthPolicy(DriftPolicy):
    name: ClassVar[str] = "depth"
    modes: ClassVar[tuple[str, ...]] = ("delta",)

    def memory(self, batch: int) -> "DepthMemory":
        return DepthMemory(self, batch)

    def note(self) -> str:
        return (f"depth (delta mode): groups {[list(g) for g in self.groups]} reuse up to the first whose input "
                f"drifts {self.drift} or more (or reused {self.max_reuse} times in a row); it and all after recompute")


class DepthMemory(DriftMemory):
    """The adaptive memory, plus per row whether a group below has recomputed in this forward."""

    def __init__(self, policy: DepthPolicy, batch: int):
        super().__init__(policy, batch)
        self.refreshing = [False] * batch

    def decide(self, kind: ForwardKind, group: int, active: list[bool], clock, drift) -> list[bool]:
        if group == 0:   # groups are decided in layer order: a new forward starts
            self.refreshing = [False] * len(active)
        below = self.refreshing
        # a row refreshing from a lower group computes this one too, and its drift made nothing recompute
        out = super().decide(kind, group, [a and not r for a, r in zip(active, below)], clock, drift)
        self.in_a_row[group] = [0 if a and r else n for n, a, r in zip(self.in_a_row[group], active, below)]
        self.refreshing = [r or (a and not o) for r, a, o in zip(below, active, out)]
        return out

    def trim(self, keep: list[bool]) -> None:
        super().trim(keep)
        self.refreshing = [r for r, k in zip(self.refreshing, keep) if k]

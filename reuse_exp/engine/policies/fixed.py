"""The study's policy: skip a subset of layers on small-block forwards, except every k-th step.

mode   output: a skipped layer's cached output stands in (the study's semantics)
       delta:  a skipped layer adds its cached residual contribution (output - input)
       replay: the whole forward is skipped and the step unmasks from the logits of the
               row's last computed forward: what output mode amounts to (docs/engine.md),
               as a control; its layers are all of them, whatever the subset
scope  block:   the counter is the block's step counter (the study's description)
       refresh: the counter restarts at every full-block forward
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ConfigError
from ..model import ForwardKind
from ..reuse import MODES, SCOPES, Clock, resolve_subset
from . import Memory, ReusePolicy, RowState, register


@register
@dataclass(frozen=True)
class FixedPolicy(ReusePolicy):
    name: ClassVar[str] = "fixed"
    reads: ClassVar[tuple[str, ...]] = ("k", "subset", "mode", "scope")
    axes: ClassVar[dict[str, tuple]] = {"k": (1, 2, 3), "subset": ("first", "middle", "last")}   # the study's grid
    baseline: ClassVar[dict[str, object]] = {"k": 1}
    k: int
    groups: tuple[tuple[int, ...], ...]   # one group: the subset's layers
    mode: str = "output"
    scope: str = "block"
    subset: str = "custom"

    @classmethod
    def create(cls, num_layers: int, *, k: int, subset: str | tuple[int, ...] | list[int] = "first",
               mode: str = "output", scope: str = "block", size: int | None = None) -> "FixedPolicy":
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"k must be an integer >= 1 (1 = no reuse), got {k!r}")
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if scope not in SCOPES:
            raise ConfigError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
        layers = resolve_subset(subset, num_layers, size)
        name = subset if isinstance(subset, str) else "custom"
        if "subset" not in cls.computes(k=k, mode=mode):   # it computes (or replays) every layer
            layers, name = tuple(range(num_layers)), "all"
        return cls(k=k, groups=(layers,), mode=mode, scope=scope, subset=name)

    @classmethod
    def computes(cls, k, mode="output", **_) -> tuple[str, ...]:
        """k=1 never reuses: layers, mode and scope change nothing. Replay skips whole forwards:
        the subset changes nothing."""
        if k == 1:
            return ("k",)
        return ("k", "mode", "scope") if mode == "replay" else cls.reads

    @classmethod
    def run_name(cls, k, subset="first", mode="output", **_) -> str:
        if "subset" not in cls.computes(k=k, mode=mode):
            return f"k{k}_all" if k == 1 else f"k{k}_{mode}"
        return f"k{k}_{subset if isinstance(subset, str) else 'custom'}"

    @property
    def reuses(self) -> bool:
        return self.k > 1

    def memory(self, state: RowState) -> "Clocked":
        return Clocked(self, state)

    def describe(self) -> dict:
        return {"k": self.k, "subset": self.subset, "layers": list(self.layers), "mode": self.mode,
                "scope": self.scope}

    def note(self) -> str:
        if self.mode == "replay":
            return f"replay: every k={self.k}-th small-block step computes, the others reuse the last logits"
        return f"reuse k={self.k} on layers {list(self.layers)} of small-block forwards ({self.mode} mode)"


class Clocked(Memory):
    """The fixed policy remembers nothing: the step counters decide."""

    def decide(self, kind, group, active, clock: Clock, drift) -> torch.Tensor:
        if kind is not ForwardKind.SMALL_BLOCK:
            return torch.zeros_like(active)
        counters = clock.step if self.policy.scope == "block" else clock.since_refresh
        return active & (counters % self.policy.k != 0)

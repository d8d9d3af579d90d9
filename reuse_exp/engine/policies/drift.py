"""Adaptive reuse (`policy=adaptive`): a group of layers recomputes when its input has drifted,
not on a fixed clock.

Per sample and per contiguous group of layers, the drift is the relative change of the
group's input, at the positions of this forward, since the group last computed them:
`||x - x_ref|| / ||x_ref||`, measured at the group's first layer as the layer loop reaches
it. Below `drift`, and fewer than `max_reuse` reuses in a row, the group is skipped and
each of its layers adds its cached residual contribution (delta mode: the fresh work of the
layers before flows on); otherwise it computes and its reference is renewed. Every
decision is per sample, so a sample decodes the same tokens in any batch as alone.

`replay` treats the whole forward as one group whose input is the token embeddings: a
small-block step is replayed (no forward; the last logits are reused) while the window's
embeddings have drifted less than `drift` since the sample's last computed step.

A drift of 0 never reuses (a drift is never below 0): that is k=1, bit for bit. Full-block
forwards always compute and renew every reference, as in the fixed policy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ConfigError
from ..model import ForwardKind
from . import Memory, ReusePolicy, RowState, register

GROUPS = 4   # contiguous groups over layers 1..L-1 (layer 0 always runs, as in the study's subsets)


def layer_groups(num_layers: int, n_groups: int = GROUPS) -> tuple[tuple[int, ...], ...]:
    """Layers 1..L-1 in `n_groups` contiguous groups of near-equal size (28 layers: 7, 7, 7, 6)."""
    layers = list(range(1, num_layers))
    n = max(1, min(n_groups, len(layers)))
    size, extra = divmod(len(layers), n)
    out, i = [], 0
    for g in range(n):
        j = i + size + (g < extra)
        out.append(tuple(layers[i:j]))
        i = j
    return tuple(out)


@register
@dataclass(frozen=True)
class DriftPolicy(ReusePolicy):
    name: ClassVar[str] = "adaptive"
    reads: ClassVar[tuple[str, ...]] = ("drift", "max_reuse", "mode")
    axes: ClassVar[dict[str, tuple]] = {"drift": (0.0, 0.5, 1.0)}
    baseline: ClassVar[dict[str, object]] = {"drift": 0.0}       # never reuses: k=1's tokens, its own cost
    measures: ClassVar[bool] = True
    modes: ClassVar[tuple[str, ...]] = ("delta", "replay")
    drift: float            # relative drift of a group's input at which it recomputes
    max_reuse: int
    mode: str
    groups: tuple[tuple[int, ...], ...]

    @classmethod
    def create(cls, num_layers: int, *, drift: float, max_reuse: int, mode: str) -> "DriftPolicy":
        if not drift >= 0:
            raise ConfigError(f"drift must be >= 0 (0 = never reuse), got {drift}")
        if max_reuse < 1:
            raise ConfigError(f"max_reuse must be >= 1, got {max_reuse}")
        if mode not in cls.modes:
            hint = " (output-mode reuse is a replay of the last logits: use mode=replay)" if "replay" in cls.modes else ""
            raise ConfigError(f"the {cls.name} policy works in mode {' or '.join(cls.modes)}, not {mode!r}{hint}")
        groups = (tuple(range(num_layers)),) if mode == "replay" else layer_groups(num_layers)
        return cls(drift=drift, max_reuse=max_reuse, mode=mode, groups=groups)

    @classmethod
    def computes(cls, drift=None, **_) -> tuple[str, ...]:
        """At drift 0 nothing is reused, so the cap on reuses in a row changes nothing."""
        return ("drift", "mode") if drift == 0 else cls.reads

    @classmethod
    def run_name(cls, drift, mode, **_) -> str:
        return f"{cls.name}_{mode}_drift{drift}"

    def memory(self, state: RowState) -> "DriftMemory":
        return DriftMemory(self, state)

    def describe(self) -> dict:
        return {"drift": self.drift, "max_reuse": self.max_reuse, "mode": self.mode,
                "groups": [list(g) for g in self.groups]}

    def note(self) -> str:
        what = "the whole step replays" if self.mode == "replay" else f"groups {[list(g) for g in self.groups]} reuse"
        return (f"{self.name} ({self.mode} mode): {what} while the input drifts less than {self.drift} "
                f"since it last computed, at most {self.max_reuse} times in a row")


class DriftMemory(Memory):
    """Per row and group: its reuses in a row."""

    def __init__(self, policy: DriftPolicy, state: RowState):
        super().__init__(policy, state)
        state.zeros("in_a_row", len(policy.groups))

    def new_block(self) -> None:
        self.state["in_a_row"].zero_()

    def decide(self, kind: ForwardKind, group: int, active, clock, drift) -> torch.Tensor:
        in_a_row = self.state["in_a_row"][:, group]
        if drift is None:
            reuse = torch.zeros_like(active)
        else:
            reuse = active & (drift < self.policy.drift) & (in_a_row < self.policy.max_reuse)
        in_a_row.copy_(torch.where(reuse, in_a_row + 1, torch.where(active, 0, in_a_row)))
        return reuse

"""Adaptive reuse: a group of layers recomputes when its input has drifted, not on a fixed clock.

Per sample and per contiguous group of layers, the drift is the relative change of the
group's input, at the positions of this forward, since the group last computed them:
`||x - x_ref|| / ||x_ref||`, measured at the group's first layer as the layer loop reaches
it. Below the threshold, and fewer than `max_reuse` reuses in a row, the group is skipped
and each of its layers adds its cached residual contribution (delta mode: the fresh work
of the layers before flows on); otherwise it computes and its reference is renewed. Every
decision is per sample, so a sample decodes the same tokens in any batch as alone.

`replay` treats the whole forward as one group whose input is the token embeddings: a
small-block step is replayed (no forward; the last logits are reused) while the window's
embeddings have drifted less than the threshold since the sample's last computed step.

A threshold of 0 never reuses (a drift is never below 0): that is k=1, bit for bit. Full-
block forwards always compute and renew every reference, as in the fixed policy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import ConfigError
from .model import ForwardKind
from .reuse import ReuseCache, RowMask

ADAPTIVE_MODES = ("delta", "replay")
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


@dataclass(frozen=True)
class AdaptivePolicy:
    threshold: float
    max_reuse: int
    mode: str
    groups: tuple[tuple[int, ...], ...]
    subset: str = "adaptive"
    scope: str = "drift"
    reuses: bool = True

    @classmethod
    def create(cls, threshold: float, max_reuse: int, mode: str, num_layers: int) -> "AdaptivePolicy":
        if not threshold >= 0:
            raise ConfigError(f"drift threshold must be >= 0 (0 = never reuse), got {threshold}")
        if max_reuse < 1:
            raise ConfigError(f"max_reuse must be >= 1, got {max_reuse}")
        if mode not in ADAPTIVE_MODES:
            raise ConfigError(f"the adaptive policy works in mode {' or '.join(ADAPTIVE_MODES)}, not {mode!r} "
                              "(output-mode reuse is a replay of the last logits: use mode=replay)")
        groups = ((tuple(range(num_layers)),) if mode == "replay" else layer_groups(num_layers))
        return cls(threshold=threshold, max_reuse=max_reuse, mode=mode, groups=groups)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(i for g in self.groups for i in g)

    def describe(self) -> dict:
        return {"policy": "adaptive", "threshold": self.threshold, "max_reuse": self.max_reuse,
                "mode": self.mode, "groups": [list(g) for g in self.groups]}

    def note(self) -> str:
        what = "the whole step replays" if self.mode == "replay" else f"groups {[list(g) for g in self.groups]} reuse"
        return (f"adaptive ({self.mode} mode): {what} while the input drifts less than {self.threshold} "
                f"since it last computed, at most {self.max_reuse} times in a row")


def relative_drift(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per row: ||x - ref|| / ||ref|| over positions and features, in float32."""
    x, ref = x.float().flatten(1), ref.float().flatten(1)
    return (x - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)


class DriftState:
    """Per row and group: the group's input when it last computed (at every block position),
    its reuses in a row, and the drifts that made it recompute."""

    def __init__(self, policy: AdaptivePolicy, batch: int, block_size: int, hidden: int, dtype, device,
                 ref: torch.Tensor | None = None):
        self.policy = policy
        self.first = {g[0]: n for n, g in enumerate(policy.groups)}      # first layer -> group
        self.group_of = {i: n for n, g in enumerate(policy.groups) for i in g}
        shape = (len(policy.groups), batch, block_size, hidden)
        self.ref = torch.zeros(shape, dtype=dtype, device=device) if ref is None else ref.zero_()
        self.in_a_row = [[0] * batch for _ in policy.groups]
        self.refresh_drifts: list[float] = []

    def new_block(self) -> None:
        self.in_a_row = [[0] * len(row) for row in self.in_a_row]

    def decide(self, group: int, drift: list[float], active: list[bool]) -> list[bool]:
        """Which active rows reuse `group` now; the others recompute (their drift is recorded)."""
        out = []
        for b, (d, a) in enumerate(zip(drift, active)):
            reuse = a and d < self.policy.threshold and self.in_a_row[group][b] < self.policy.max_reuse
            if a and not reuse:
                self.refresh_drifts.append(d)
            out.append(reuse)
        return out

    def count(self, group: int, reusing: list[bool], active: list[bool]) -> None:
        self.in_a_row[group] = [n + 1 if r else (0 if a else n)
                                for n, r, a in zip(self.in_a_row[group], reusing, active)]

    def renew(self, group: int, x: torch.Tensor, offset: int, rows: torch.Tensor | None) -> None:
        window = self.ref[group, :, offset:offset + x.shape[1]]
        window.copy_(x if rows is None else torch.where(rows[:, None, None], x, window))

    def trim(self, keep: torch.Tensor) -> None:
        self.ref = self.ref[:, keep]
        kept = keep.tolist()
        self.in_a_row = [[n for n, k in zip(row, kept) if k] for row in self.in_a_row]


@dataclass
class AdaptiveReuse:
    """The plan of one forward under the adaptive policy, with LayerReuse's interface: the
    decision for a group is taken when the layer loop reaches its first layer (one host
    read of the group's drifts; none inside a group)."""
    state: DriftState
    cache: ReuseCache
    active: list[bool]
    offset: int
    decide: bool                      # small-block forwards decide; full-block forwards compute all
    device: object
    shadow: None = None
    reusing: dict = field(default_factory=dict)    # group -> RowMask of rows reusing it
    computing: dict = field(default_factory=dict)  # group -> RowMask of rows computing it

    def rows_reusing(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        group = self.state.group_of.get(layer)
        if group is None:
            return None
        if layer in self.state.first:
            drift = None
            if self.decide:
                window = self.state.ref[group, :, self.offset:self.offset + x.shape[1]]
                drift = relative_drift(x, window).tolist()
            self.choose(group, drift)
        mask = self.reusing[group]
        return mask.device if mask.any else None

    def choose(self, group: int, drift: list[float] | None) -> tuple[RowMask, RowMask]:
        """Decide `group` from its input's drift per row (None on forwards that do not decide):
        the rows that reuse it and the rows that compute it."""
        reuse = self.state.decide(group, drift, self.active) if self.decide else [False] * len(self.active)
        self.state.count(group, reuse, self.active)
        self.reusing[group] = RowMask.of(reuse, self.device)
        self.computing[group] = RowMask.of([a and not r for a, r in zip(self.active, reuse)], self.device)
        return self.reusing[group], self.computing[group]

    def rows_computing(self, layer: int) -> torch.Tensor | None:
        mask = self.computing[self.state.group_of[layer]]
        return mask.device if mask.any else None

    def stand_in(self, layer: int, x_in: torch.Tensor) -> torch.Tensor:
        return self.cache.stand_in(layer, x_in, self.offset, self.reusing[self.state.group_of[layer]])

    def remember(self, layer: int, x_in: torch.Tensor, y_out: torch.Tensor, rows: torch.Tensor | None) -> None:
        group = self.state.group_of.get(layer)
        if group is None:
            return
        computing = self.computing[group]
        whole = computing.all and all(self.active)
        self.cache.store(layer, x_in, y_out, self.offset, None if whole else computing)
        if layer in self.state.first:
            self.state.renew(group, x_in, self.offset, None if whole else computing.device)

    def skipped_layers_per_row(self) -> list[tuple[int, ...]]:
        """The layers each row stood in on this forward."""
        out = [() for _ in self.active]
        for group, mask in sorted(self.reusing.items()):
            layers = self.state.policy.groups[group]
            out = [o + layers if r else o for o, r in zip(out, mask.host.tolist())]
        return out

    def batch_skipped(self) -> tuple[int, ...]:
        """Layers no row computed: what the batched forward really saved."""
        return tuple(i for g, mask in sorted(self.reusing.items()) if mask.any and not self.computing[g].any
                     for i in self.state.policy.groups[g])


class ReplayDrift:
    """Replay as one group: the window's token embeddings against those of the sample's last
    computed step."""

    def __init__(self, policy: AdaptivePolicy, embed, batch: int, block_size: int, hidden: int, dtype, device):
        self.policy, self.embed = policy, embed
        self.ref = torch.zeros(batch, block_size, hidden, dtype=dtype, device=device)
        self.in_a_row = [0] * batch
        self.refresh_drifts: list[float] = []

    def new_block(self) -> None:
        self.in_a_row = [0] * len(self.in_a_row)

    def replaying(self, tokens: torch.Tensor, offset: int, active: list[bool]) -> list[bool]:
        drift = relative_drift(self.embed(tokens), self.ref[:, offset:offset + tokens.shape[1]]).tolist()
        out = []
        for b, (d, a) in enumerate(zip(drift, active)):
            replay = a and d < self.policy.threshold and self.in_a_row[b] < self.policy.max_reuse
            if a and not replay:
                self.refresh_drifts.append(d)
            self.in_a_row[b] = self.in_a_row[b] + 1 if replay else (0 if a else self.in_a_row[b])
            out.append(replay)
        return out

    def computed(self, kind: ForwardKind, tokens: torch.Tensor, offset: int, rows: list[bool]) -> None:
        """A forward ran for `rows`: their reference becomes its input."""
        window = self.ref[:, offset:offset + tokens.shape[1]]
        mask = torch.tensor(rows, device=window.device)[:, None, None]
        window.copy_(torch.where(mask, self.embed(tokens).to(window.dtype), window))
        if kind is ForwardKind.FULL_BLOCK:
            self.in_a_row = [0 if r else n for n, r in zip(self.in_a_row, rows)]

    def trim(self, keep: torch.Tensor) -> None:
        self.ref = self.ref[keep]
        self.in_a_row = [n for n, k in zip(self.in_a_row, keep.tolist()) if k]

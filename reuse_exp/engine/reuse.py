"""The machinery every reuse policy shares: the cached results that stand in for skipped
layers (`ReuseCache`, the only place that knows what output and delta mode mean), the plan
of one forward that the layer loops consult (`Plan`), and the subsets of the study.

Which rows skip which layers is the policy's decision (policies/); the plan asks the
policy's memory, group by group in layer order, as the layer loop reaches each group.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from .model import ForwardKind

SUBSETS = ("first", "middle", "last")
MODES = ("output", "delta", "replay")
SCOPES = ("block", "refresh")
STUDY_DEPTH, STUDY_SUBSET_SIZE = 28, 12


def subset_size(num_layers: int) -> int:
    """The study's 12-of-28 rule, scaled to any depth (at least one layer)."""
    return max(1, round(STUDY_SUBSET_SIZE * num_layers / STUDY_DEPTH))


def resolve_subset(subset: str | tuple[int, ...] | list[int], num_layers: int,
                   size: int | None = None) -> tuple[int, ...]:
    """Layer indices of a named subset (`first`, `middle`, `last`) or an explicit list.

    On 28 layers: first = 1..12 (layer 0 always runs), middle = 8..19, last = 16..27.
    """
    if not isinstance(subset, str):
        layers = tuple(int(i) for i in subset)
        if not layers:
            raise ConfigError("an explicit layer list must name at least one layer")
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ConfigError(f"layer index {bad[0]} out of range: the model has layers 0..{num_layers - 1}")
        if len(set(layers)) != len(layers):
            raise ConfigError(f"layer list {list(layers)} repeats a layer")
        return tuple(sorted(layers))
    if subset not in SUBSETS:
        raise ConfigError(f"unknown subset {subset!r}; use one of {', '.join(SUBSETS)} or a list of layer indices")
    n = subset_size(num_layers) if size is None else size
    if n < 1 or n > num_layers - 1:
        raise ConfigError(f"a subset of {n} layers does not fit a {num_layers}-layer model "
                          f"(layer 0 always runs; at most {num_layers - 1})")
    if subset == "first":
        return tuple(range(1, n + 1))
    if subset == "last":
        return tuple(range(num_layers - n, num_layers))
    start = (num_layers - n) // 2
    return tuple(range(start, start + n))


class ReuseCache:
    """Per reused layer, its last computed result at every position of the current block.

    mode output: a skipped layer's cached output stands in (the study's semantics)
         delta:  a skipped layer adds its cached residual contribution (output - input)
    """

    def __init__(self, layers: tuple[int, ...], mode: str, batch: int, block_size: int, hidden: int,
                 dtype: torch.dtype, device):
        self.mode = mode
        self.slot = {layer: s for s, layer in enumerate(layers)}
        self.values = torch.zeros(len(layers), batch, block_size, hidden, dtype=dtype, device=device)
        # Host-side record of which (row, position) hold a result computed in this block:
        # reusing anything else would be a bug, so it is checked, without a device sync.
        self.filled = torch.zeros(len(layers), batch, block_size, dtype=torch.bool)

    # The stand-in arithmetic, for every path: what is kept of a computed layer, and what
    # stands in for the layer when it is skipped.
    def kept(self, x_in: torch.Tensor, y_out: torch.Tensor) -> torch.Tensor:
        return y_out if self.mode == "output" else y_out - x_in

    def standing_in(self, x_in: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
        return cached if self.mode == "output" else x_in + cached

    def new_block(self) -> None:
        self.filled.zero_()

    def store(self, layer: int, x_in: torch.Tensor, y_out: torch.Tensor, offset: int,
              rows: "RowMask | None" = None) -> None:
        s = self.slot.get(layer)
        if s is None:
            return
        T = y_out.shape[1]
        new = self.kept(x_in, y_out)
        window = self.values[s, :, offset:offset + T]
        if rows is None:
            window.copy_(new)
            self.filled[s, :, offset:offset + T] = True
        else:
            window.copy_(torch.where(rows.device[:, None, None], new, window))
            self.filled[s, rows.host, offset:offset + T] = True

    def stand_in(self, layer: int, x_in: torch.Tensor, offset: int, rows: "RowMask") -> torch.Tensor:
        s, T = self.slot[layer], x_in.shape[1]
        self.check_filled((layer,), rows.host, offset, T)
        return self.standing_in(x_in, self.values[s, :, offset:offset + T])

    def check_filled(self, layers, rows: torch.Tensor, offset: int, T: int) -> None:
        """On the host record alone: the positions `rows` reuse were computed in this block."""
        slots = [self.slot[i] for i in sorted(layers)]
        if not bool(self.filled[slots][:, rows, offset:offset + T].all()):
            raise RuntimeError(f"layers {sorted(layers)} reused positions {offset}..{offset + T - 1} "
                               "that were never computed in this block")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def trim(self, keep: torch.Tensor) -> None:
        self.values = self.values[:, keep]
        self.filled = self.filled[:, keep.cpu()]


@dataclass(frozen=True)
class RowMask:
    """A set of batch rows, on the host (for decisions) and on the device (for writes)."""
    host: torch.Tensor    # bool [B], CPU
    device: torch.Tensor  # the same on the model's device

    @classmethod
    def of(cls, flags: list[bool], device) -> "RowMask":
        host = torch.tensor(flags, dtype=torch.bool)
        return cls(host, host.to(device))

    @property
    def any(self) -> bool:
        return bool(self.host.any())

    @property
    def all(self) -> bool:
        return bool(self.host.all())


@dataclass(frozen=True)
class Clock:
    """Per row: its denoising forwards so far in this block, and since its last full-block forward."""
    step: list[int]
    since_refresh: list[int]


def relative_drift(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per row: ||x - ref|| / ||ref|| over positions and features, in float32."""
    x, ref = x.float().flatten(1), ref.float().flatten(1)
    return (x - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)


@dataclass
class ShadowLog:
    """Diagnostic: ||reused - fresh|| / ||fresh|| for every skipped layer evaluation."""
    records: list[dict] = field(default_factory=list)
    where: dict = field(default_factory=dict)  # block, step, replace_position of the current forward

    def compare(self, layer: int, reused: torch.Tensor, fresh: torch.Tensor) -> None:
        err = (reused.float() - fresh.float()).norm() / fresh.float().norm().clamp_min(1e-30)
        self.records.append({**self.where, "layer": layer, "rel_err": float(err)})


@dataclass
class Plan:
    """The reuse of one forward, handed to the layer loop (eager: model.py; static: fast.py).

    A group is decided when the loop reaches its first layer (`choose`): the policy's memory
    says which active rows reuse it; the others compute it and, where the policy measures
    drift, renew the group's reference `ref` with its input. At batch 1, and whenever the
    rows agree, one of the two sets is empty and a skipped group is not computed at all.
    """
    groups: tuple[tuple[int, ...], ...]
    memory: object                    # the policy's Memory (policies/__init__.py): it decides
    kind: ForwardKind
    clock: Clock
    active: list[bool]
    cache: ReuseCache
    offset: int
    device: object
    ref: torch.Tensor | None = None   # [groups, B, block, hidden]: each group's input when it last computed
    measure: bool = False             # decide from drift (the small-block forwards of a policy that measures)
    shadow: ShadowLog | None = None
    reusing: dict = field(default_factory=dict)    # group -> RowMask of rows reusing it
    computing: dict = field(default_factory=dict)  # group -> RowMask of rows computing it

    def __post_init__(self):
        self.first = {min(g): n for n, g in enumerate(self.groups)}   # first layer -> group
        self.group_of = {i: n for n, g in enumerate(self.groups) for i in g}

    def drift(self, group: int, x: torch.Tensor) -> torch.Tensor:
        """Per row, on the device: how far `x`, the group's input, is from its reference."""
        return relative_drift(x, self.ref[group, :, self.offset:self.offset + x.shape[1]])

    def choose(self, group: int, drift: list[float] | None) -> tuple[RowMask, RowMask]:
        """Decide `group` (from its input's drift per row, where measured): the rows that
        reuse it and the rows that compute it."""
        reuse = self.memory.decide(self.kind, group, list(self.active), self.clock, drift)
        reuse = [bool(r) and a for r, a in zip(reuse, self.active)]
        self.reusing[group] = RowMask.of(reuse, self.device)
        self.computing[group] = RowMask.of([a and not r for a, r in zip(self.active, reuse)], self.device)
        return self.reusing[group], self.computing[group]

    def rows_reusing(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """Device mask of rows that reuse `layer` (x: its input), or None when every active row computes it."""
        group = self.group_of.get(layer)
        if group is None:
            return None
        if layer in self.first:
            self.choose(group, self.drift(group, x).tolist() if self.measure else None)
        mask = self.reusing[group]
        return mask.device if mask.any else None

    def rows_computing(self, layer: int) -> torch.Tensor | None:
        mask = self.computing[self.group_of[layer]]
        return mask.device if mask.any else None

    def stand_in(self, layer: int, x_in: torch.Tensor) -> torch.Tensor:
        return self.cache.stand_in(layer, x_in, self.offset, self.reusing[self.group_of[layer]])

    def remember(self, layer: int, x_in: torch.Tensor, y_out: torch.Tensor, rows: torch.Tensor | None) -> None:
        """`layer` computed `y_out` from `x_in` for its group's computing rows (`rows` is the
        model's device mask of them, or None for every row)."""
        group = self.group_of.get(layer)
        if group is None:
            return
        computing = self.computing[group]
        whole = computing.all
        self.cache.store(layer, x_in, y_out, self.offset, None if whole else computing)
        if self.ref is not None and layer in self.first:
            window = self.ref[group, :, self.offset:self.offset + x_in.shape[1]]
            window.copy_(x_in if whole else torch.where(computing.device[:, None, None], x_in, window))

    def skipped_layers_per_row(self) -> list[tuple[int, ...]]:
        """The layers each row stood in on this forward."""
        out = [() for _ in self.active]
        for group, mask in sorted(self.reusing.items()):
            out = [o + self.groups[group] if r else o for o, r in zip(out, mask.host.tolist())]
        return [tuple(sorted(o)) for o in out]

    def batch_skipped(self) -> tuple[int, ...]:
        """Layers no row computed: what the batched forward really saved."""
        return tuple(sorted(i for g, mask in self.reusing.items() if mask.any and not self.computing[g].any
                            for i in self.groups[g]))


class Told:
    """A memory that answers the same rows for every group: a plan decided by the caller
    (benchmarks and tests time or check one forward with every row reusing, or none)."""

    def __init__(self, reusing: list[bool]):
        self.reusing = list(reusing)
        self.refresh_drifts: list[float] = []

    def decide(self, kind, group, active, clock, drift) -> list[bool]:
        return list(self.reusing)

    def new_block(self) -> None:
        pass

    def trim(self, keep: list[bool]) -> None:
        pass


def told_plan(layers: tuple[int, ...], reusing: list[bool], cache: ReuseCache, offset: int, device,
              kind: ForwardKind = ForwardKind.SMALL_BLOCK) -> Plan:
    """The plan of one forward in which the rows `reusing` stand in for `layers` and the others compute them."""
    n = len(reusing)
    return Plan((tuple(sorted(layers)),), Told(reusing), kind, Clock([0] * n, [0] * n), [True] * n, cache,
                offset, device)

"""The machinery every reuse policy shares: the cached results that stand in for skipped
layers (`ReuseCache`, the only place that knows what output and delta mode mean), the plan
of one forward that the layer loops consult (`Plan`), and the subsets of the study.

Which rows skip which layers is the policy's decision (policies/); the plan asks the
policy's memory, group by group in layer order, as the layer loop reaches each group. Every
decision is a device tensor and is logged on the device (`Plan.log`): the host learns what
was skipped once, when the decoding call ends.
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

    A row reuses only on small-block forwards after its full-block forward of the block
    (decoding.py), which computed every layer at every position: what stands in was computed
    in this block.
    """

    def __init__(self, layers: tuple[int, ...], mode: str, batch: int, block_size: int, hidden: int,
                 dtype: torch.dtype, device):
        self.mode = mode
        self.slot = {layer: s for s, layer in enumerate(layers)}
        self.values = torch.zeros(len(layers), batch, block_size, hidden, dtype=dtype, device=device)

    # The stand-in arithmetic, for every path: what is kept of a computed layer, and what
    # stands in for the layer when it is skipped.
    def kept(self, x_in: torch.Tensor, y_out: torch.Tensor) -> torch.Tensor:
        return y_out if self.mode == "output" else y_out - x_in

    def standing_in(self, x_in: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
        return cached if self.mode == "output" else x_in + cached

    def store(self, layer: int, x_in: torch.Tensor, y_out: torch.Tensor, offset: int,
              rows: torch.Tensor | None = None) -> None:
        """Keep what `layer` computed for `rows` (bool [batch] on the device; None: every row)."""
        s = self.slot.get(layer)
        if s is None:
            return
        new = self.kept(x_in, y_out)
        window = self.values[s, :, offset:offset + y_out.shape[1]]
        window.copy_(new if rows is None else torch.where(rows[:, None, None], new, window))

    def stand_in(self, layer: int, x_in: torch.Tensor, offset: int) -> torch.Tensor:
        return self.standing_in(x_in, self.values[self.slot[layer], :, offset:offset + x_in.shape[1]])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def trim(self, keep: torch.Tensor) -> None:
        self.values = self.values[:, keep]


@dataclass(frozen=True)
class Clock:
    """Per row, on the device (long [batch]): its denoising forwards so far in this block, and
    since its last full-block forward."""
    step: torch.Tensor
    since_refresh: torch.Tensor


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


class RowState:
    """A memory's state per batch row, on the model's device: named tensors whose first dimension
    is the batch row. The engine keeps them where captured CUDA graphs read them and drops the
    rows that leave the batch; a memory only reads and updates them in place."""

    def __init__(self, batch: int, device, buffer=None):
        self.batch, self.device = batch, torch.device(device)
        self._buffer = buffer or (lambda key, shape, dtype: torch.zeros(shape, dtype=dtype, device=self.device))
        self._tensors: dict[str, torch.Tensor] = {}

    def zeros(self, name: str, *shape: int, dtype=torch.long) -> torch.Tensor:
        """A new state tensor [batch, *shape] of zeros, known as `name`."""
        t = self._buffer(("memory", name, self.batch, shape, dtype), (self.batch, *shape), dtype).zero_()
        self._tensors[name] = t
        return t

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(self._tensors.values())

    def trim(self, keep: torch.Tensor) -> None:
        """Keep the rows where `keep` (bool [batch], on the device) is True."""
        n = int(keep.sum())
        for name, t in self._tensors.items():
            kept = t[keep]
            self._tensors[name] = self._buffer(("memory", name, n, tuple(t.shape[1:]), t.dtype), kept.shape,
                                               t.dtype).copy_(kept)
        self.batch = n


REUSED, DRIFT = 0, 1   # the two planes of a plan's log


@dataclass
class Plan:
    """The reuse of one forward, handed to the layer loop (eager: model.py; static: static_forward.py).

    A group is decided when the loop reaches its first layer (`decide`): the policy's memory
    says which active rows reuse it; the others compute it and, where the policy measures
    drift, renew the group's reference `ref` with its input. Only small-block forwards reuse.
    `log` [2, groups, batch] (float32, on the device) keeps every decision: plane REUSED 1.0
    where a row reused the group, plane DRIFT the drift it was decided on (NaN: not measured).
    """
    groups: tuple[tuple[int, ...], ...]
    memory: object                    # the policy's Memory (policies/__init__.py): it decides
    kind: ForwardKind
    clock: Clock
    active: torch.Tensor              # bool [batch] on the device: the rows this forward is for
    cache: ReuseCache
    offset: int
    log: torch.Tensor
    ref: torch.Tensor | None = None   # [groups, batch, block, hidden]: each group's input when it last computed
    measure: bool = False             # decide from drift (the small-block forwards of a policy that measures)
    shadow: ShadowLog | None = None

    def __post_init__(self):
        self.first = {min(g): n for n, g in enumerate(self.groups)}   # first layer -> group
        self.group_of = {i: n for n, g in enumerate(self.groups) for i in g}

    def decide(self, group: int, drift: torch.Tensor | None) -> torch.Tensor:
        """The rows (bool [batch], device) that reuse `group`, from its input's drift per row where
        measured; logged. Tensor code only: the static path captures it in a CUDA graph."""
        reuse = self.memory.decide(self.kind, group, self.active, self.clock, drift)
        if self.kind is not ForwardKind.SMALL_BLOCK:
            reuse = torch.zeros_like(self.active)
        reuse = reuse & self.active
        self.log[REUSED, group].copy_(reuse)
        self.log[DRIFT, group].copy_(drift if drift is not None else torch.full_like(self.log[DRIFT, group], torch.nan))
        return reuse

    def drift(self, group: int, x: torch.Tensor) -> torch.Tensor:
        """Per row, on the device: how far `x`, the group's input, is from its reference."""
        return relative_drift(x, self.ref[group, :, self.offset:self.offset + x.shape[1]])

    def renew(self, group: int, x: torch.Tensor, computing: torch.Tensor) -> None:
        """The rows computing `group` keep its input `x` as the group's reference."""
        if self.ref is not None:
            window = self.ref[group, :, self.offset:self.offset + x.shape[1]]
            window.copy_(torch.where(computing[:, None, None], x, window))


class Told:
    """A memory that answers the same rows for every group: a plan decided by the caller
    (benchmarks and tests time or check one forward with every row reusing, or none)."""

    def __init__(self, reusing: list[bool], device, buffer=None):
        self.state = RowState(len(reusing), device, buffer)
        self.state.zeros("reusing", dtype=torch.bool).copy_(torch.tensor(reusing))

    def decide(self, kind, group, active, clock, drift) -> torch.Tensor:
        return self.state["reusing"]

    def new_block(self) -> None:
        pass


def told_plan(layers: tuple[int, ...], reusing: list[bool], cache: ReuseCache, offset: int, device,
              kind: ForwardKind = ForwardKind.SMALL_BLOCK, buffer=None) -> Plan:
    """The plan of one forward in which the rows `reusing` stand in for `layers` and the others compute
    them; `buffer` (a runner's) keeps its tensors where a captured graph finds them again."""
    n = len(reusing)
    get = buffer or (lambda key, shape, dtype: torch.zeros(shape, dtype=dtype, device=device))
    zeros = get(("told-clock", n), (n,), torch.long)
    return Plan((tuple(sorted(layers)),), Told(reusing, device, buffer), kind, Clock(zeros, zeros),
                torch.ones(n, dtype=torch.bool, device=device), cache, offset, get(("told-log", n), (2, 1, n),
                                                                                torch.float32))

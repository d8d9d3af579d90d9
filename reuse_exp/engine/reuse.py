"""Layer reuse as a policy: which layers skip, on which steps, and what stands in for them.

The policy is data (`ReusePolicy`); the decoder asks it, once per forward, for a
`LayerReuse` plan that the model's layer loop consults. The cached results live
in a `ReuseCache` owned by one decoding call and trimmed with the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import ConfigError
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


@dataclass(frozen=True)
class ReusePolicy:
    """Skip `layers` on small-block forwards except every k-th step of the counter.

    mode   output: a skipped layer's cached output stands in (the study's semantics)
           delta:  a skipped layer adds its cached residual contribution (output - input)
           replay: the whole forward is skipped and the step unmasks from the logits of the
                   row's last computed forward: what output mode amounts to (docs/engine.md),
                   as a control; its layers are all of them, whatever the subset
    scope  block:   the counter is the block's step counter (the study's description)
           refresh: the counter restarts at every full-block forward
    """
    k: int
    layers: tuple[int, ...]
    mode: str = "output"
    scope: str = "block"
    subset: str = "custom"

    @classmethod
    def create(cls, k: int, subset: str | tuple[int, ...] | list[int], num_layers: int,
               mode: str = "output", scope: str = "block", size: int | None = None) -> "ReusePolicy":
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"k must be an integer >= 1 (1 = no reuse), got {k!r}")
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if scope not in SCOPES:
            raise ConfigError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
        layers = resolve_subset(subset, num_layers, size)
        name = subset if isinstance(subset, str) else "custom"
        if mode == "replay":
            layers, name = tuple(range(num_layers)), "all"
        return cls(k=k, layers=layers, mode=mode, scope=scope, subset=name)

    @property
    def reuses(self) -> bool:
        return self.k > 1

    def skipped(self, kind: ForwardKind, counter: int) -> tuple[int, ...]:
        """Layers that reuse on this forward. Only small-block forwards ever skip."""
        if self.k == 1 or kind is not ForwardKind.SMALL_BLOCK or counter % self.k == 0:
            return ()
        return self.layers

    def describe(self) -> dict:
        return {"k": self.k, "subset": self.subset, "layers": list(self.layers),
                "mode": self.mode, "scope": self.scope}

    def note(self) -> str:
        if self.mode == "replay":
            return f"replay: every k={self.k}-th small-block step computes, the others reuse the last logits"
        return f"reuse k={self.k} on layers {list(self.layers)} of small-block forwards ({self.mode} mode)"


class ReuseCache:
    """Per reused layer, its last computed result at every position of the current block."""

    def __init__(self, policy: ReusePolicy, batch: int, block_size: int, hidden: int,
                 dtype: torch.dtype, device):
        self.mode = policy.mode
        self.slot = {layer: s for s, layer in enumerate(policy.layers)}
        self.values = torch.zeros(len(policy.layers), batch, block_size, hidden, dtype=dtype, device=device)
        # Host-side record of which (row, position) hold a result computed in this block:
        # reusing anything else would be a bug, so it is checked, without a device sync.
        self.filled = torch.zeros(len(policy.layers), batch, block_size, dtype=torch.bool)

    def new_block(self) -> None:
        self.filled.zero_()

    def store(self, layer: int, x_in: torch.Tensor, y_out: torch.Tensor, offset: int,
              rows: "RowMask | None" = None) -> None:
        s = self.slot.get(layer)
        if s is None:
            return
        T = y_out.shape[1]
        new = y_out if self.mode == "output" else y_out - x_in
        window = self.values[s, :, offset:offset + T]
        if rows is None:
            window.copy_(new)
            self.filled[s, :, offset:offset + T] = True
        else:
            window.copy_(torch.where(rows.device[:, None, None], new, window))
            self.filled[s, rows.host, offset:offset + T] = True

    def stand_in(self, layer: int, x_in: torch.Tensor, offset: int, rows: "RowMask") -> torch.Tensor:
        s, T = self.slot[layer], x_in.shape[1]
        if not bool(self.filled[s, rows.host, offset:offset + T].all()):
            raise RuntimeError(f"layer {layer} reused positions {offset}..{offset + T - 1} "
                               "that were never computed in this block")
        cached = self.values[s, :, offset:offset + T]
        return cached if self.mode == "output" else x_in + cached

    def check_filled(self, layers, rows: torch.Tensor, offset: int, T: int) -> None:
        """The fast path's check, on the host record alone: reused positions were computed in this block."""
        slots = [self.slot[i] for i in sorted(layers)]
        if not bool(self.filled[slots][:, rows, offset:offset + T].all()):
            raise RuntimeError(f"layers {sorted(layers)} reused positions never computed in this block")

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


@dataclass
class ShadowLog:
    """Diagnostic: ||reused - fresh|| / ||fresh|| for every skipped layer evaluation."""
    records: list[dict] = field(default_factory=list)
    where: dict = field(default_factory=dict)  # block, step, replace_position of the current forward

    def compare(self, layer: int, reused: torch.Tensor, fresh: torch.Tensor) -> None:
        err = (reused.float() - fresh.float()).norm() / fresh.float().norm().clamp_min(1e-30)
        self.records.append({**self.where, "layer": layer, "rel_err": float(err)})


@dataclass
class LayerReuse:
    """The plan for one forward, handed to the model's layer loop.

    `reusing`: rows that stand in a cached result for the policy's layers on this forward;
    `computing`: rows that compute them (and may write caches). At batch 1, and whenever
    the rows agree, one of the two is empty and a skipped layer is not computed at all.
    """
    layers: frozenset[int]
    reusing: RowMask
    computing: RowMask
    cache: ReuseCache
    offset: int
    shadow: ShadowLog | None = None

    def rows_reusing(self, layer: int, x: torch.Tensor | None = None) -> torch.Tensor | None:
        """Device mask of rows that reuse `layer`, or None when every computing row computes it.
        (`x`, the layer's input, is for policies that decide from it.)"""
        if layer in self.layers and self.reusing.any:
            return self.reusing.device
        return None

    def rows_computing(self, layer: int) -> torch.Tensor | None:
        return self.computing.device if self.computing.any else None

    def stand_in(self, layer: int, x_in: torch.Tensor) -> torch.Tensor:
        return self.cache.stand_in(layer, x_in, self.offset, self.reusing)

    def remember(self, layer: int, x_in: torch.Tensor, y_out: torch.Tensor,
                 rows: torch.Tensor | None) -> None:
        # `rows` (a device mask from the model) is always this plan's computing rows or None
        self.cache.store(layer, x_in, y_out, self.offset, None if rows is None else self.computing)

    def skipped_layers_per_row(self) -> list[tuple[int, ...]]:
        layers = tuple(sorted(self.layers))
        return [layers if r else () for r in self.reusing.host.tolist()]

    def batch_skipped(self) -> tuple[int, ...]:
        """Layers no row computed: what the batched forward really saved."""
        return tuple(sorted(self.layers)) if self.reusing.any and not self.computing.any else ()

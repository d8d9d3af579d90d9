"""Reuse policies behind one interface, and their registry (keyed by the `policy` setting).

A policy is data: which layers it may skip, in groups decided together, and what stands in
for a skipped layer (`mode`: output, delta or replay; the arithmetic is reuse.ReuseCache's).
Per decoding call it keeps a `Memory` (device tensors); the engine asks that memory, per
forward and group in layer order, which rows reuse the group, and the answer stays on the device. The eager, static and segmented paths ask
nothing else, so a new policy is one module here (or anywhere: REUSE_EXP_POLICY_MODULES)
with a class that `register`s itself, and one line in BUILTIN for this package's own.
"""
from __future__ import annotations

import importlib
from typing import ClassVar

import torch

from ...errors import ConfigError
from ...knobs import POLICY_MODULES
from ..model import ForwardKind
from ..reuse import Clock, RowState  # noqa: F401 (RowState: a policy's memory state)

BUILTIN = ("fixed", "drift", "depth")              # this package's policies: one module each


class Memory:
    """What a policy remembers during one decoding call, as tensors of its `state` (RowState).

    `decide` answers, per forward and group in layer order, which rows reuse the group, as a
    bool tensor [batch] on the model's device. It must be tensor code alone: on a GPU it runs
    inside a captured CUDA graph, so it is traced once and replayed, never re-run in Python. It
    may not read tensors on the host (no `.item()`, `bool(t)`, `.tolist()`), and all it
    remembers lives in `state`, updated in place."""

    def __init__(self, policy: "ReusePolicy", state: RowState):
        self.policy, self.state = policy, state

    def decide(self, kind: ForwardKind, group: int, active: torch.Tensor, clock: Clock,
               drift: torch.Tensor | None) -> torch.Tensor:
        """Which `active` rows (bool [batch]) reuse `group` on this forward (the others compute it).
        Called for every denoising forward and every group, in layer order; only small-block
        forwards reuse (what it answers for a full-block forward is not obeyed). `drift` (float32
        [batch]: relative change of the group's input since the row last computed it) on the
        small-block forwards of a policy that `measures`, else None. Replay mode: group 0 is the
        whole forward and the input the window's token embeddings."""
        raise NotImplementedError

    def new_block(self) -> None:
        """A new block starts (state that counts within a block is reset in place)."""


class ReusePolicy:
    """The interface every policy implements; subclasses are frozen dataclasses.

    name      the `policy` setting's value that selects it
    reads     the run settings `create` takes, by name (the caller passes their values)
    groups    layers decided together, in layer order (layer 0 is best left computing)
    mode      what stands in for a skipped layer: output, delta or replay (whole forward)
    measures  True: groups are decided from their input's drift, which the engine measures
    """
    name: ClassVar[str]
    reads: ClassVar[tuple[str, ...]]
    measures: ClassVar[bool] = False
    groups: tuple[tuple[int, ...], ...]
    mode: str

    @classmethod
    def create(cls, num_layers: int, **settings) -> "ReusePolicy":
        """The policy for a model of `num_layers` from the settings it `reads`; ConfigError names a bad value."""
        raise NotImplementedError

    @classmethod
    def computes(cls, **settings) -> tuple[str, ...]:
        """Those of `reads` that shape the computation at these values (the others change
        nothing: k=1 never reuses, whatever its layers). Runs and grid cells that differ only
        outside them are one configuration."""
        return cls.reads

    @classmethod
    def run_name(cls, **settings) -> str:
        """A short name of the configuration, from the settings it reads (the run's name, before the task)."""
        raise NotImplementedError

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(i for g in self.groups for i in g))

    @property
    def reuses(self) -> bool:
        """False: it never skips (k=1), so no cache is kept."""
        return True

    def memory(self, state: RowState) -> Memory:
        """A new memory for one decoding call of `state.batch` rows."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What it resolved to: logged with the run (reuse_trace.json)."""
        raise NotImplementedError

    def note(self) -> str:
        """One line for the run's `reuse_note` tag."""
        raise NotImplementedError


_registry: dict[str, type[ReusePolicy]] = {}
_loaded = False


def register(cls: type[ReusePolicy]) -> type[ReusePolicy]:
    """Make `cls` the policy of `policy=cls.name` (a class decorator)."""
    known = _registry.get(cls.name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ConfigError(f"two policies are named {cls.name!r}: {known.__module__} and {cls.__module__}")
    _registry[cls.name] = cls
    return cls


def _load() -> None:
    """Import this package's policies and the modules REUSE_EXP_POLICY_MODULES names, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN:
        importlib.import_module(f"{__name__}.{module}")
    for module in filter(None, (m.strip() for m in (POLICY_MODULES.read() or "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"{POLICY_MODULES.name}: cannot import {module!r} ({e}); "
                              "put its directory on PYTHONPATH") from None


def get(name: str) -> type[ReusePolicy]:
    _load()
    if name not in _registry:
        raise ConfigError(f"unknown policy {name!r}; use one of {', '.join(names())}")
    return _registry[name]


def names() -> tuple[str, ...]:
    _load()
    return tuple(sorted(_registry))

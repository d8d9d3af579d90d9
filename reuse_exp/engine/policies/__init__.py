"""Reuse policies behind one interface, and their registry (keyed by the `policy` setting).

A policy is data: which layers it may skip, in groups decided together, and what stands in
for a skipped layer (`mode`: output, delta or replay; the arithmetic is reuse.ReuseCache's).
Per decoding call it keeps a `Memory` (device tensors); the engine asks that memory, per
forward and group in layer order, which rows reuse the group, and the answer stays on the
device. The eager, static and segmented paths ask nothing else, so a new policy is one module with a class that `register`s itself: here
(and a line in BUILTIN), or in any installed distribution that names it under the entry
point group `reuse_exp.policies` (or a module REUSE_EXP_POLICY_MODULES names).

The registry is read lazily: a name is looked up when a setting names it, and only that
policy's module is imported then, so a plug-in may import reuse_exp.settings, and a broken
plug-in breaks only the runs that ask for it.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from typing import ClassVar

import torch

from ...errors import ConfigError
from ...knobs import POLICY_MODULES
from ..model import ForwardKind
from ..reuse import MODES, Clock, RowState

# This package's policies: the `policy` value -> its module here.
BUILTIN = {"fixed": "fixed", "adaptive": "drift", "depth": "depth"}
ENTRY_POINTS = "reuse_exp.policies"   # plug-ins: NAME = "module:Class" (or "module", which registers it)


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
    axes      the settings a grid of it varies (among `reads`), with the values a grid takes
              unless told: {"k": (1, 2, 3), "subset": ("first", "middle", "last")}
    baseline  the values of `reads` at which it never reuses ({"k": 1}, {"drift": 0.0}):
              every other configuration of its grid is measured against that one
    groups    layers decided together, in layer order (layer 0 is best left computing)
    mode      what stands in for a skipped layer: output, delta or replay (whole forward)
    measures  True: groups are decided from their input's drift, which the engine measures
    """
    name: ClassVar[str]
    reads: ClassVar[tuple[str, ...]]
    axes: ClassVar[dict[str, tuple]]
    baseline: ClassVar[dict[str, object]]
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
        outside them are one configuration (tracking/schema.py: shaping_settings)."""
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


# -- checks: a policy's declaration when it registers, its groups when it is built -----------------
IMPLEMENTS = ("create", "run_name", "memory", "describe", "note")
NAME = re.compile(r"[a-z][a-z0-9_]*\Z")


def declaration_problems(cls) -> list[str]:
    """What is wrong with `cls` as a policy, one phrase each (none: it may register)."""
    if not (isinstance(cls, type) and issubclass(cls, ReusePolicy)):
        return [f"{cls!r} is not a subclass of ReusePolicy"]
    out = []
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not NAME.match(name):
        out.append(f"name {name!r} is not a lower-case word (it is the `policy` setting's value)")
    reads = getattr(cls, "reads", None)
    if not isinstance(reads, tuple) or not all(isinstance(r, str) for r in reads):
        out.append(f"reads {reads!r} is not a tuple of setting names")
        reads = ()
    missing = [m for m in IMPLEMENTS if _defined_by(cls, m) is ReusePolicy]
    if missing:
        out.append(f"it does not implement {', '.join(missing)}")
    elif not _accepts(cls.memory, None, None):
        out.append("its memory does not take (self, state): state is the RowState of the decoding call's rows")
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
        out.append("it is not a frozen dataclass (@dataclass(frozen=True) under @register)")
    else:
        declared = {f.name for f in dataclasses.fields(cls)}
        absent = [a for a in ("groups", "mode") if a not in declared and not isinstance(getattr(cls, a, None), property)]
        if absent:
            out.append(f"it declares no {' or '.join(absent)} (fields its instances carry)")
    for what in ("axes", "baseline"):
        value = getattr(cls, what, None)
        if not isinstance(value, dict) or not value:
            out.append(f"it declares no {what} (a dict of settings it reads: the grid needs it)")
        elif set(value) - set(reads):
            out.append(f"its {what} name {', '.join(sorted(set(value) - set(reads)))}, which it does not read")
        elif what == "axes" and not all(isinstance(v, tuple) and v for v in value.values()):
            out.append("its axes' values are not non-empty tuples")
    if not isinstance(getattr(cls, "measures", None), bool):
        out.append("measures is not True or False")
    return out


def _defined_by(cls: type, attribute: str) -> type | None:
    return next((k for k in cls.__mro__ if attribute in vars(k)), None)


def _accepts(function, *args) -> bool:
    try:
        inspect.signature(function).bind(*args)
    except TypeError:
        return False
    except ValueError:   # no signature to read (a builtin): the call will tell
        pass
    return True


def check_built(policy: ReusePolicy, num_layers: int) -> ReusePolicy:
    """`policy` as `create` made it for a model of `num_layers`; ConfigError (one line) when its
    groups or mode are not what the engine can run."""
    name = type(policy).name
    groups = getattr(policy, "groups", None)
    if not isinstance(groups, tuple) or not groups or not all(isinstance(g, tuple) and g for g in groups):
        raise ConfigError(f"the {name} policy made groups {groups!r}: give a tuple of non-empty tuples of layers")
    layers = [i for g in groups for i in g]
    if not all(isinstance(i, int) and 0 <= i < num_layers for i in layers):
        raise ConfigError(f"the {name} policy made groups {groups}: the model has layers 0..{num_layers - 1}")
    if len(set(layers)) != len(layers) or any(list(g) != sorted(g) for g in groups) \
            or [g[0] for g in groups] != sorted(g[0] for g in groups):
        raise ConfigError(f"the {name} policy made groups {groups}: each layer once, groups in layer order")
    if policy.measures and any(list(g) != list(range(g[0], g[-1] + 1)) for g in groups):
        raise ConfigError(f"the {name} policy measures drift over groups {groups}: a measured group is contiguous")
    if policy.mode not in MODES:
        raise ConfigError(f"the {name} policy made mode {policy.mode!r}; a mode is one of {', '.join(MODES)}")
    if policy.reuses:
        check_memory(policy)
    return policy


def check_memory(policy: ReusePolicy, rows: int = 2) -> None:
    """A probe decoding call of `rows` rows on the CPU: `memory(state)` must be a Memory whose
    `decide` answers every group with a bool tensor [rows]; ConfigError (one line) otherwise, so
    a memory written to another interface is refused before a run opens, not deep in a decode."""
    name = type(policy).name
    active, steps = torch.ones(rows, dtype=torch.bool), torch.zeros(rows, dtype=torch.long)
    clock, drift = Clock(steps, steps.clone()), torch.zeros(rows) if policy.measures else None
    try:
        memory = policy.memory(RowState(rows, "cpu"))
        if not isinstance(memory, Memory):
            raise ConfigError(f"the {name} policy's memory(state) made a {type(memory).__name__}: make a subclass "
                              "of reuse_exp.engine.policies.Memory (its decide answers with tensors)")
        for group in range(len(policy.groups)):
            out = memory.decide(ForwardKind.SMALL_BLOCK, group, active, clock, drift)
            if not (isinstance(out, torch.Tensor) and out.dtype == torch.bool and tuple(out.shape) == (rows,)):
                what = (f"a {out.dtype} tensor of shape {list(out.shape)}" if isinstance(out, torch.Tensor)
                        else f"a {type(out).__name__}")
                raise ConfigError(f"the {name} policy's memory decided group {group} of {rows} rows with {what}: "
                                  f"answer a bool tensor [{rows}] (True: the row reuses the group)")
        memory.new_block()
    except ConfigError:
        raise
    except Exception as e:   # someone else's memory: one line naming what failed
        raise ConfigError(f"the {name} policy's memory fails a probe decoding call of {rows} rows on the CPU: "
                          f"{type(e).__name__}: {e}") from None


def build(cls: type[ReusePolicy], num_layers: int, **settings) -> ReusePolicy:
    """`cls.create` for a model of `num_layers`, its result checked (check_built)."""
    return check_built(cls.create(num_layers, **settings), num_layers)


# -- the registry ---------------------------------------------------------------------------------
_registry: dict[str, type[ReusePolicy]] = {}
_env_loaded = False


def register(cls: type[ReusePolicy]) -> type[ReusePolicy]:
    """Make `cls` the policy of `policy=cls.name` (a class decorator); ConfigError (one line) when
    its declaration is not a policy's."""
    problems = declaration_problems(cls)
    if problems:
        where = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)!s}"
        raise ConfigError(f"policy {where} cannot register: {'; '.join(problems)}")
    known = _registry.get(cls.name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ConfigError(f"two policies are named {cls.name!r}: {known.__module__} and {cls.__module__}")
    _registry[cls.name] = cls
    return cls


def _entry_points() -> dict[str, list]:
    from importlib.metadata import entry_points
    found: dict[str, list] = {}
    for ep in entry_points(group=ENTRY_POINTS):
        if ep.value not in [e.value for e in found.get(ep.name, [])]:
            found.setdefault(ep.name, []).append(ep)
    return found


def _load_entry_point(name: str, eps: list) -> None:
    if len(eps) > 1:
        raise ConfigError(f"installed distributions declare policy {name!r} twice ({', '.join(e.value for e in eps)}):"
                          " uninstall one")
    ep = eps[0]
    try:
        loaded = ep.load()
    except ConfigError as e:
        raise ConfigError(f"policy plug-in {name} ({ep.value}): {e}") from None
    except Exception as e:   # any import error of someone else's module: one line naming it
        raise ConfigError(f"policy plug-in {name} ({ep.value}) does not load: {type(e).__name__}: {e}") from None
    if isinstance(loaded, type) and issubclass(loaded, ReusePolicy) and _registry.get(loaded.name) is not loaded:
        register(loaded)
    if name not in _registry:
        raise ConfigError(f"policy plug-in {name} ({ep.value}) registered no policy named {name!r}: name the entry "
                          "point as the class's `name`")


def _load_env_modules() -> None:
    """Import the modules REUSE_EXP_POLICY_MODULES names, once."""
    global _env_loaded
    if _env_loaded:
        return
    for module in filter(None, (m.strip() for m in (POLICY_MODULES.read() or "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"{POLICY_MODULES.name}: cannot import {module!r} ({e}); "
                              "put its directory on PYTHONPATH") from None
        except ConfigError as e:
            raise ConfigError(f"{POLICY_MODULES.name}: {module}: {e}") from None
        except Exception as e:   # any error of someone else's module: one line naming it
            raise ConfigError(f"{POLICY_MODULES.name}: {module!r} does not import: {type(e).__name__}: {e}") from None
    _env_loaded = True


def get(name: str) -> type[ReusePolicy]:
    """The policy `name`: this package's, an entry point's, or one a REUSE_EXP_POLICY_MODULES module
    registers; only what the name needs is imported."""
    if name not in _registry:
        if name in BUILTIN:
            importlib.import_module(f"{__name__}.{BUILTIN[name]}")
        elif name in (eps := _entry_points()):
            _load_entry_point(name, eps[name])
        else:
            _load_env_modules()
    if name not in _registry:
        raise ConfigError(f"unknown policy {name!r}; use one of {', '.join(names())}")
    return _registry[name]


def names() -> tuple[str, ...]:
    """Every name `get` finds (plug-ins named by entry points are not imported for it)."""
    _load_env_modules()
    return tuple(sorted(set(BUILTIN) | set(_entry_points()) | set(_registry)))

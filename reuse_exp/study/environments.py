"""Whether the runs of one table computed in one environment on the same data, and one line per
difference when they did not: `k2_middle: CUDA 12.8 on H100; every other cell: CUDA 12.1 on A100`.

What counts (docs/grid.md says why): the result-shaping environment a run logged
(tracking/environment.py: the computing libraries, the processor, dtype, path, ranks) and its
data digest (tracking/data.py: task version, configuration and documents). MLflow's version,
the hostname, threads and memory describe a run and never split a table.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cache
from typing import Callable

from ..tracking.data import DATA_DIGEST_TAG, describe as describe_data
from ..tracking.environment import here as environment_here, label, shaping_of
from ..tracking.schema import ANY_ENVIRONMENT_TAG
from .store import RunRecord

DATA = "data"   # the fingerprint's entry for the data digest


def fingerprint(r: RunRecord) -> dict[str, str]:
    """What must be equal for two runs to share a table, beside code and settings."""
    return {**shaping_of(r.tags), DATA: r.tags.get(DATA_DIGEST_TAG, "").strip()}


def any_environment(runs: list[RunRecord]) -> bool:
    """Every run was made by a grid told that the environment does not matter for it."""
    return bool(runs) and all(r.tags.get(ANY_ENVIRONMENT_TAG) == "true" for r in runs)


def _text(r: RunRecord, names: list[str], other: RunRecord) -> str:
    """What `r` ran on, of `names`: `CUDA 12.8 on H100`, `data tiny_gsm documents 3c4d5e` (the
    data's parts that differ from `other`'s)."""
    fp = fingerprint(r)
    parts = [label(n, fp[n]) for n in names if n != DATA]
    if DATA in names:
        parts.append("data " + describe_data(r.tags, other.tags))
    return " ".join(parts)


def _key(r: RunRecord, ignore_environment: bool) -> tuple:
    return tuple(sorted((n, v) for n, v in fingerprint(r).items() if n == DATA or not ignore_environment))


def _groups(labelled: list[tuple[str, RunRecord]], ignore_environment: bool):
    """The runs by fingerprint, and the most common fingerprint (the table's own)."""
    groups: dict[tuple, list[tuple[str, RunRecord]]] = {}
    for name, r in labelled:
        groups.setdefault(_key(r, ignore_environment), []).append((name, r))
    counts = Counter({k: len(v) for k, v in groups.items()})
    return groups, max(groups, key=lambda k: (counts[k], k), default=None)


@dataclass(frozen=True)
class Difference:
    line: str                   # `k2_middle: CUDA 12.8 on H100; every other cell: CUDA 12.1 on A100`
    run_ids: tuple[str, ...]    # the runs outside the table's own fingerprint

    def __str__(self) -> str:
        return self.line


def differences(labelled: list[tuple[str, RunRecord]], ignore_environment: bool = False) -> list[Difference]:
    """One line per group of runs whose fingerprint is not the most common one, naming its
    entries (cells, or `cell run abcd1234` where a cell's repeats split) and what differs.
    `ignore_environment`: compare the data only."""
    groups, majority = _groups(labelled, ignore_environment)
    if len(groups) < 2:
        return []
    names = [n for n, _ in majority if len({dict(k)[n] for k in groups}) > 1]
    base = groups[majority][0][1]
    rest = "every other cell" if len(groups) == 2 else "most cells"
    return [Difference(f"{', '.join(_entries(group, labelled))}: {_text(group[0][1], names, base)}; "
                       f"{rest}: {_text(base, names, group[0][1])}", tuple(r.run_id for _, r in group))
            for k, group in groups.items() if k != majority]


def _entries(group: list[tuple[str, RunRecord]], labelled: list[tuple[str, RunRecord]]) -> list[str]:
    """A cell's name where all its runs are in the group, else `cell run <id>` per run."""
    out = []
    for name in dict.fromkeys(n for n, _ in group):
        mine = [r for n, r in group if n == name]
        whole = len(mine) == sum(n == name for n, _ in labelled)
        out += [name] if whole else [f"{name} run {r.run_id[:8]}" for r in mine]
    return out


def device_type(r: RunRecord) -> str:
    return (r.params.get("resolved_device") or r.params.get("device") or "cpu").split(":")[0]


@cache
def here(device_type_: str) -> tuple[tuple[str, str], ...]:
    """What this machine can know of the environment a run of `device_type_` would get here
    (once per process: it does not change under a running grid)."""
    return tuple(sorted(environment_here(device_type_).items()))


def same_here(r: RunRecord, where: Callable[[str], tuple] = here) -> bool:
    """Was the run computed in the environment a run here would get, as far as this machine
    can tell (a login node without the runs' GPUs compares their libraries only)?"""
    fp = fingerprint(r)
    return all(fp.get(n, "") == v for n, v in where(device_type(r)))

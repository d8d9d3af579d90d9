"""Unmasking schedules: how many tokens each denoising step unmasks, recorded from a decode
and replayed in another.

Random weights never pass the unmasking threshold, so a benchmark on them unmasks one token
per step; real decoding unmasks several, which changes the mix of forwards and what reuse
can save. A `Trajectory` is a recorded schedule (per sample, per small block in the order
generated, the count of each step); a decode that replays it unmasks, at each step, that
many of the most confident masked positions in place of the threshold rule. Every index
wraps: batch row b follows the profile's sample b % samples, its j-th small block the
sample's small block j % blocks, its s-th step there the count s % steps (a window with more
masks than the recorded small block had starts its counts over; fewer: the step takes what
is left).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import ConfigError

ONE_TOKEN = "one-token"   # no trajectory: the threshold rule (one token a step on random weights)
BUNDLED_DIR = Path(__file__).parent / "trajectories"
RECORD_FIX = "rerun it at this commit (`reuse-exp run`), which logs the unmasking schedule"

Schedule = list[list[list[int]]]   # per sample, per small block, per step: tokens unmasked


def bundled() -> list[str]:
    """The profiles shipped with the package, by name."""
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.json"))


@dataclass(frozen=True)
class Trajectory:
    samples: tuple[tuple[tuple[int, ...], ...], ...]   # per sample, per small block, per step: tokens
    name: str = ""                                     # how it was asked for: a bundled name, a path, run:ID
    source: tuple[tuple[str, str], ...] = ()           # where it was recorded: file, run id, commit, command

    def __post_init__(self):
        if not self.samples or not all(self.samples) or not all(b for s in self.samples for b in s):
            raise ConfigError(f"trajectory {self.name!r} has an empty sample or small block: record it again")
        if any(not isinstance(n, int) or n < 1 for s in self.samples for b in s for n in b):
            raise ConfigError(f"trajectory {self.name!r} has a step that unmasked no token: record it again")

    def count(self, sample: int, small_block: int, step: int) -> int:
        """Tokens the `step`-th step of sample `sample`'s `small_block`-th small block unmasks."""
        blocks = self.samples[sample % len(self.samples)]
        steps = blocks[small_block % len(blocks)]
        return steps[step % len(steps)]

    @property
    def tokens_per_step(self) -> float:
        steps = [n for s in self.samples for b in s for n in b]
        return sum(steps) / len(steps)

    @classmethod
    def from_schedule(cls, schedule: Schedule, name: str = "", source: dict | None = None) -> "Trajectory":
        """A decode's recorded schedule (DecodeReport.unmasking); samples without steps are left out."""
        samples = tuple(tuple(tuple(b) for b in s) for s in schedule if s)
        return cls(samples, name, tuple(sorted((k, str(v)) for k, v in (source or {}).items())))

    def to_json(self) -> dict:
        return {"name": self.name, "source": dict(self.source), "tokens_per_step": self.tokens_per_step,
                "unmasking": [[list(b) for b in s] for s in self.samples]}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()) + "\n")

    @classmethod
    def from_file(cls, path: str | Path, name: str = "", source: dict | None = None) -> "Trajectory":
        """A saved profile, or a tracked run's reuse_trace.json."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read trajectory {path}: {e}") from None
        if not isinstance(data, dict) or not data.get("unmasking"):
            raise ConfigError(f"{source.get('run_id') if source else path} has no unmasking schedule: "
                              f"{RECORD_FIX}, or give another trajectory")
        return cls.from_schedule(data["unmasking"], name or str(path),
                                 {**(data.get("source") or ({} if source else {"file": str(path)})), **(source or {})})

    @classmethod
    def load(cls, spec: str, run_trace: Callable[[str], Path] | None = None) -> "Trajectory | None":
        """`one-token` (None), a bundled profile's name, a JSON file, or `run:RUN_ID` (its
        reuse_trace.json, which `run_trace` fetches from the tracking store)."""
        if spec == ONE_TOKEN:
            return None
        if spec.startswith("run:"):
            run_id = spec[4:]
            if run_trace is None:
                raise ConfigError(f"{spec}: a run's trajectory needs the tracking store; give `reuse-exp bench` "
                                  "or `reuse-exp trajectory` the spec, or a saved JSON file")
            return cls.from_file(run_trace(run_id), spec, {"run_id": run_id})
        if spec in bundled():
            return cls.from_file(BUNDLED_DIR / f"{spec}.json", spec)
        if not Path(spec).is_file():
            raise ConfigError(f"unknown trajectory {spec!r}: give {ONE_TOKEN}, a bundled profile "
                              f"({', '.join(bundled()) or 'none'}), a JSON file or run:RUN_ID")
        return cls.from_file(spec, spec)


def to_device(values: list, dtype: torch.dtype, device) -> torch.Tensor:
    """A host list on `device` without a sync: from pinned memory, asynchronously, on a GPU."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t


class UnmaskingLog:
    """One decode's unmasking, step by step: each step's counts stay on the device (no host
    read per step) until `resolve` reads them all at once; and the clock a trajectory is
    replayed by (each sample's small block and step in it)."""

    def __init__(self, n_samples: int):
        self.small_block = [-1] * n_samples   # per sample: index of its current small block
        self.steps = [0] * n_samples          # per sample: steps taken in its current small block
        self.counts: list[torch.Tensor] = []  # per step: tokens unmasked per batch row
        self.rows: list[list[tuple[int, int, int]]] = []  # per step: (row, sample, small block) that stepped

    def new_small_block(self) -> None:
        self.steps = [0] * len(self.steps)

    def _position(self, sample: int) -> tuple[int, int]:
        """(small block, step) of the sample's next step: a sample's small blocks are those it steps in."""
        return self.small_block[sample] + (self.steps[sample] == 0), self.steps[sample]

    def replayed_counts(self, trajectory: Trajectory, sample_ids: list[int], active: list[bool],
                        device: torch.device) -> torch.Tensor:
        n = [trajectory.count(s, *self._position(s)) if a else 1 for s, a in zip(sample_ids, active)]
        return to_device(n, torch.long, device)

    def step(self, counts: torch.Tensor, sample_ids: list[int], active: list[bool]) -> None:
        rows = []
        for b, (s, a) in enumerate(zip(sample_ids, active)):
            if a:
                self.small_block[s] = self._position(s)[0]
                self.steps[s] += 1
                rows.append((b, s, self.small_block[s]))
        self.counts.append(counts)
        self.rows.append(rows)

    def resolve(self) -> Schedule:
        out: Schedule = [[] for _ in self.steps]
        flat = torch.cat(self.counts).tolist() if self.counts else []
        offset = 0
        for counts, rows in zip(self.counts, self.rows):
            for b, s, j in rows:
                if j == len(out[s]):
                    out[s].append([])
                out[s][j].append(flat[offset + b])
            offset += counts.shape[0]
        return out

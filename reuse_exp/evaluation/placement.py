"""Where a process runs: its device, dtype, rank and world size, and how many ranks the run has.

Resolved once per process from the settings and what the launcher said (RANK, WORLD_SIZE,
LOCAL_RANK), then handed down as one frozen object: the model, the collectives, the GPU
sampler and the launcher all read this one, so no two of them can resolve `auto` differently.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..engine.config import ConfigError
from ..settings import RunSettings


@dataclass(frozen=True)
class Placement:
    device: str            # this rank's own: cpu, cuda, cuda:N
    dtype: str             # resolved: bfloat16, float16, float32
    rank: int = 0
    world_size: int = 1    # ranks of the launched world this process is one of (1: not launched)
    local_rank: int = 0
    processes: int = 1     # ranks of the run: the world, or what this process must launch

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    @property
    def to_launch(self) -> int:
        """Ranks this process must launch: 1 when it evaluates itself (one process, or a rank)."""
        return 1 if self.parallel else self.processes

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def launched_rank(env=None) -> int:
    """This process's rank in a launched world (0 when not launched): known before the settings are."""
    return int((os.environ if env is None else env).get("RANK", "0"))


def resolve(s: RunSettings, env=None) -> Placement:
    """The placement of this process for settings `s`; ConfigError (one line) names the fix."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    rank = launched_rank(env)
    local_rank = int(env.get("LOCAL_RANK", str(rank)))
    device = _device(s.device)
    if world > 1:
        if s.processes not in ("auto", world):
            raise ConfigError(f"launched as {world} ranks but --processes {s.processes}: "
                              f"pass --processes {world} (or auto)")
        device, processes = _rank_device(device, rank, world, local_rank), world
    else:
        processes = _processes(s.processes, device)
    return Placement(device, _dtype(s.dtype, device), rank, world, local_rank, processes)


def _device(device: str) -> str:
    if device in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA device: use --device cpu")
    return device


def _dtype(dtype: str, device: str) -> str:
    """auto: bfloat16 on a GPU, float32 on CPU (bf16 matmuls are slow there and float32 is exact)."""
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


def _processes(processes: int | str, device: str) -> int:
    """How many ranks to launch: `auto` = one per visible GPU (one on CPU)."""
    cuda = device.startswith("cuda")
    gpus = torch.cuda.device_count() if cuda else 0
    if processes == "auto":
        return max(1, gpus)
    if processes > 1 and cuda:
        if device != "cuda":
            raise ConfigError(f"--processes {processes} with --device {device}: each rank takes its own GPU; "
                              "use --device cuda (or auto)")
        if processes > gpus:
            raise ConfigError(f"--processes {processes} but {gpus} GPU(s) visible: one rank per GPU "
                              f"(use --processes {gpus} or auto, or --device cpu)")
    return processes


def _rank_device(device: str, rank: int, world: int, local_rank: int) -> str:
    """Each rank its own GPU (cuda:LOCAL_RANK); CPU ranks share the CPU."""
    if not device.startswith("cuda"):
        return device
    if device != "cuda":
        raise ConfigError(f"device {device} under {world} ranks: each rank takes its own GPU; "
                          "use --device cuda (or auto)")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"rank {rank} has local rank {local_rank} but {torch.cuda.device_count()} GPU(s) are "
                          "visible: launch one rank per GPU")
    return f"cuda:{local_rank}"

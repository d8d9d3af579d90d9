"""Data-parallel ranks of the lm-eval model: which rank this process is, which device is its
own, and the collectives lm-eval's evaluator calls (all_gather, gather_object, barrier).

A rank is a process started by torch.distributed's launcher (`torchrun`, `accelerate launch`,
or `reuse-exp run --processes N`), which sets RANK, WORLD_SIZE and LOCAL_RANK. The model
joins the process group when it loads: gloo on CPU; on GPUs NCCL for CUDA tensors and gloo
for Python objects (lm-eval gathers its per-sample records as objects). lm-eval then gives
each rank every WORLD_SIZE-th document and gathers the results on rank 0.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import ConfigError

# A rank that waits longer than this in a collective fails, so no rank waits forever on one
# that hangs; a rank that dies is caught sooner, by the launcher, which stops the others.
TIMEOUT_ENV = "REUSE_EXP_COLLECTIVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Ranks":
        """What the launcher said; one process when nothing launched us."""
        env = os.environ
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        return cls(rank, world, int(env.get("LOCAL_RANK", str(rank))))

    @property
    def parallel(self) -> bool:
        return self.world_size > 1


def resolve_processes(processes: int | str, device: str) -> int:
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
    return int(processes)


def rank_device(device: str, ranks: Ranks) -> str:
    """Each rank its own GPU (cuda:LOCAL_RANK); CPU ranks share the CPU."""
    if not ranks.parallel or not device.startswith("cuda"):
        return device
    if device != "cuda":
        raise ConfigError(f"device {device} under {ranks.world_size} ranks: each rank takes its own GPU; "
                          "use --device cuda (or auto)")
    if ranks.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"rank {ranks.rank} has local rank {ranks.local_rank} but "
                          f"{torch.cuda.device_count()} GPU(s) are visible: launch one rank per GPU")
    return f"cuda:{ranks.local_rank}"


def timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))


def join(ranks: Ranks, device: torch.device) -> None:
    """Join the launcher's process group (once per process)."""
    if not ranks.parallel or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout(), device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout())


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor, concatenated in rank order (a scalar per rank stacks to a vector)."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)


def gather_object(obj, dst: int = 0) -> list | None:
    """Every rank's object, in rank order, on `dst`; None elsewhere."""
    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def all_gather_object(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    dist.barrier()

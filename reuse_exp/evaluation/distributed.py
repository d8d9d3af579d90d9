"""Data-parallel ranks of the lm-eval model: joining the launcher's process group and the
collectives lm-eval's evaluator calls (all_gather, gather_object, barrier). Which rank this
process is and which device is its own: placement.py.

A rank is a process started by torch.distributed's launcher (`torchrun`, `accelerate launch`,
or `reuse-exp run --processes N`), which sets RANK, WORLD_SIZE and LOCAL_RANK. The model
joins the process group when it loads: gloo on CPU; on GPUs NCCL for CUDA tensors and gloo
for Python objects (lm-eval gathers its per-sample records as objects). lm-eval then gives
each rank every WORLD_SIZE-th document and gathers the results on rank 0.
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from ..knobs import COLLECTIVE_TIMEOUT_S
from .placement import Placement


def timeout() -> timedelta:
    # A rank that waits longer than this in a collective fails, so no rank waits forever on one
    # that hangs; a rank that dies is caught sooner, by the launcher, which stops the others.
    return timedelta(seconds=COLLECTIVE_TIMEOUT_S.read())


def join(placement: Placement) -> None:
    """Join the launcher's process group (once per process)."""
    if not placement.parallel or dist.is_initialized():
        return
    device = placement.torch_device
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

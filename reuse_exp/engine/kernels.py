"""How many kernels one call launches on the GPU, counted by the profiler (CUPTI).

Inside a CUDA graph replay the kernels are traced too, so this counts what a graphed forward
really runs: the figure that separates a forward's matrix products from its small kernels
and the gaps between them.
"""
from __future__ import annotations

import torch

COPIES = ("Memcpy", "Memset")   # the runtime's copies are traced as device events, but are no kernels


def kernels_per_call(fn, device: torch.device, calls: int = 5) -> dict | None:
    """Kernels per call of `fn` and their device microseconds per call; None off a GPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
    count = us = 0.0
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0 and not e.key.startswith(COPIES):
            count += e.count
            us += t
    return {"kernels": count / calls, "kernel_us": us / calls}

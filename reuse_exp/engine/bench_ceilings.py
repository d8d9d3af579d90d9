"""What the benchmark measures against: timing with a device sync, the copy bandwidth and the
dense matrix-product peak of this device, and the bytes and FLOPs one forward must move."""
from __future__ import annotations

import statistics
import time

import torch

from .model import FastDLLM


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device, iters: int, warmup: int = 3) -> dict:
    """Median, min and max milliseconds of `fn` (host clock around a device sync)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (timed_ms(lambda: dst.copy_(src), device, iters=10)["median"] / 1e3)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n x n x n matrix product on random data (two input sets, rotated)."""
    sets = [(torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype))
            for _ in range(2)]
    out = torch.empty(n, n, device=device, dtype=dtype)
    i = [0]

    def step():
        a, b = sets[i[0] % 2]
        i[0] += 1
        torch.matmul(a, b, out=out)
    return 2 * n ** 3 / (timed_ms(step, device, iters=10)["median"] / 1e3)


def weight_bytes(model: FastDLLM, layers: tuple[int, ...] | None = None) -> int:
    """Bytes a forward reads: every weight but the embedding (a gather, not a read of it all)."""
    if layers is not None:
        return sum(p.numel() * p.element_size() for i in layers for p in model.model.layers[i].parameters())
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if not n.startswith("model.embed_tokens"))


def kv_bytes(model: FastDLLM, batch: int, kv_len: int) -> int:
    """Bytes of the keys and values one forward attends to, every layer."""
    c = model.config
    return 2 * c.num_hidden_layers * batch * c.num_key_value_heads * kv_len * c.head_dim * model.lm_head.weight.element_size()


def forward_flops(model: FastDLLM, batch: int, tokens: int, kv_len: int, logit_positions: int) -> int:
    """Matrix FLOPs of one forward: the layers' projections, attention, and the logits needed."""
    c = model.config
    layer_params = sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2)
    attention = 4 * c.num_hidden_layers * batch * c.num_attention_heads * tokens * kv_len * c.head_dim
    return 2 * batch * tokens * layer_params + attention + 2 * batch * logit_positions * c.hidden_size * c.vocab_size

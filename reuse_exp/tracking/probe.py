"""A fixed probe of the machine's speed: the same few milliseconds of work, whatever the code.

A run times it before and after its evaluation (tracking/timing.py): its spread and drift say
how steady the machine was, and its seconds compare across runs on one kind of machine. The
work is the shape of a decode, not of a benchmark kernel: decoder blocks (RMSNorm, attention,
a gated MLP) over a few rows, in plain torch, so it waits on what the decode waits on.
Measured on two cores other test suites shared (docs/bench_runs/speed_noise.py and .json, the
windows of a decode of the bundled model beside 0 to 2 busy processes): the decode's log seconds
followed this probe's with a correlation of 0.60 and a slope of 0.69, a 256x256 matmul loop's
with 0.48 and 0.43. study/speed.py widens two runs' noise by more than that slope.
It never uses the package's engine: a change to the engine must not move the probe.

It runs as BURSTS short bursts spread over PROBE_SPAN_S seconds, and each burst gives one
figure, the median of its REPS repetitions: one burst samples one instant, and inside a
tracked run on two quiet cores the probe's speed moved by up to 40 % between bursts a few
tenths of a second apart, while the process ran nothing else. The figures' median passes
over a spell shorter than the span; a longer one moves it, and the run's noise with it
(tracking/timing.py says why that is noise, not contention).
"""
from __future__ import annotations

import time

from ..knobs import PROBE_SPAN_S

BURSTS = 7
REPS = 4
# rows, hidden size, MLP size, heads, layers, dtype; per device type, never calibrated.
WORK = {"cpu": (40, 192, 512, 4, 8, "float32"), "cuda": (256, 2048, 5632, 16, 8, "bfloat16")}


def probe(device: str = "cpu", bursts: int = BURSTS, reps: int = REPS, span_s: float | None = None) -> list[float]:
    """Per burst, the median seconds of the fixed work over `reps` repetitions (after one
    untimed); `bursts` bursts evenly over `span_s` seconds (PROBE_SPAN_S by default)."""
    import torch
    import torch.nn.functional as F
    dev = torch.device(device)
    rows, hidden, mlp, heads, layers, dtype = WORK["cuda" if dev.type == "cuda" else "cpu"]
    g = torch.Generator().manual_seed(0)

    def weight(*shape):
        return (torch.randn(*shape, generator=g) / shape[0] ** 0.5).to(dev, getattr(torch, dtype))

    qkv, out, up, down = weight(hidden, 3 * hidden), weight(hidden, hidden), weight(hidden, 2 * mlp), weight(mlp, hidden)
    x0 = weight(rows, hidden) * rows ** 0.5
    d = hidden // heads

    def once() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        x = x0
        for _ in range(layers):
            q, k, v = (F.rms_norm(x, (hidden,)) @ qkv).view(rows, heads, 3 * d).split(d, -1)
            att = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / d ** 0.5, -1)
            x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(rows, hidden) @ out
            gate, lift = (F.rms_norm(x, (hidden,)) @ up).chunk(2, -1)
            x = x + (F.silu(gate) * lift) @ down
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    once()
    span = PROBE_SPAN_S.read() if span_s is None else span_s
    figures = []
    for i in range(bursts):
        if i:
            time.sleep(span / max(1, bursts - 1))
        figures.append(sorted(once() for _ in range(reps))[reps // 2])
    return figures

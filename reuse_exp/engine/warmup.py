"""The first decodes of one fresh process: what a user pays before the fast path runs warm.

    python -m reuse_exp.engine.warmup '{"shape": "tiny", "batches": [1, 8, 32]}'

Builds random weights of the shape, then at each batch size in turn decodes the benchmark's
trajectory twice: the first decode pays what that batch size has not met yet in this process
(graph captures; on a GPU the Triton kernels' compilation, or the kernels read back from the
compile cache), the second runs warm. Prints one JSON line. bench_paths.py starts it in fresh
processes one after another on one cache root, the way a machine meets it.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from .bench_decode import end_to_end
from .compile_cache import ENV_VARS
from .fast import FastRunner
from .loading import random_model

DEFAULTS = {"shape": "tiny", "device": "cpu", "dtype": "float32", "prompt_len": 256, "new_tokens": 256,
            "batches": [1, 8, 32]}


def first_decodes(shape: str, device: str, dtype: str, prompt_len: int, new_tokens: int, batches: list[int]) -> dict:
    """Seconds of the first and of a warm decode at each batch size, in this process."""
    t0 = time.perf_counter()
    model = random_model(shape, dtype, device=device, seed=0)
    runner = FastRunner(model)
    ready = time.perf_counter() - t0
    rows = []
    with torch.inference_mode():
        for batch in batches:
            e = end_to_end(model, runner, batch, prompt_len, new_tokens, None, 1, model.config.vocab_size - 1)
            rows.append({"batch": batch, "first_s": e["first_call_seconds"], "warm_s": e["seconds"]})
    return {"path": runner.name, "model_ready_s": ready, "batches": rows,
            "caches": {v: os.environ.get(v) for v in ENV_VARS} if runner.ops.name == "triton" else None}


def main(argv: list[str]) -> None:
    given = json.loads(argv[0]) if argv else {}
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise SystemExit(f"unknown warm-up setting {unknown[0]!r}: give {', '.join(DEFAULTS)}")
    print(json.dumps(first_decodes(**(DEFAULTS | given))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

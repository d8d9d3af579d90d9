"""Warm-up as a machine meets it: fresh processes one after another (warmup.py), the first on
an empty cache root, the next ones on what the first left there (the fast path's compiled
Triton kernels; CUDA graphs are captured again by every process), each timing its first and a
warm decode at several batch sizes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..knobs import CACHE_ROOT
from .compile_cache import ENV_VARS

# The goals for warm-up, in seconds: a fresh process's first decode (batch 1), and the
# first decode of a second process on the same machine, which finds the first one's caches.
GOAL_FIRST_S, GOAL_SECOND_PROCESS_S = 10.0, 3.0
PACKAGE_PARENT = Path(__file__).resolve().parents[2]


def warmup_settings(args) -> dict:
    """What a fresh warm-up process (warmup.py) decodes for the benchmark's resolved `args`."""
    return {"shape": args.shape, "device": args.device, "dtype": args.dtype, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "batches": list(args.warmup_batches)}


def fresh_processes(settings: dict, processes: int, timeout_s: float = 600.0) -> dict:
    """`processes` fresh processes in a row, each warmup.py with `settings`, on one cache root
    of their own (empty for the first); each process's JSON, and its wall seconds from start to
    exit. Caches the user pointed elsewhere (Triton's, Inductor's) are left out: the first
    process must start cold."""
    with tempfile.TemporaryDirectory(prefix="reuse_exp_warmup_") as root:
        env = {k: v for k, v in os.environ.items() if k not in ENV_VARS} | {CACHE_ROOT.name: root}
        # the child imports this very package, wherever it was imported from
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_PARENT), env.get("PYTHONPATH")) if p)
        runs = []
        for i in range(processes):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "reuse_exp.engine.warmup", json.dumps(settings)],
                                 env=env, capture_output=True, text=True, timeout=timeout_s)
            if out.returncode:
                last = (out.stderr.strip().splitlines() or ["no output"])[-1]
                raise RuntimeError(f"warm-up process {i + 1} of {processes} failed: {last}")
            run = json.loads(out.stdout.strip().splitlines()[-1])
            runs.append(run | {"process_s": time.perf_counter() - t0, "cache": "empty" if i == 0 else "kept"})
    first, later = runs[0]["batches"][0], [r["batches"][0] for r in runs[1:]]
    return {"path": runs[0]["path"], "settings": settings, "processes": runs,
            "goals": {"first_s": GOAL_FIRST_S, "second_process_s": GOAL_SECOND_PROCESS_S},
            "met": {"first": first["first_s"] <= GOAL_FIRST_S,
                    "second_process": later[0]["first_s"] <= GOAL_SECOND_PROCESS_S if later else None}}

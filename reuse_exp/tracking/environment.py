"""What a run computed on: its environment fingerprint, split into what shapes its result (the
libraries that compute, the processor, dtype, decoding path, ranks) and what only describes
the machine (MLflow's version, the hostname, threads, memory). tracking/schema.py lists both.

Why each side: Fast-dLLM v2's users report accuracy moving by up to 2 points with the CUDA
version alone, and data-parallel results differing from one GPU's by padding and kernel choice,
so the kernels' libraries, the GPU model and the ranks shape a result. The thread count does
not, measured on the bundled model: 16 documents at k=2 gave byte-identical outputs at 1 and 2
torch threads (tests/test_environment.py keeps checking it); it changes only the speed.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import platform
import resource
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from .gpu_stats import inventory

PREFIX = "env."          # tags env.<name>
ENV_KEY_TAG = "env_key"  # hash of the result-shaping part: one value per environment
# What shapes a result; a run's value of each is compared by the grid, `compare` and the audit.
SHAPING = ("torch", "cuda", "cudnn", "transformers", "lm_eval", "device", "dtype", "path", "world_size")
# What only describes where and how fast it ran.
CONTEXT = ("mlflow", "reuse_exp", "python", "gpu_driver", "gpu_count", "cpu", "cpu_cores", "torch_threads",
           "omp_num_threads", "hostname")
LIBRARIES = {"torch": "torch", "transformers": "transformers", "lm_eval": "lm-eval", "mlflow": "mlflow",
             "reuse_exp": "reuse-exp"}
# How a difference is written: `CUDA 12.8 on NVIDIA H100`.
LABELS = {"torch": "torch {}", "cuda": "CUDA {}", "cudnn": "cuDNN {}", "transformers": "transformers {}",
          "lm_eval": "lm-eval {}", "device": "on {}", "dtype": "{}", "path": "{} path", "world_size": "{} rank(s)"}


@dataclass(frozen=True)
class Environment:
    shaping: dict[str, str]
    context: dict[str, str]

    def tags(self) -> dict[str, str]:
        return {**{PREFIX + n: v for n, v in {**self.shaping, **self.context}.items()},
                ENV_KEY_TAG: env_key(self.shaping)}

    def record(self) -> dict:
        """The environment.json artifact (peak RSS added at the run's end)."""
        return {"shapes_result": self.shaping, "context": self.context, "peak_rss_mb": peak_rss_mb()}


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "none"


def cpu_model() -> str:
    """`AMD EPYC 7763 64-Core Processor`, as the kernel names it; the architecture elsewhere."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def libraries() -> dict[str, str]:
    """The libraries that compute a result, as this process has them."""
    import torch
    out = {n: _version(LIBRARIES[n]) for n in ("torch", "transformers", "lm_eval")}
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {**out, "cuda": torch.version.cuda or "none", "cudnn": str(cudnn) if cudnn else "none"}


def device_of(device_type: str, gpu_names: list[str]) -> str:
    """The processor that computed: the GPU model(s), or the CPU model."""
    return ", ".join(sorted(set(gpu_names))) if device_type == "cuda" and gpu_names else cpu_model()


def gather(device_type: str, dtype: str, path: str, world_size: int, gpu_names: list[str]) -> Environment:
    """This run's environment; `gpu_names`: the model of each rank's GPU (none on CPU)."""
    import torch
    gpus, driver = inventory() if device_type == "cuda" else ([], None)
    shaping = {**libraries(), "device": device_of(device_type, gpu_names or gpus), "dtype": dtype,
               "path": path, "world_size": str(world_size)}
    context = {**{n: _version(LIBRARIES[n]) for n in ("mlflow", "reuse_exp")},
               "python": platform.python_version(), "cpu": cpu_model(), "cpu_cores": str(os.cpu_count() or 0),
               "torch_threads": str(torch.get_num_threads()),
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "(unset)"), "hostname": socket.gethostname()}
    if gpus:   # GPUs only where there are any
        context |= {"gpu_count": str(len(gpus)), "gpu_driver": driver or "unknown"}
    return Environment(shaping, context)


def here(device_type: str) -> dict[str, str]:
    """The result-shaping part this machine can know before a run: the libraries, and the
    processor of `device_type` when this machine has one (a login node has no GPU to name)."""
    out = libraries()
    if device_type == "cpu":
        out["device"] = cpu_model()
    elif device_type == "cuda":
        gpus, _ = inventory()
        if gpus:
            out["device"] = device_of("cuda", gpus)
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory (rank 0's, with several ranks)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)   # macOS counts bytes


def env_key(shaping: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def shaping_of(tags: dict) -> dict[str, str]:
    """A run's result-shaping environment from its tags ('' where it logged none: an older run)."""
    return {n: tags.get(PREFIX + n, "").strip() for n in SHAPING}


def label(name: str, value: str) -> str:
    return LABELS.get(name, name + " {}").format(value or "unknown")

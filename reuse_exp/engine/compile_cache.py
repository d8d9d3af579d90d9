"""The fast path's compiled kernels kept on disk, so that a machine pays compilation once.

Triton (and torch.compile's Inductor) keep what they compile in the folders named by
TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR, read when they first compile. Before the first
compilation the fast path points both (unless the user set them) at
<cache root>/compile/<key>, the key covering what invalidates a compiled kernel: the torch,
Triton, CUDA and Python versions, the device (GPU name and compute capability), and the
engine code that is compiled. A later process with the same key finds the kernels.

CUDA graphs cannot be kept across processes: every process captures its own.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path

import torch

from ..knobs import cache_root

ENV_VARS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
# The engine modules whose code is compiled (the fast path's kernels), or that choose how it compiles.
COMPILED_CODE = ("triton_kernels.py", "triton_ops.py")
ENGINE = Path(__file__).parent


def code_hash(files: list[Path]) -> str:
    """Hash of the files' contents, in the order given."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def key_parts(device: torch.device, code: Path = ENGINE) -> dict:
    """What a compiled kernel depends on, on this machine, for `device`, compiling the engine in `code`."""
    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = None
    if device.type == "cuda":
        cc = torch.cuda.get_device_capability(device)
        where = {"gpu": torch.cuda.get_device_name(device), "capability": f"sm{cc[0]}{cc[1]}"}
    else:
        where = {"cpu": platform.machine(), "processor": platform.processor()}
    return {"torch": torch.__version__, "triton": triton, "cuda": torch.version.cuda,
            "python": platform.python_version(), **where, "code": code_hash([code / f for f in COMPILED_CODE])}


def compile_dir(parts: dict) -> Path:
    """<cache root>/compile/<key>: the folder of the kernels compiled where `parts` hold."""
    return cache_root() / "compile" / hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def set_by_user(var: str) -> bool:
    """Whether `var` holds a folder the user chose. Importing Inductor sets its variable to
    torch's default (under the temporary folder), and its first compilation Triton's (under
    that): those are torch's, not the user's."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    value = os.environ.get(var)
    return bool(value) and not Path(value).is_relative_to(default_cache_dir())


def use_compile_caches(device: torch.device) -> dict[str, str]:
    """Point Inductor's and Triton's caches at this machine's compile folder for `device`, each
    unless the user set it; the values in force, by variable. Call before the first compilation."""
    unset = [v for v in ENV_VARS if not set_by_user(v)]
    if unset:
        parts = key_parts(device)
        folder = compile_dir(parts)
        folder.mkdir(parents=True, exist_ok=True)
        # what the key stands for, for whoever looks into the folder
        (folder / "key.json").write_text(json.dumps(parts, indent=1, sort_keys=True))
        for var in unset:
            os.environ[var] = str(folder / var.split("_")[0].lower())
    return {v: os.environ[v] for v in ENV_VARS}

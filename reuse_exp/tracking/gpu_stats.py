"""GPU statistics of one run, sampled from NVML in a background thread.

`nvidia-ml-py` provides the `pynvml` module (the separate `pynvml` package is
deprecated). Without a GPU, a driver or the module, the sampler records nothing
and `stop()` returns an empty dict: CPU runs log no GPU metrics, and no error.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field


@dataclass
class _Samples:
    memory_mb: list[float] = field(default_factory=list)
    util: list[float] = field(default_factory=list)
    power_w: list[float] = field(default_factory=list)


def nvml_index(cuda_index: int = 0) -> int:
    """NVML numbers every GPU of the host; CUDA only the visible ones."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    if cuda_index < len(visible) and visible[cuda_index].strip().isdigit():
        return int(visible[cuda_index])
    return cuda_index


class GpuSampler:
    """Sample memory, utilisation and power of one GPU every `interval` seconds."""

    def __init__(self, cuda_index: int = 0, interval: float = 0.2):
        self.interval = interval
        self.samples = _Samples()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle = None
        self._energy0_mj: int | None = None
        self._t0 = 0.0
        self.name: str | None = None
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index(cuda_index))
            self.name = pynvml.nvmlDeviceGetName(self._handle)
        except Exception:  # no module, no driver, no device: this run has no GPU statistics
            self._handle = None

    @property
    def available(self) -> bool:
        return self._handle is not None

    def _energy_mj(self) -> int | None:
        try:
            return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except self._nvml.NVMLError:  # older than Volta: integrate power instead
            return None

    def _sample(self) -> None:
        nv, h = self._nvml, self._handle
        self.samples.memory_mb.append(nv.nvmlDeviceGetMemoryInfo(h).used / 2**20)
        self.samples.util.append(float(nv.nvmlDeviceGetUtilizationRates(h).gpu))
        self.samples.power_w.append(nv.nvmlDeviceGetPowerUsage(h) / 1000.0)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def start(self) -> "GpuSampler":
        if self.available and self._thread is None:
            self._t0 = time.perf_counter()
            self._energy0_mj = self._energy_mj()
            self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        """Stop sampling; return the run's GPU metrics (empty without a GPU)."""
        if self._thread is None:
            return {}
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()
        seconds = time.perf_counter() - self._t0
        s = self.samples
        energy_mj = self._energy_mj()
        if energy_mj is not None and self._energy0_mj is not None:
            energy_j = (energy_mj - self._energy0_mj) / 1000.0
        else:
            energy_j = sum(s.power_w) / len(s.power_w) * seconds
        return {
            "gpu_peak_memory_mb": max(s.memory_mb),
            "gpu_util_mean": sum(s.util) / len(s.util),
            "gpu_util_max": max(s.util),
            "gpu_power_mean_w": sum(s.power_w) / len(s.power_w),
            "gpu_energy_j": energy_j,
        }


# How one run's statistics follow from each GPU's: a peak is the highest GPU's, energy and
# power add up over the GPUs, utilisation is their average.
COMBINE = {"gpu_peak_memory_mb": max, "gpu_util_max": max, "torch_peak_memory_mb": max,
           "gpu_energy_j": sum, "gpu_power_mean_w": sum, "gpu_util_mean": lambda v: sum(v) / len(v)}


def combine(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Every rank's GPU statistics as the run's, with each rank's beside them (rankR/NAME)."""
    if len(per_rank) == 1:
        return dict(per_rank[0])
    out = {}
    for name, how in COMBINE.items():
        values = [r[name] for r in per_rank if name in r]
        if values:
            out[name] = how(values)
    for rank, r in enumerate(per_rank):
        out |= {f"rank{rank}/{k}": v for k, v in r.items()}
    return out

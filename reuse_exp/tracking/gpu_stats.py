"""GPU statistics of one run, sampled from NVML in a background thread: memory, utilisation,
power and energy, and the SM clock and throttle reasons (how fair the run's timing was:
tracking/timing.py judges them).

Statistics never change a run's outcome. Each NVML field is read on its own: one that
fails (NotSupported, as utilisation on a MIG slice, or any other error) is dropped with
one warning and no longer read, while the others keep coming. Without a GPU, a driver
or the module, the sampler records nothing and `stop()` returns an empty dict.

`nvidia-ml-py` provides the `pynvml` module (the separate `pynvml` package is deprecated).
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time

log = logging.getLogger(__name__)

# What is sampled, each by one NVML call: the sampled series' names and how to read them.
SERIES = {
    "memory_mb": lambda nv, h: nv.nvmlDeviceGetMemoryInfo(h).used / 2**20,
    "util": lambda nv, h: float(nv.nvmlDeviceGetUtilizationRates(h).gpu),
    "power_w": lambda nv, h: nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
    "sm_clock_mhz": lambda nv, h: float(nv.nvmlDeviceGetClockInfo(h, CLOCK_SM)),
    "throttle": lambda nv, h: int(_throttle_reasons(nv)(h)),
}
CLOCK_SM = 1   # NVML_CLOCK_SM
# NVML's clocks-event (throttle) reason bits, as nvml.h numbers them.
THROTTLE_REASONS = {0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap",
                    0x8: "hw_slowdown", 0x10: "sync_boost", 0x20: "sw_thermal_slowdown",
                    0x40: "hw_thermal_slowdown", 0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting"}
# The reasons that say the machine, not the work, set the clocks: heat and hardware brakes. The
# power cap is left out: a heavy decode reaches it by itself, run after run.
SLOWING = 0x8 | 0x20 | 0x40 | 0x80


def _throttle_reasons(nv):
    """nvidia-ml-py renamed throttle reasons to clocks-event reasons (12.535); either will do."""
    return getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or nv.nvmlDeviceGetCurrentClocksThrottleReasons


def throttle_names(mask: int) -> list[str]:
    return [name for bit, name in THROTTLE_REASONS.items() if mask & bit]


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
        self.samples: dict[str, list[float]] = {name: [] for name in SERIES}
        self.dropped: set[str] = set()   # fields that failed once: not read again
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = self._handle = None
        self._energy0_mj: float | None = None
        self._t0 = 0.0
        self.name: str | None = None
        self.clock_limit: float | None = None
        try:
            import pynvml
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index(cuda_index))
            self._nvml = pynvml
        except Exception as e:  # no module, no driver, no device: this run has no GPU statistics
            log.warning("GPU statistics off: NVML is not available (%s: %s)", type(e).__name__, e)
            self._handle = None
            return
        self.name = self._read("name", lambda nv, h: nv.nvmlDeviceGetName(h))
        self.clock_limit = self._read("sm_clock_limit", lambda nv, h: float(nv.nvmlDeviceGetMaxClockInfo(h, CLOCK_SM)))

    @property
    def available(self) -> bool:
        return self._handle is not None

    def _read(self, field: str, reader):
        """One NVML field, or None once it has failed (said once, then never asked again)."""
        if field in self.dropped:
            return None
        try:
            return reader(self._nvml, self._handle)
        except Exception as e:
            self.dropped.add(field)
            log.warning("GPU statistics: %s dropped, NVML cannot read it here (%s: %s); the others go on",
                        field, type(e).__name__, e)
            return None

    def _energy_mj(self) -> float | None:
        # Volta and newer count energy; older GPUs integrate power instead (see stop).
        return self._read("energy", lambda nv, h: float(nv.nvmlDeviceGetTotalEnergyConsumption(h)))

    def _sample(self) -> None:
        for name, reader in SERIES.items():
            value = self._read(name, reader)
            if value is not None:
                self.samples[name].append(value)

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
        """Stop sampling; return the GPU metrics that could be read (empty without a GPU)."""
        if self._thread is None:
            return {}
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()
        seconds = time.perf_counter() - self._t0
        energy_mj = self._energy_mj()
        self._read("shutdown", lambda nv, h: nv.nvmlShutdown())
        mem, util, power = (self.samples[n] for n in ("memory_mb", "util", "power_w"))
        out = {}
        if mem:
            out["gpu_peak_memory_mb"] = max(mem)
        if util:
            out |= {"gpu_util_mean": sum(util) / len(util), "gpu_util_max": max(util)}
        if power:
            out["gpu_power_mean_w"] = sum(power) / len(power)
        out |= clock_metrics(self.samples["sm_clock_mhz"], self.samples["throttle"], self.clock_limit)
        if energy_mj is not None and self._energy0_mj is not None:
            out["gpu_energy_j"] = (energy_mj - self._energy0_mj) / 1000.0
        elif power:
            out["gpu_energy_j"] = out["gpu_power_mean_w"] * seconds
        return out


def clock_metrics(clocks: list[float], reasons: list[int], limit: float | None) -> dict[str, float]:
    """The SM clock over the run against the GPU's limit, the throttle reasons seen (a bit mask)
    and the fraction of samples slowed by a SLOWING reason."""
    out = {}
    if clocks:
        out |= {"gpu_sm_clock_mean_mhz": sum(clocks) / len(clocks), "gpu_sm_clock_min_mhz": min(clocks)}
    if limit is not None:
        out["gpu_sm_clock_limit_mhz"] = limit
    if reasons:
        mask = 0
        for r in reasons:
            mask |= r
        out |= {"gpu_throttle_reasons": float(mask),
                "gpu_throttled_fraction": sum(bool(r & SLOWING) for r in reasons) / len(reasons)}
    return out


# How one run's statistics follow from each GPU's: a peak is the highest GPU's, energy and
# power add up over the GPUs, utilisation is their average.
COMBINE = {"gpu_peak_memory_mb": max, "gpu_util_max": max, "torch_peak_memory_mb": max,
           "gpu_energy_j": sum, "gpu_power_mean_w": sum, "gpu_util_mean": lambda v: sum(v) / len(v),
           "gpu_sm_clock_mean_mhz": lambda v: sum(v) / len(v), "gpu_sm_clock_min_mhz": min,
           "gpu_sm_clock_limit_mhz": min, "gpu_throttled_fraction": max,
           "gpu_throttle_reasons": lambda v: float(functools.reduce(lambda a, b: a | b, map(int, v)))}


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


def inventory() -> tuple[list[str], str | None]:
    """The visible GPUs' model names (CUDA's order) and the driver version, from NVML; ([], None)
    without a GPU, a driver or the module."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:  # no module, no driver: a machine without GPUs, as far as a run can tell
        return [], None
    try:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        count = pynvml.nvmlDeviceGetCount()
        indices = range(count) if visible is None else range(len([v for v in visible.split(",") if v.strip()]))
        names = [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(nvml_index(i))) for i in indices]
        driver = pynvml.nvmlSystemGetDriverVersion()
        return [n.decode() if isinstance(n, bytes) else n for n in names], \
            driver.decode() if isinstance(driver, bytes) else driver
    except Exception as e:  # an index CUDA_VISIBLE_DEVICES names but NVML cannot open
        log.warning("GPU inventory: NVML cannot list the GPUs (%s: %s)", type(e).__name__, e)
        return [], None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception as e:
            log.warning("NVML shutdown failed (%s)", e)

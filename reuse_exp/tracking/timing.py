"""How fair a run's timing was, and how far its tokens/s can be trusted.

Tokens/s measured on a machine that other processes share says as much about them as about
the code. So each rank watches its evaluation (the timed batches, their warm-up and lm-eval's
own work) and records what it shared the machine with:

- its threads' time on a CPU against the time they were runnable and waited for one (Linux's
  per-thread schedstat): the direct measure. A busy thread's wall time is its CPU time plus
  that wait: under a load of 6 on two cores, a fixed matmul loop took 0.20 s of CPU every
  time and 0.21 to 0.55 s of wall, the difference its wait;
- its CPU time against wall time; the host's busy cores (every process's, those that ended
  meanwhile too), the part other processes used and the busiest of them by name, the load
  average, the hypervisor's steal; its OS and torch threads; the CPU frequency;
- on a GPU, its clocks and throttle reasons over the run (tracking/gpu_stats.py).

A fixed probe (tracking/probe.py: a few ms of decoder-shaped work on the run's device, in
probe.BURSTS bursts spread over about a second, before and after the evaluation) gives the
machine's speed at both ends, comparable between runs on one kind of machine.

The verdict, tag and metric `timing_quality`: `clean` (1), or `contended: <reasons>` (0) when
any rank's threads waited for a CPU more than WAIT_LIMIT of the time they wanted one (without
schedstat: when the host's busy cores reached its cores), the hypervisor stole more than
STEAL_LIMIT, a GPU was slowed by heat or a hardware brake in more than THROTTLED_LIMIT of the
samples. The probe's drift between before and after is noise, not contention: on two quiet
cores a tracked run's probe ran 40 % slower for seconds at a time (its own CPU time grew, no
thread of the process and no other process ran meanwhile), before the evaluation as often as
after, and 11 of 28 frontier runs whose probes drifted by 11 to 53 % had the tokens/s of the
other 17 (means 374 and 373): the decode averages what the machine does over minutes, two
probes see two moments of it. The noise, `tokens_per_second_noise` (relative): the largest of NOISE_FLOOR, the probe's spread and
drift, the CPU wait, and OTHERS_NOISE times the share of the cores other processes used: a run
whose threads never waited still shares caches and memory with them (docs/speed.md). The CPU frequency and other processes on the GPU are recorded, never
judged: a frequency that moves with turbo, and NVML's process list inside a container, would
call every run contended.
"""
from __future__ import annotations

import glob
import os
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .gpu_stats import SLOWING, throttle_names
from .probe import BURSTS, probe

SAMPLE_S = 1.0           # load, frequency and threads; the other processes every OTHERS_EVERY samples
OTHERS_EVERY = 5
WAIT_LIMIT = 0.05        # of the time this rank's threads were runnable, they waited for a CPU
STEAL_LIMIT = 0.03       # of the CPUs' time, the hypervisor ran something else
THROTTLED_LIMIT = 0.05   # of the GPU's samples, clocks slowed by heat or a hardware brake
DRIFT_LIMIT = 0.10       # two commits' probes: machines too different to compare (study/speed.py)
NOISE_FLOOR = 0.03       # what one run cannot see: another process's layout and luck (docs/speed.md)
BUSY_OTHER = 0.1         # cores: a process busier than this is named
# Of the share of the cores other processes used, this much is noise: beside processes using 1.2
# of 2 cores, clean runs of one commit differed by up to 29 % (docs/bench_runs/speed_regression_f699d5f.json)
OTHERS_NOISE = 0.25


def schedstat(pid: int | None = None) -> tuple[float, float] | None:
    """(seconds on a CPU, seconds runnable waiting for one) summed over the process's threads;
    None where the kernel does not say (not Linux, no schedstat)."""
    on = waited = 0
    found = False
    for path in glob.glob(f"/proc/{pid or os.getpid()}/task/*/schedstat"):
        try:
            a, b, _ = open(path).read().split()
        except (OSError, ValueError):   # a thread that ended as it was read
            continue
        on, waited, found = on + int(a), waited + int(b), True
    return (on / 1e9, waited / 1e9) if found else None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def _host(times) -> tuple[float, float, float]:
    """(busy, steal, total) CPU seconds of every core so far (guest time is inside user)."""
    busy = sum(getattr(times, n, 0.0) for n in ("user", "nice", "system", "irq", "softirq"))
    steal = getattr(times, "steal", 0.0)
    return busy, steal, busy + steal + times.idle + getattr(times, "iowait", 0.0)


@dataclass
class TimingReport:
    """One rank's view of its evaluation: what the machine gave it and what else ran."""
    wall_seconds: float
    cpu_seconds: float                  # this process, user + system
    on_cpu_seconds: float | None        # its threads, from schedstat
    waited_seconds: float | None        # its threads runnable but not running
    host_busy_cores: float              # every process
    other_busy_cores: float             # every process but this one
    steal_fraction: float
    cores: int                          # this process may run on
    torch_threads: int
    process_threads_max: int
    involuntary_switches: int
    load_1m: list[float] = field(default_factory=list)
    cpu_freq_mhz: list[float] = field(default_factory=list)
    cpu_freq_max_mhz: float | None = None
    busiest_others: list[tuple[str, int, float]] = field(default_factory=list)   # name, pid, cores
    probe_before: list[float] = field(default_factory=list)
    probe_after: list[float] = field(default_factory=list)

    @property
    def wait_fraction(self) -> float | None:
        if self.on_cpu_seconds is None or self.waited_seconds is None:
            return None
        wanted = self.on_cpu_seconds + self.waited_seconds
        return self.waited_seconds / wanted if wanted > 0 else 0.0

    @property
    def probe_drift(self) -> float | None:
        if not self.probe_before or not self.probe_after:
            return None
        return float(np.median(self.probe_after) / np.median(self.probe_before) - 1)

    @property
    def probe_spread(self) -> float | None:
        reps = self.probe_before + self.probe_after
        if len(reps) < 4:
            return None
        p25, p50, p75 = np.quantile(reps, [0.25, 0.5, 0.75])
        return float((p75 - p25) / p50)

    def noise(self) -> float:
        shared = OTHERS_NOISE * min(1.0, self.other_busy_cores / self.cores) if self.cores else 0.0
        parts = [NOISE_FLOOR, self.probe_spread, abs(self.probe_drift or 0.0), self.wait_fraction, shared]
        return max(p for p in parts if p is not None)

    def others_text(self) -> str:
        named = [f"{name} (pid {pid}) {cores:.1f}" for name, pid, cores in self.busiest_others]
        return f"other processes used {self.other_busy_cores:.1f} of {self.cores} cores" + (
            f": {', '.join(named)}" if named else "")

    def contention(self) -> list[str]:
        """Why this rank's timing was not fair; empty when it was."""
        out = []
        wait = self.wait_fraction
        if wait is not None and wait > WAIT_LIMIT:
            out.append(f"its threads waited for a CPU {wait:.0%} of the time they were runnable "
                       f"({self.others_text()})")
        own = self.cpu_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0
        if wait is None and self.other_busy_cores + own > 0.95 * self.cores:
            out.append(f"the host's {self.cores} cores were all busy ({self.others_text()})")
        if self.steal_fraction > STEAL_LIMIT:
            out.append(f"the hypervisor took {self.steal_fraction:.0%} of the CPUs' time (steal)")
        return out

    def metrics(self) -> dict[str, float]:
        m = {"timing_wall_seconds": self.wall_seconds, "timing_cpu_fraction": self.cpu_seconds / self.wall_seconds
             if self.wall_seconds > 0 else 0.0, "timing_host_busy_cores": self.host_busy_cores,
             "timing_other_busy_cores": self.other_busy_cores, "timing_steal_fraction": self.steal_fraction,
             "timing_cores": self.cores, "timing_torch_threads": self.torch_threads,
             "timing_process_threads_max": self.process_threads_max,
             "timing_involuntary_switches": self.involuntary_switches, "tokens_per_second_noise": self.noise()}
        optional = {"timing_cpu_wait_fraction": self.wait_fraction, "probe_drift": self.probe_drift,
                    "probe_spread": self.probe_spread, "timing_cpu_freq_max_mhz": self.cpu_freq_max_mhz,
                    "timing_host_load_1m_max": max(self.load_1m, default=None),
                    "timing_cpu_freq_mhz_mean": float(np.mean(self.cpu_freq_mhz)) if self.cpu_freq_mhz else None,
                    "timing_cpu_freq_mhz_min": min(self.cpu_freq_mhz, default=None),
                    "probe_seconds_before": float(np.median(self.probe_before)) if self.probe_before else None,
                    "probe_seconds_after": float(np.median(self.probe_after)) if self.probe_after else None}
        return m | {k: float(v) for k, v in optional.items() if v is not None}


class Watch:
    """Watch this process over a timed part: `start()`, the work, `stop()` -> TimingReport."""

    def __init__(self, device: str = "cpu", siblings: bool = False, interval: float = SAMPLE_S,
                 probe_bursts: int = BURSTS):
        """`siblings`: the parent's other children are this run too (the ranks of one launch)."""
        import psutil
        self.device, self.siblings, self.interval, self.probe_bursts = device, siblings, interval, probe_bursts
        self.proc = psutil.Process()
        self.load: list[float] = []
        self.freq: list[float] = []
        self.threads = 0
        self.first: dict[tuple[int, float], tuple[str, float]] = {}   # (pid, created): name, CPU seconds
        self.last: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.before: list[float] = []

    def _family(self) -> set[int]:
        pids = {self.proc.pid} | {c.pid for c in self.proc.children(recursive=True)}
        if self.siblings and (parent := self.proc.parent()) is not None:
            pids |= {c.pid for c in parent.children(recursive=True)}
        return pids

    def _others(self) -> None:
        """Every other process's CPU seconds now: first sight (0 if it began inside) and last."""
        import psutil
        family = self._family()
        for p in psutil.process_iter(["name", "cpu_times", "create_time"]):
            info = p.info
            times = info.get("cpu_times")
            if p.pid in family or times is None:
                continue
            key, cpu = (p.pid, info.get("create_time") or 0.0), times.user + times.system
            if key not in self.first:
                began_inside = key[1] >= self._epoch0
                self.first[key] = (info.get("name") or "?", 0.0 if began_inside else cpu)
            self.last[key] = cpu

    def _sample(self, n: int) -> None:
        import psutil
        self.load.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)
        freq = psutil.cpu_freq()
        if freq is not None and freq.current:
            self.freq.append(float(freq.current))
        self.threads = max(self.threads, self.proc.num_threads())
        if n % OTHERS_EVERY == 0:
            self._others()

    def _loop(self) -> None:
        n = 1
        while not self._stop.wait(self.interval):
            self._sample(n)
            n += 1

    def start(self) -> "Watch":
        import psutil
        self.before = probe(self.device, self.probe_bursts)
        self._epoch0 = time.time()
        self._others()
        self._t0, self._cpu0 = time.perf_counter(), self.proc.cpu_times()
        self._sched0, self._host0 = schedstat(), _host(psutil.cpu_times())
        self._switches0 = self.proc.num_ctx_switches().involuntary
        self._sample(1)
        self._thread = threading.Thread(target=self._loop, name="timing-watch", daemon=True)
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Stop watching without a report (the timed part failed)."""
        self._stop.set()

    def stop(self) -> TimingReport:
        import psutil
        import torch
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        wall = time.perf_counter() - self._t0
        cpu1, sched1, host1 = self.proc.cpu_times(), schedstat(), _host(psutil.cpu_times())
        switches = self.proc.num_ctx_switches().involuntary - self._switches0
        self._others()
        cpu = (cpu1.user + cpu1.system) - (self._cpu0.user + self._cpu0.system)
        busy, steal, total = (b - a for a, b in zip(self._host0, host1))
        on = waited = None
        if sched1 is not None and self._sched0 is not None:
            on, waited = sched1[0] - self._sched0[0], sched1[1] - self._sched0[1]
        host_busy = busy / wall if wall > 0 else 0.0
        others = sorted(((name, pid, (self.last[(pid, t)] - cpu0) / wall) for (pid, t), (name, cpu0)
                         in self.first.items() if wall > 0), key=lambda x: -x[2])
        freq = psutil.cpu_freq()
        return TimingReport(
            wall_seconds=wall, cpu_seconds=cpu, on_cpu_seconds=on, waited_seconds=waited, host_busy_cores=host_busy,
            other_busy_cores=max(0.0, host_busy - cpu / wall) if wall > 0 else 0.0,
            steal_fraction=steal / total if total > 0 else 0.0, cores=usable_cores(),
            torch_threads=torch.get_num_threads(), process_threads_max=max(self.threads, self.proc.num_threads()),
            involuntary_switches=switches, load_1m=self.load, cpu_freq_mhz=self.freq,
            cpu_freq_max_mhz=float(freq.max) if freq is not None and freq.max else None,
            busiest_others=[(n, p, round(c, 2)) for n, p, c in others[:3] if c > BUSY_OTHER],
            probe_before=self.before, probe_after=probe(self.device, self.probe_bursts))


# -- the run's verdict over its ranks -----------------------------------------------------------
CLEAN, CONTENDED = "clean", "contended"
QUALITY_TAG = "timing_quality"


@dataclass(frozen=True)
class Verdict:
    """The run's timing: clean or contended (with why), its noise, and every figure behind it."""
    reasons: tuple[str, ...]
    noise: float
    figures: dict[str, float]

    @property
    def clean(self) -> bool:
        return not self.reasons

    @property
    def tag(self) -> str:
        return CLEAN if self.clean else f"{CONTENDED}: " + "; ".join(self.reasons)

    def metrics(self) -> dict[str, float]:
        return {**self.figures, QUALITY_TAG: float(self.clean), "tokens_per_second_noise": self.noise}

    def tags(self) -> dict[str, str]:
        return {QUALITY_TAG: self.tag}


def gpu_contention(gpu: dict[str, float]) -> list[str]:
    slowed = gpu.get("gpu_throttled_fraction")
    if slowed is None or slowed <= THROTTLED_LIMIT:
        return []
    names = ", ".join(throttle_names(int(gpu.get("gpu_throttle_reasons", 0)) & SLOWING)) or "a slowing reason"
    return [f"the GPU's clocks were slowed ({names}) in {slowed:.0%} of the samples"]


def verdict(reports: list[TimingReport], gpus: list[dict[str, float]] | None = None) -> Verdict:
    """Every rank's report (and GPU statistics, rank order) as the run's timing verdict."""
    gpus = gpus or [{} for _ in reports]
    several = len(reports) > 1
    reasons, figures = [], {}
    for rank, (r, gpu) in enumerate(zip(reports, gpus)):
        mine = r.contention() + gpu_contention(gpu)
        reasons += [f"rank {rank}: {why}" if several else why for why in mine]
        if several:
            figures |= {f"rank{rank}/{k}": v for k, v in r.metrics().items()}
    worst = max(reports, key=lambda r: r.noise())
    figures |= worst.metrics() if not several else {k: max(x.metrics().get(k, 0.0) for x in reports)
                                                   for k in worst.metrics()}
    return Verdict(tuple(reasons), worst.noise(), figures)


def record(reports: list[TimingReport]) -> list[dict]:
    """The timing.json artifact: every rank's report as measured, samples and probes included."""
    return [asdict(r) | {"wait_fraction": r.wait_fraction, "noise": r.noise()} for r in reports]

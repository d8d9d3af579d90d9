"""A tracked run over N data-parallel ranks: launching them, the evaluation each rank runs,
and what rank 0 gathers from the others.

`reuse-exp run --processes N` opens the MLflow run, then starts N ranks with
torch.distributed's elastic launcher (what `torchrun` runs): each rank is
`python -m reuse_exp.cli run ...` with RANK, WORLD_SIZE and LOCAL_RANK set, attached to that
run as under `mlflow run`. Rank 0 logs everything; the other ranks evaluate their shards and
hand their statistics to rank 0. When a rank fails or is killed, the launcher stops the
others, and the process that launched them ends the run FAILED or KILLED naming the rank:
never FINISHED on a partial shard. `torchrun --nproc-per-node N -m reuse_exp.cli run
--processes N ...` works too; then rank 0 opens the run itself.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import RankFailed
from ..knobs import LAUNCHED, REQUEST_CACHE
from ..settings import RunSettings
from ..tracking.gpu_stats import GpuSampler

ERROR_FILE = "TORCHELASTIC_ERROR_FILE"   # where the launcher reads a failed rank's reason
CACHE_ENV, LAUNCHED_ENV = REQUEST_CACHE.name, LAUNCHED.name


# -- launching the ranks -------------------------------------------------------------------------
# torch's launcher narrates stopping the ranks on a signal, a line per rank; the run's one line says it
SHUTDOWN_NARRATION = {"torch.distributed.elastic.agent.server.api": "death signal, shutting down workers",
                      "torch.distributed.elastic.multiprocessing.api": "closing signal"}


class Narration(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_shutdown_narration() -> None:
    for name, text in SHUTDOWN_NARRATION.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, Narration) for f in log.filters):
            log.addFilter(Narration(text))


def launch(run_id: str, s: RunSettings, n: int, log_dir: Path, cache: Path) -> None:
    """Run the evaluation as N ranks attached to MLflow run `run_id`; RankFailed if one fails."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=run_id, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5,
                          logs_specs=DefaultLogsSpecs(log_dir=str(log_dir)))
    previous = os.environ.get("MLFLOW_RUN_ID")
    os.environ["MLFLOW_RUN_ID"] = run_id   # the ranks inherit it and attach, as under `mlflow run`
    os.environ[CACHE_ENV] = str(cache)     # and read and write this request cache
    os.environ[LAUNCHED_ENV] = "1"         # rank 0 leaves the summary to this process
    quiet_shutdown_narration()
    threads = "OMP_NUM_THREADS" not in os.environ
    if threads:   # N ranks on one machine's cores: torch's default threads per rank would fight (as torchrun)
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    try:
        elastic_launch(config, sys.executable)("-m", "reuse_exp.cli", "run", *s.to_args())
    except ChildFailedError as e:
        raise failure_of(*e.get_first_failure(), n) from None
    except SignalException as e:
        sig = signal.Signals(e.sigval)
        raise RankFailed("KILLED", 128 + sig, f"{sig.name}: the ranks were stopped and the run ended KILLED "
                                               "with what it had logged") from None
    finally:
        os.environ.pop(CACHE_ENV, None)
        os.environ.pop(LAUNCHED_ENV, None)
        if threads:
            os.environ.pop("OMP_NUM_THREADS", None)
        if previous is None:
            os.environ.pop("MLFLOW_RUN_ID", None)
        else:
            os.environ["MLFLOW_RUN_ID"] = previous


def failure_of(rank: int, failure, n: int) -> RankFailed:
    """The run's ending from the launcher's record of the first rank that failed."""
    message = failure.message if isinstance(failure.message, dict) else {"message": failure.message}
    reason = str(message.get("message") or "").strip()
    trace = (message.get("extraInfo") or {}).get("py_callstack", "")
    where = f"rank {rank} of {n}"
    if failure.exitcode < 0:
        sig = signal.Signals(-failure.exitcode).name
        return RankFailed("KILLED", 128 - failure.exitcode, f"{where} was killed ({sig}): the other ranks were "
                          "stopped and the run ended KILLED with what it had logged")
    status = "KILLED" if failure.exitcode in (130, 143) else "FAILED"
    return RankFailed(status, failure.exitcode, f"{where}: {reason or f'exited {failure.exitcode}'}", trace)


def record_failure(line: str, trace: str) -> None:
    """Leave this rank's one line (and traceback) where the launcher reads a failed rank's reason."""
    path = os.environ.get(ERROR_FILE)
    if path:
        Path(path).write_text(json.dumps({"message": {"message": line, "extraInfo": {
            "py_callstack": trace, "timestamp": str(int(time.time()))}}}))


# -- one rank's evaluation ---------------------------------------------------------------------
# Every rank runs these in this order: load_model (joins the group), rank_devices, evaluate,
# gather_reports; each past the first is a collective, so the ranks must not skip one.
@dataclass
class RankReport:
    """What a rank hands to rank 0 once its shard is done."""
    rank: int
    stats: object        # its HarnessStats
    gpu: dict            # its GPU's statistics (empty on CPU)
    timing: object = None   # its TimingReport: how fair the machine was over its evaluation


def start_sampler(device: str) -> GpuSampler | None:
    if not device.startswith("cuda"):
        return None
    import torch
    return GpuSampler(torch.device(device).index or 0).start()


def gpu_report(sampler: GpuSampler | None, device: str) -> dict:
    """The sampler's statistics (it stops) and the allocator's peak."""
    out = sampler.stop() if sampler is not None else {}
    if device.startswith("cuda"):
        import torch
        out["torch_peak_memory_mb"] = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    return out


def load_model(s: RunSettings, placement):
    from ..evaluation.lm import FastDLLMv2LM
    return FastDLLMv2LM(s, placement)


def device_name(device: str) -> str:
    import torch

    from ..tracking.environment import cpu_model
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


def rank_devices(lm) -> list[tuple[str, str]]:
    """Every rank's (device, device name), in rank order."""
    from ..evaluation import distributed
    mine = (str(lm.device), device_name(str(lm.device)))
    return distributed.all_gather_object(mine) if lm.world_size > 1 else [mine]


def world_params(devices: list[tuple[str, str]]) -> tuple[dict, dict]:
    """(params, tags) that say where the ranks ran."""
    params = {"rank_devices": ",".join(d for d, _ in devices)}
    tags = {"device_name": devices[0][1],
            "rank_devices": "; ".join(f"{r}: {d} ({name})" for r, (d, name) in enumerate(devices))}
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None or any(d.startswith("cuda") for d, _ in devices):   # no "(all)" without a GPU
        tags["cuda_visible_devices"] = given if given is not None else "(all)"
    return params, tags


def evaluate(lm, s: RunSettings, task_manager, cache: Path):
    """lm-eval over this rank's shard, through the run's request cache; the results (rank 0
    only), the wall time and how fair the machine was meanwhile (a TimingReport)."""
    from ..evaluation import harness
    from ..tracking.timing import Watch
    watch = Watch(str(lm.device), siblings=lm.world_size > 1).start()
    t0 = time.perf_counter()
    try:
        results = harness.evaluate(lm, s.task, task_manager, limit=s.limit, num_fewshot=s.num_fewshot,
                                   apply_chat_template=s.apply_chat_template,
                                   fewshot_as_multiturn=s.fewshot_as_multiturn, seed=s.seed, cache=cache)
    except BaseException:
        watch.cancel()
        raise
    wall = time.perf_counter() - t0
    return results, wall, watch.stop()


def gather_reports(lm, sampler: GpuSampler | None, timing=None) -> list[RankReport] | None:
    """Every rank's report on rank 0 (None elsewhere); the group is left after it."""
    from ..evaluation import distributed
    mine = RankReport(lm.rank, lm.stats, gpu_report(sampler, str(lm.device)), timing)
    if lm.world_size == 1:
        return [mine]
    reports = distributed.gather_object(mine)
    distributed.leave()
    return reports


def follow(s: RunSettings, placement, task_manager, cache: Path) -> None:
    """A rank other than 0: evaluate its shard and hand its statistics to rank 0; log nothing."""
    sampler = start_sampler(placement.device)
    lm = load_model(s, placement)
    rank_devices(lm)
    _, _, timing = evaluate(lm, s, task_manager, cache)
    gather_reports(lm, sampler, timing)

"""What a tracked run tells its user: progress while it decodes, a result when it ends.

Progress goes to stderr: tqdm's bar on a terminal (requests done of total, generated
tokens/s, ETA); in a log file (a batch job, CI) one line about every 30 s instead, since a
bar there is a wall of carriage returns. The summary goes to stdout.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

from tqdm import tqdm

from .ui import ui_addresses

LINE_EVERY_S = 30.0
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} requests [{elapsed}<{remaining}{postfix}]"


class BundledTaskMetadataHint(logging.Filter):
    """lm-eval suggests `--metadata` for every task that loads its data with a function; the
    bundled tasks do (their data ships with the package) and take no metadata."""

    def __init__(self, tasks: set[str]):
        super().__init__()
        self.tasks = tasks

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("Custom kwargs can be passed to `--metadata`" in msg and msg.split(":")[0] in self.tasks)


def quiet_known_noise(bundled_tasks: set[str]) -> None:
    """Drop the log lines that say nothing about this run (each named, nothing else)."""
    task_log = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, BundledTaskMetadataHint) for f in task_log.filters):
        task_log.addFilter(BundledTaskMetadataHint(bundled_tasks))
    # MLflow's system-metrics monitor narrates its start and stop, and that it skips GPU metrics on a CPU
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


class Progress:
    """Requests done of total, with tokens/s; fed after every batch."""

    def __init__(self, stream=None, every_s: float = LINE_EVERY_S, clock=time.monotonic, desc: str = "decoding"):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s, self.clock, self.desc = every_s, clock, desc
        self.bar: tqdm | None = None
        self.t0 = self.last_line = None

    def update(self, done: int, total: int, tokens: int, seconds: float, unit: str = "tok/s") -> None:
        rate = f"{tokens / seconds:.1f} {unit}" if seconds > 0 else f"- {unit}"
        if self.tty:
            if self.bar is None:
                self.bar = tqdm(total=total, desc=self.desc, unit="req", file=self.stream, dynamic_ncols=True,
                                disable=False)   # a terminal: whatever TQDM_DISABLE says (cli/__init__.py)
            self.bar.total = total
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(rate)
            return
        now = self.clock()
        if self.t0 is None:
            self.t0 = now
        if self.last_line is None or now - self.last_line >= self.every_s or done == total:
            self.last_line = now
            line = tqdm.format_meter(done, total, now - self.t0, prefix=self.desc, postfix=rate,
                                     bar_format=LINE_FORMAT)
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@dataclass
class Summary:
    """The few lines a finished run ends with."""
    run_id: str
    experiment: str
    experiment_id: str
    store: str
    commit: str
    dirty_files: int
    dirty: bool
    task: str
    kind: str                        # generate_until | loglikelihood
    accuracy: tuple | None = None    # (metric, value, stderr or None, n or None)
    metrics: dict | None = None
    resumed_from: str | None = None  # the interrupted run whose request cache this one read
    timing: str | None = None        # the timing_quality tag: clean, or contended and why

    def lines(self) -> list[str]:
        m = self.metrics or {}
        out = []
        if self.accuracy:
            name, value, err, n = self.accuracy
            pm = f" ± {err:.3f}" if err is not None and err == err else ""
            # a count read back from MLflow is a float: print it as the count it is
            count = f"{n:.0f}" if isinstance(n, (int, float)) else "?"
            out.append(f"accuracy  {value:.3f}{pm} (n={count}, {self.task} {name})")
        if self.kind == "loglikelihood":
            out.append(f"speed     {m.get('tokens_per_second', 0):.1f} scored tokens/s, "
                       f"{m.get('scored_tokens', 0):.0f} tokens in {m.get('seconds', 0):.1f} s of scoring "
                       f"(wall {m.get('wall_seconds', 0):.1f} s)")
        else:
            # the tokens this run decoded: a resumed run's generated_tokens count the cached requests too
            decoded = (m.get('tokens_per_second', 0) * m.get('seconds', 0) if "cached_requests" in m
                       else m.get('generated_tokens', 0))
            out.append(f"speed     {m.get('tokens_per_second', 0):.1f} tokens/s, {decoded:.0f} "
                       f"tokens in {m.get('seconds', 0):.1f} s of decoding (wall {m.get('wall_seconds', 0):.1f} s)")
        if self.resumed_from:
            out.append(f"resumed   {m.get('cached_requests', 0):.0f} request(s) came from run {self.resumed_from}'s "
                       "request cache, with their results and statistics; the speed covers the rest")
        if self.timing:
            noise = m.get("tokens_per_second_noise")
            out.append(f"timing    {self.timing}" + (f" (noise ±{noise:.0%})" if noise is not None else ""))
        state = f"dirty: {self.dirty_files} uncommitted file(s)" if self.dirty else "clean"
        out.append(f"code      {self.commit[:12]} ({state})")
        out.append(f"run       {self.run_id} in experiment {self.experiment!r}")
        out.append(f"store     {self.store}")
        serve, run_page, runs_table = ui_addresses(self.store, self.experiment_id, self.run_id)
        out += [f"ui        {serve}"] if serve else []
        out += [f"this run  {run_page}", f"open it   {runs_table}"]
        return out

    def text(self) -> str:
        return "\n".join(self.lines())

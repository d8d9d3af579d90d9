"""What a run prints: progress on a terminal and in a log, the closing summary."""
from __future__ import annotations

import io
import logging

from reuse_exp.tracking.console import BundledTaskMetadataHint, Progress, Summary, ui_addresses


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_log_progress_is_a_line_about_every_30_s():
    out, clock = io.StringIO(), Clock()
    progress = Progress(out, clock=clock)
    for t, done in ((0, 0), (10, 1), (25, 2), (31, 3), (50, 4), (61, 5), (70, 6), (80, 8)):
        clock.t = t
        progress.update(done, 8, tokens=100 * done, seconds=max(t, 1))
    lines = out.getvalue().splitlines()
    # the start, then every 30 s, then the end
    assert [ln.split(" requests")[0] for ln in lines] == ["decoding: 0/8", "decoding: 3/8", "decoding: 5/8",
                                                          "decoding: 8/8"]
    assert "\r" not in out.getvalue()
    assert lines[1] == "decoding: 3/8 requests [00:31<00:51, 9.7 tok/s]"   # done/total [elapsed<ETA, rate]


def test_on_a_terminal_progress_is_a_bar():
    out = Terminal()
    progress = Progress(out)
    progress.update(0, 8, tokens=0, seconds=0)
    progress.update(3, 8, tokens=300, seconds=2.0)
    progress.close()
    text = out.getvalue()
    assert "\r" in text and "3/8" in text and "150.0 tok/s" in text and "decoding" in text


def test_the_summary_says_result_speed_code_run_and_how_to_open_it():
    s = Summary(run_id="abc123", experiment="Default", experiment_id="0", store="sqlite:////data/mlflow.db",
                commit="0123456789abcdef", dirty_files=0, dirty=False, task="tiny_gsm", kind="generate_until",
                accuracy=("exact_match,strict-match", 0.75, 0.2166, 4),
                metrics={"tokens_per_second": 123.45, "generated_tokens": 456, "seconds": 3.7, "wall_seconds": 12.3})
    assert s.lines() == [
        "accuracy  0.750 ± 0.217 (n=4, tiny_gsm exact_match,strict-match)",
        "speed     123.5 tokens/s, 456 tokens in 3.7 s of decoding (wall 12.3 s)",
        "code      0123456789ab (clean)",
        "run       abc123 in experiment 'Default'",
        "store     sqlite:////data/mlflow.db",
        "ui        reuse-exp ui --store sqlite:////data/mlflow.db",
        "this run  http://127.0.0.1:5000/#/experiments/0/runs/abc123?workflowType=machine_learning",
        "open it   http://127.0.0.1:5000/#/experiments/0/runs?workflowType=machine_learning"
        "&viewStateShareKey=reuse_exp_study"]
    s.dirty, s.dirty_files = True, 3
    assert "code      0123456789ab (dirty: 3 uncommitted file(s))" in s.lines()
    s.resumed_from, s.metrics["cached_requests"] = "f00d", 5.0
    assert s.lines()[2] == ("resumed   5 request(s) came from run f00d's request cache, with their results and "
                            "statistics; the speed covers the rest")
    s.timing, s.metrics["tokens_per_second_noise"] = "contended: its threads waited for a CPU 9%", 0.09
    assert s.lines()[3] == "timing    contended: its threads waited for a CPU 9% (noise ±9%)"
    s.resumed_from = None
    assert s.lines()[2] == "timing    contended: its threads waited for a CPU 9% (noise ±9%)"
    serve, run_page, table = ui_addresses("http://tracking:5000/", "7", "abc")
    assert serve is None and run_page.startswith("http://tracking:5000/#/experiments/7/runs/abc?")
    assert table.startswith("http://tracking:5000/#/experiments/7/runs?")


def test_only_the_bundled_tasks_metadata_hint_is_dropped():
    hint = BundledTaskMetadataHint({"tiny_gsm"})

    def keeps(msg: str) -> bool:
        return hint.filter(logging.LogRecord("lm_eval.api.task", logging.WARNING, "", 0, msg, (), None))
    assert not keeps("tiny_gsm: Custom kwargs can be passed to `--metadata` in console (as json string)")
    assert keeps("ruler: Custom kwargs can be passed to `--metadata` in console (as json string)")
    assert keeps("tiny_gsm: something else")

"""The benchmark's own arithmetic, and one small run of it on the CPU."""
import json
import shlex

import pytest
from click.testing import CliRunner

from reuse_exp.cli import main
from reuse_exp.cli.tools import bench as bench_cmd
from reuse_exp.cli.tools import bench_command
from reuse_exp.engine import bench, bench_decode, bench_report


def test_saving_in_situ_compares_skipping_forwards_with_their_kind_and_row_count():
    times = [{"kind": "small_block", "rows": 4, "skip": False, "reusing": 0, "active": 4, "ms": 10.0},
             {"kind": "small_block", "rows": 4, "skip": False, "reusing": 0, "active": 4, "ms": 12.0},
             {"kind": "small_block", "rows": 4, "skip": True, "reusing": 4, "active": 4, "ms": 7.0},
             {"kind": "small_block", "rows": 4, "skip": True, "reusing": 2, "active": 4, "ms": 10.0},
             {"kind": "small_block", "rows": 2, "skip": True, "reusing": 2, "active": 2, "ms": 5.0},  # no match
             {"kind": "full_block", "rows": 4, "skip": False, "reusing": 0, "active": 4, "ms": 20.0}]
    r = bench_decode.saving_in_situ(times, share=0.4)
    # median of the matching plain forwards: 11 ms; saved (11 - 7) + (11 - 10); ideal 11*0.4*(1 + 1/2)
    assert r["saved_ms"] == pytest.approx(5.0) and r["ideal_ms"] == pytest.approx(6.6)
    assert r["of_ideal"] == pytest.approx(5.0 / 6.6)
    assert (r["skipping_forwards"], r["unmatched_forwards"]) == (2, 1)
    assert r["forward_ms"] == pytest.approx(64.0)
    assert bench_decode.saving_in_situ([t for t in times if not t["skip"]], 0.4) is None


@pytest.mark.slow
def test_one_run_gives_a_row_per_batch_size(tmp_path):
    out = tmp_path / "b.json"
    done = CliRunner().invoke(main, ["bench", "--shape", "tiny", "--batch", "1,2", "--k", "1,2", "--new-tokens", "32",
                                     "--prompt-len", "32", "--iters", "1", "--repeats", "1", "--json", str(out),
                                     "--markdown", str(tmp_path / "b.md")])
    assert done.exit_code == 0, done.output
    r = json.loads(out.read_text())
    assert [row["batch"] for row in r["rows"]] == [1, 2]
    assert r["command"].startswith("reuse-exp bench --prompt-len 32 --new-tokens 32 --batch 1,2 --k 1,2")
    assert r["bandwidth_gbs"] > 0 and r["peak_tflops"] > 0 and r["warmup"]["first_call_seconds"] > 0
    for row in r["rows"]:
        assert set(row["forward_ms"]) == {"full_block", "small_block", "finalize"}
        assert row["small_block"]["x_floor"] > 0 and row["full_block"]["of_peak"] > 0
        assert [(e["k"], e["subset"]) for e in row["end_to_end"]] == [(1, "-"), (2, "first")]
        assert row["reuse_forward"][0]["ideal_saving"] > 0
        assert row["kernels"] == {"small_block": None, "full_block": None}   # counted on a GPU only
    assert "| batch |" in (tmp_path / "b.md").read_text()


@pytest.mark.slow
def test_a_recorded_trajectory_gives_its_own_rows_with_fewer_forwards_per_token():
    args = bench.BenchArgs(shape="tiny", device="cpu", batch=(2,), k=(1, 2), extra=("replay:2",), prompt_len=32,
                           new_tokens=64, iters=1, repeats=1, copy_mb=1, matmul_n=64,
                           trajectories=("one-token", "tiny_gsm"))
    r = bench.run_bench(args)
    rows = r.rows[0]["end_to_end"]
    assert [(e["trajectory"], e["k"]) for e in rows] == [("one-token", 1), ("one-token", 2), ("tiny_gsm", 1),
                                                         ("tiny_gsm", 2)]
    assert [e["trajectory"] for e in r.rows[0]["extra"]] == ["one-token", "tiny_gsm"]
    by = {(e["trajectory"], e["k"]): e for e in rows}
    assert by["one-token", 1]["tokens_per_step"] == 1.0 and by["tiny_gsm", 1]["tokens_per_step"] > 2

    def forwards_per_token(e):
        return sum(e["batch_forwards"].values()) / e["tokens"]
    for k in (1, 2):
        assert by["tiny_gsm", k]["tokens"] == by["one-token", k]["tokens"]
        assert forwards_per_token(by["tiny_gsm", k]) < forwards_per_token(by["one-token", k]) / 2
        assert "saving" in by["tiny_gsm", 2]
    text = bench_report.markdown(r)
    assert "| 2 | tiny_gsm | k=1 |" in text and "| 2 | one-token | k=2 first |" in text
    assert "tiny_gsm " + f"{by['tiny_gsm', 1]['tokens_per_step']:.2f} tokens per step" in text
    assert "| 2 | tiny_gsm | replay:2 |" in text


def test_decodes_run_at_the_batch_sizes_asked_and_forwards_at_every_one():
    args = bench.BenchArgs(shape="tiny", device="cpu", batch=(1, 2), k=(1, 2), prompt_len=32, new_tokens=32,
                           iters=1, repeats=1, copy_mb=1, matmul_n=64, decode_batches=(2,))
    r = bench.run_bench(args)
    assert [len(row["end_to_end"]) for row in r.rows] == [0, 2]
    assert all(row["forward_ms"]["small_block"]["median"] > 0 for row in r.rows)
    text = bench_report.markdown(r)
    assert "| 2 | one-token | k=2 first |" in text and "| 1 | one-token |" not in text


def test_an_unknown_trajectory_is_one_line():
    out = CliRunner().invoke(main, ["bench", "--trajectory", "one-token,nope"])
    assert out.exit_code == 1 and "unknown trajectory 'nope'" in out.output and "Traceback" not in out.output


@pytest.mark.parametrize("argv", [[], ["--shape", "7b", "--batch", "1,8", "--subset", "first,last"],
                                  ["--trajectory", "one-token,tiny_gsm", "--decode-batches", "1"],
                                  ["--extra", "replay:2,adaptive-delta:0.5", "--dtype", "float32",
                                   "--json", "b.json"]])
def test_the_recorded_command_repeats_the_benchmark(argv):
    """The command a result records parses back to the same benchmark."""
    params = bench_cmd.make_context("bench", list(argv)).params
    json_out, markdown, quick = params.pop("json_out"), params.pop("markdown"), params.pop("quick")
    command = bench_command(bench.BenchArgs(**params), json_out, markdown)
    again = bench_cmd.make_context("bench", shlex.split(command)[2:]).params
    assert again == {**params, "json_out": json_out, "markdown": markdown, "quick": quick}


def test_a_bad_list_is_one_line():
    out = CliRunner().invoke(main, ["bench", "--batch", "1,x"])
    assert out.exit_code == 2 and "comma list of int" in out.output and "Traceback" not in out.output


def test_each_goal_is_judged_from_its_figure_and_an_unmeasured_one_says_so():
    from reuse_exp.engine.bench_goals import goals
    args = bench.BenchArgs(shape="tiny", device="cpu", batch=(1,), k=(1,), prompt_len=32, new_tokens=32, iters=1,
                           repeats=1, copy_mb=1, matmul_n=64, extra=("adaptive-delta:0",), check_tokens=8)
    r = bench.run_bench(args)
    by = {g["goal"].split(",")[0]: g for g in r.goals}
    assert by["full-block forward"]["met"] is None and by["full-block forward"]["figure"] == "not measured in this run"
    assert by["the default path (static) decodes eager's tokens"]["met"] is True
    assert "decisions of adaptive-delta (drift 0: no skip) against k=1" in by
    row = r.rows[0]
    for x, met in ((1.2, True), (1.3, False)):
        row["small_block"]["x_floor"] = x
        assert {g["goal"]: g["met"] for g in goals(r)}["small-block forward, batch 1"] is met
    row["batch"] = 64
    row["full_block"]["of_peak"] = 0.71
    assert {g["goal"]: g["met"] for g in goals(r)}["full-block forward, batch 64"] is True
    assert "| goal | target | this run | met |" in bench_report.markdown(r)


def test_a_benchmark_killed_after_its_first_row_keeps_that_row(tmp_path):
    """The JSON is rewritten after every batch row: a real SIGKILL once the first row is printed
    leaves a file with that row, marked incomplete; a run to the end marks it complete."""
    import json
    import signal
    import subprocess
    import sys
    out = tmp_path / "b.json"
    cmd = [sys.executable, "-m", "reuse_exp.cli", "bench", "--shape", "tiny", "--device", "cpu", "--batch", "1,2,4,8",
           "--k", "1", "--prompt-len", "32", "--new-tokens", "32", "--iters", "1", "--repeats", "1", "--copy-mb", "1",
           "--matmul-n", "64", "--json", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("batch 1:"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    kept = json.loads(out.read_text())
    assert kept["complete"] is False and [r["batch"] for r in kept["rows"]] == [1]
    assert kept["command"].startswith("reuse-exp bench")

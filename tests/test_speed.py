"""How fair a run's timing was and what its tokens/s can be trusted for: the watch over a real
competing process, GPU throttling through a fake NVML (one that raises too), the regressions
`audit --speed` names in one line, and compare and the frontier refusing or starring
contended rows. Runs are RunRecords built here (no store) except for the CLI's wiring."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from reuse_exp.errors import Refused
from reuse_exp.settings import to_text
from reuse_exp.study import frontier as fr
from reuse_exp.study import frontier_report, speed
from reuse_exp.study.cells import Cell
from reuse_exp.study.compare import Pick, refuse_contended
from reuse_exp.study.frontier_tables import Report, Row, frontier_table
from reuse_exp.study.measures import Accuracy, Ratio
from reuse_exp.study.store import RunRecord
from reuse_exp.tracking import timing
from reuse_exp.tracking.gpu_stats import GpuSampler
from test_tracking import FakeNVML

A, B, C = "a" * 40, "b" * 40, "c" * 40


def report(**kw) -> timing.TimingReport:
    """One rank's report on a quiet machine; `kw` makes it otherwise."""
    values = dict(wall_seconds=10.0, cpu_seconds=9.9, on_cpu_seconds=9.9, waited_seconds=0.05, host_busy_cores=1.0,
                  other_busy_cores=0.02, steal_fraction=0.0, cores=2, torch_threads=1, process_threads_max=9,
                  involuntary_switches=3, probe_before=[0.004] * 15, probe_after=[0.004] * 15)
    return timing.TimingReport(**(values | kw))


# -- one run's verdict ---------------------------------------------------------------------------
def test_a_quiet_rank_is_clean_with_the_noise_floor():
    v = timing.verdict([report()])
    assert v.clean and v.tags() == {"timing_quality": "clean"} and v.metrics()["timing_quality"] == 1.0
    assert v.noise == timing.NOISE_FLOOR and v.metrics()["tokens_per_second_noise"] == timing.NOISE_FLOOR


@pytest.mark.parametrize("kw, why", [
    ({"waited_seconds": 1.0, "busiest_others": [("python", 42, 0.9)]},
     r"its threads waited for a CPU 9% of the time they were runnable \(other processes used 0.0 of 2 cores: "
     r"python \(pid 42\) 0.9\)"),
    ({"on_cpu_seconds": None, "waited_seconds": None, "other_busy_cores": 1.2}, "the host's 2 cores were all busy"),
    ({"steal_fraction": 0.2}, r"the hypervisor took 20% of the CPUs' time \(steal\)"),
])
def test_each_kind_of_contention_is_named(kw, why):
    v = timing.verdict([report(**kw)])
    assert not v.clean and v.metrics()["timing_quality"] == 0.0
    assert v.tag.startswith("contended: ") and __import__("re").search(why, v.tag), v.tag


def test_a_probe_that_drifted_widens_the_noise_and_is_not_contention():
    """The machine's speed at two moments: the decode between them averages it (tracking/timing.py)."""
    v = timing.verdict([report(probe_after=[0.0048] * 15)])
    assert v.clean and v.noise == pytest.approx(0.20)


def test_the_noise_is_the_largest_of_probe_spread_drift_wait_and_other_processes():
    assert report(probe_after=[0.0042] * 15).noise() == pytest.approx(0.05)              # drift
    assert report(waited_seconds=0.5).noise() == pytest.approx(0.5 / 10.4)                # CPU wait
    beside = report(other_busy_cores=1.2)                                                  # never waited
    assert beside.noise() == pytest.approx(timing.OTHERS_NOISE * 0.6) and timing.verdict([beside]).clean
    spread = report(probe_before=[0.004, 0.0041, 0.0043, 0.0046] * 4, probe_after=[0.004, 0.0041, 0.0043, 0.0046] * 4)
    assert spread.probe_drift == 0 and spread.probe_spread > timing.NOISE_FLOOR
    assert spread.noise() == spread.probe_spread


def test_ranks_are_named_and_the_noisiest_is_the_runs():
    v = timing.verdict([report(), report(steal_fraction=0.1, waited_seconds=2.0)])
    assert v.tag.startswith("contended: rank 1: its threads waited") and "rank 0" not in v.tag
    m = v.metrics()
    assert m["rank0/timing_cpu_wait_fraction"] < 0.01 < m["rank1/timing_cpu_wait_fraction"]
    assert m["tokens_per_second_noise"] == pytest.approx(2.0 / 11.9)


def rivals(n: int) -> list[int]:
    """The pids of `n` real processes that keep a core busy each: no imports, started in
    milliseconds, and not this process's children (the watch counts those as the run's own)."""
    shell = subprocess.run(["sh", "-c", " ".join([f"{sys.executable} -S -c 'while True: pass' >/dev/null 2>&1 & "
                                                  "echo $!;"] * n)], capture_output=True, text=True, check=True)
    return [int(pid) for pid in shell.stdout.split()]


def test_a_real_competing_process_makes_the_watch_say_contended():
    """One busy process per core, and this process busy too: its thread waits for a CPU."""
    timing.probe("cpu", 1, 1)   # torch imported before the rivals start, not under them
    busy = rivals(timing.usable_cores())
    try:
        time.sleep(0.2)
        watch = timing.Watch("cpu", interval=0.2, probe_bursts=3).start()
        spin(1.0)
        got = watch.stop()
    finally:
        for pid in busy:
            os.kill(pid, signal.SIGKILL)
    v = timing.verdict([got])
    assert got.wait_fraction > timing.WAIT_LIMIT and got.other_busy_cores > 0.5 * timing.usable_cores(), got
    assert not v.clean and "its threads waited for a CPU" in v.tag
    assert got.busiest_others and all(cores > timing.BUSY_OTHER for _, _, cores in got.busiest_others)
    assert len(got.probe_before) == len(got.probe_after) == 3 and got.load_1m and got.torch_threads >= 1
    record = timing.record([got])[0]
    assert record["wait_fraction"] == got.wait_fraction and record["probe_after"] == got.probe_after


def rival_on(cpu: int, seconds: float) -> subprocess.Popen:
    """A real process busy on `cpu` for `seconds`, started (it said so) when this returns."""
    code = f"import time\nprint(flush=True)\nend = time.time() + {seconds}\nwhile time.time() < end: pass"
    p = subprocess.Popen([sys.executable, "-S", "-c", code], stdout=subprocess.PIPE, text=True,
                         preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    p.stdout.readline()
    return p


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_the_probe_sees_a_competitor_that_stays_and_not_a_spell_that_passes():
    """A real process on this process's CPU: for a quarter second at the probe's start, its
    first bursts run slow and its figure (their median) does not move; for the whole probe, it
    does. One burst at one instant (the probe before it spread its bursts) reads the spell as
    the machine's speed."""
    from statistics import median
    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})
    try:
        quiet = median(timing.probe("cpu", span_s=0.6))
        spell = rival_on(cpu, 0.25)
        passing = timing.probe("cpu", span_s=1.2)
        spell.wait()
        stays = rival_on(cpu, 5.0)
        staying = timing.probe("cpu", span_s=1.2)
        stays.kill()
        stays.wait()
    finally:
        os.sched_setaffinity(0, before)
    assert max(passing) > 1.4 * quiet, (quiet, passing)          # the spell was there
    assert median(passing) < 1.25 * quiet, (quiet, passing)     # and is not the figure
    assert median(staying) > 1.4 * quiet, (quiet, staying)


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


# -- GPU clocks and throttle reasons through NVML ----------------------------------------------
def sampled(monkeypatch, fake: FakeNVML) -> dict:
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    sampler = GpuSampler(0, interval=0.005).start()
    time.sleep(0.1)
    return sampler.stop()


def test_a_gpu_slowed_by_heat_makes_the_run_contended(monkeypatch):
    fake = FakeNVML(None)
    fake.reasons = 0x40 | 0x4        # hw thermal slowdown, and the power cap (which alone is no contention)
    gpu = sampled(monkeypatch, fake)
    assert gpu["gpu_sm_clock_mean_mhz"] == 1500 and gpu["gpu_sm_clock_limit_mhz"] == 1980
    assert gpu["gpu_throttled_fraction"] == 1.0 and int(gpu["gpu_throttle_reasons"]) == 0x44
    v = timing.verdict([report()], [gpu])
    assert v.tag == "contended: the GPU's clocks were slowed (hw_thermal_slowdown) in 100% of the samples"
    fake.reasons = 0x4 | 0x1
    assert timing.verdict([report()], [sampled(monkeypatch, fake)]).clean


def test_several_gpus_slowed_one_is_the_runs_throttling():
    from reuse_exp.tracking.gpu_stats import combine
    both = combine([{"gpu_throttled_fraction": 0.0, "gpu_throttle_reasons": 1.0, "gpu_sm_clock_min_mhz": 1900.0},
                    {"gpu_throttled_fraction": 0.5, "gpu_throttle_reasons": 0x40, "gpu_sm_clock_min_mhz": 900.0}])
    assert both["gpu_throttled_fraction"] == 0.5 and both["gpu_throttle_reasons"] == 0x41
    assert both["gpu_sm_clock_min_mhz"] == 900.0


@pytest.mark.parametrize("failing, lost", [("nvmlDeviceGetCurrentClocksEventReasons", "gpu_throttled_fraction"),
                                           ("nvmlDeviceGetClockInfo", "gpu_sm_clock_mean_mhz"),
                                           ("nvmlInit", "gpu_throttled_fraction")])
def test_a_gpu_without_the_clock_fields_still_runs_and_judges(monkeypatch, failing, lost):
    fake = FakeNVML(failing)
    fake.reasons = 0x40
    gpu = sampled(monkeypatch, fake)
    assert lost not in gpu
    assert timing.verdict([report()], [gpu]).clean == ("gpu_throttled_fraction" not in gpu)


# -- regressions between commits: audit --speed ----------------------------------------------
def run(commit: str, tps: float, start: int, quality: str = "clean", noise: float | None = 0.02,
        probe: float = 0.004, key: str = "cfg", **tags) -> RunRecord:
    metrics = {"tokens_per_second": tps, "probe_seconds_before": probe, "probe_seconds_after": probe}
    if noise is not None:
        metrics["tokens_per_second_noise"] = noise
    t = {"git_commit": commit, "git_dirty": "false", "config_key": key, "mlflow.runName": "k2_middle_tiny_gsm",
         "env.torch_threads": "1", **({"timing_quality": quality} if quality else {}), **tags}
    return RunRecord(f"{commit[0]}{start:031d}", "FINISHED", start, {"task": "tiny_gsm", "k": "2"}, t, metrics)


def test_a_ten_percent_slower_commit_is_named_in_one_line():
    regressions, notes = speed.speed_changes([run(A, 100.0, 1), run(B, 90.0, 2)])
    assert [r.line for r in regressions] == ["k2_middle_tiny_gsm: 10 % slower at bbbbbbb than at aaaaaaa (noise 4 %)"]
    assert regressions[0].run_id == run(B, 90.0, 2).run_id and notes == []


def test_inside_the_noise_is_nothing_and_faster_is_a_note():
    assert speed.speed_changes([run(A, 100.0, 1), run(B, 97.0, 2)]) == ([], [])
    assert speed.speed_changes([run(A, 100.0, 1), run(B, 90.0, 2, noise=0.09)]) == ([], [])
    regressions, notes = speed.speed_changes([run(A, 100.0, 1), run(B, 120.0, 2)])
    assert regressions == [] and notes == ["k2_middle_tiny_gsm: 20 % faster at bbbbbbb than at aaaaaaa (noise 4 %)"]


def test_a_contended_or_unrecorded_commit_is_never_a_regression():
    runs = [run(A, 100.0, 1), run(B, 50.0, 2, quality="contended: its threads waited"), run(C, 99.0, 3)]
    regressions, notes = speed.speed_changes(runs)
    assert regressions == [] and notes == ["k2_middle_tiny_gsm at bbbbbbb: not compared, contended: its threads waited"]
    regressions, notes = speed.speed_changes([run(A, 100.0, 1), run(B, 50.0, 2, quality=None, noise=None)])
    assert regressions == [] and "not compared, no timing quality recorded" in notes[0]
    # a clean repeat at the commit is what counts; the contended one beside it is left out
    regressions, _ = speed.speed_changes(runs + [run(B, 80.0, 4)])
    assert [r.line.split(" (")[0] for r in regressions] == ["k2_middle_tiny_gsm: 20 % slower at bbbbbbb than at aaaaaaa"]


def test_commits_are_compared_in_order_with_the_one_before_only():
    """In the order they were first measured (B, C, A here), not by name; a re-run stays in place."""
    runs = [run(A, 80.0, 3), run(B, 100.0, 1), run(C, 100.0, 2), run(B, 100.0, 9)]   # B re-run later
    assert [r.line.split(":")[1] for r in speed.speed_changes(runs)[0]] == [" 20 % slower at aaaaaaa than at ccccccc (noise 4 %)"]


def test_other_machines_other_threads_or_configurations_are_not_compared():
    assert speed.speed_changes([run(A, 100.0, 1), run(B, 50.0, 2, key="other")]) == ([], [])
    assert speed.speed_changes([run(A, 100.0, 1), run(B, 50.0, 2, **{"env.torch_threads": "2"})]) == ([], [])
    assert speed.speed_changes([run(A, 100.0, 1), run(B, 50.0, 2, **{"env.device": "NVIDIA H100"})]) == ([], [])
    regressions, notes = speed.speed_changes([run(A, 100.0, 1), run(B, 70.0, 2, probe=0.005)])
    assert regressions == [] and "not compared: the fixed probe ran 25 % slower there" in notes[0]


def test_repeats_at_a_commit_give_their_median_with_the_noise_of_a_median():
    spread = speed.AtCommit(A, (run(A, 100.0, 1), run(A, 80.0, 2), run(A, 90.0, 3)), 1)
    assert spread.tokens_per_second == 90.0 and spread.noise == pytest.approx(2 * 10 / 90 / 3 ** 0.5)
    steady = speed.AtCommit(A, tuple(run(A, 100.0, i, noise=0.08) for i in range(4)), 0)
    assert steady.noise == pytest.approx(0.08 / 2)
    # four runs a commit: a 10 % slowdown through runs whose own noise (8 %) hides it one by one
    single = [run(A, 100.0, 1, noise=0.08), run(B, 90.0, 2, noise=0.08)]
    assert speed.speed_changes(single) == ([], [])
    repeated = [run(A, 100.0 + i, i, noise=0.08) for i in range(4)] + [run(B, 90.0 + i, 10 + i, noise=0.08)
                                                                       for i in range(4)]
    assert [r.line for r in speed.speed_changes(repeated)[0]] == [
        "k2_middle_tiny_gsm: 10 % slower at bbbbbbb than at aaaaaaa (noise 8 %)"]


def test_a_machine_slower_for_one_run_widens_the_noise():
    line = speed.speed_changes([run(A, 100.0, 1), run(B, 80.0, 2, probe=0.0042)])[0][0].line
    assert line.endswith("(noise 16 %)")          # 2 % + 2 % + 2.5 x ln(1.05)
    assert speed.speed_changes([run(A, 100.0, 1), run(B, 85.0, 2, probe=0.0042)]) == ([], [])


def test_the_audit_fails_on_a_regression_and_notes_the_rest(tmp_path_factory, tmp_path):
    from reuse_exp.cli.study import audit_cmd
    from services.fabricate import fabricate
    from services.store import new_store
    store = new_store(tmp_path_factory.getbasetemp(), tmp_path)
    quiet = {"tokens_per_second_noise": 0.02, "probe_seconds_before": 0.004, "probe_seconds_after": 0.004}
    for commit, tps, quality, start in ((A, 100.0, "clean", 1000), (B, 80.0, "clean", 2000),
                                        (C, 40.0, "contended: the hypervisor took 30%", 3000)):
        fabricate(store.client, store.exp_id, k=2, subset="middle", commit=commit, tps=tps, start_ms=start,
                  tags={"timing_quality": quality, "mlflow.runName": "k2_middle_tiny_gsm"}, extra_metrics=quiet)
    cli = CliRunner()
    plain = cli.invoke(audit_cmd, ["--experiment", store.experiment], env=store.env)
    assert plain.exit_code == 0, plain.output           # without --speed, speed is not the audit's business
    out = cli.invoke(audit_cmd, ["--experiment", store.experiment, "--speed"], env=store.env)
    assert out.exit_code == 1 and "audit failed: 1 finding(s)" in out.output, out.output
    assert "  k2_middle_tiny_gsm: 20 % slower at bbbbbbb than at aaaaaaa (noise 4 %)" in out.output
    assert "speed: k2_middle_tiny_gsm at ccccccc: not compared, contended: the hypervisor took 30%" in out.output


# -- compare and the frontier: contended rows refused or starred, noise shown --------------------
def test_compare_refuses_a_contended_cell_keeps_clean_repeats_and_stars_on_request():
    cell = Cell(axes=(("k", 2), ("subset", "first")), settings=(("k", 2), ("subset", "first")))
    fair, busy = run(A, 100.0, 1), run(A, 60.0, 2, quality="contended: its threads waited for a CPU 40%")
    with pytest.raises(Refused, match=r"k2_first run b?\w{8}@aaaaaaa: contended: its threads waited.*--allow-contended"):
        refuse_contended([Pick(cell, busy)], allowed=False)
    kept = refuse_contended([Pick(cell, busy, repeats=(busy, fair))], allowed=False)[0]
    assert kept.runs == (fair,) and not kept.contended
    starred = refuse_contended([Pick(cell, busy)], allowed=True)[0]
    assert starred.contended and not starred.starred


def test_compare_shows_the_noise_calls_a_ratio_inside_it_noise_and_refuses_a_contended_cell(tmp_path_factory,
                                                                                              tmp_path):
    from reuse_exp.cli.study import compare_cmd
    from reuse_exp.study.store import git_head
    from services.fabricate import fabricate
    from services.store import new_store
    store, head = new_store(tmp_path_factory.getbasetemp(), tmp_path), git_head()
    quiet = {"tokens_per_second_noise": 0.03, "probe_seconds_before": 0.004, "probe_seconds_after": 0.004}
    for k, subset, rate, quality in ((1, "middle", 100.0, "clean"), (2, "first", 104.0, "clean"),
                                     (2, "middle", 150.0, "contended: its threads waited for a CPU 30%")):
        fabricate(store.client, store.exp_id, k=k, subset=subset, commit=head, rates=[rate],
                  tags={"timing_quality": quality}, extra_metrics=quiet)
    args = ["--task", "tiny_gsm", "--limit", "4", "--k", "1,2", "--subset", "first,middle", "--no-log"]
    cli = CliRunner(env=store.env)
    refused = cli.invoke(compare_cmd, args)
    assert refused.exit_code == 1 and "refusing runs whose timing was contended" in refused.output, refused.output
    assert "k2_middle run" in refused.output and "--allow-contended" in refused.output and "k2_first" not in refused.output
    out = cli.invoke(compare_cmd, args + ["--allow-contended"])
    assert out.exit_code == 0, out.output
    rows = {line.split()[0]: line for line in out.output.splitlines() if line.startswith("k")}
    assert "100.0 (1) ±3%" in rows["k1_any"]
    assert "~1 (noise)" in rows["k2_first"] and "±6% (runs)" in rows["k2_first"]   # 4 % inside 3 % + 3 %
    assert "1.50x" in rows["k2_middle*"]
    assert "* contended: its threads waited for a CPU 30%" in out.output


def test_a_ratio_inside_the_runs_noise_is_noise():
    assert Ratio(1.04, None, None, 1, noise=0.05).text() == "~1 (noise)"
    assert Ratio(1.06, None, None, 1, noise=0.05).text() == "1.06x"
    assert Ratio(1.06, None, None, 1, noise=0.05).interval_text() == "±5% (runs)"
    assert Ratio(1.06, 1.02, 1.10, 8, noise=0.08).within_noise        # the interval misses 1; the noise does not
    assert Ratio(1.06, None, None, 1).text() == "1.06x?"


def frontier_row(config, r: RunRecord) -> Row:
    return Row(config, r, Accuracy(4, 3, 0.75, 0.25), [{"task": "tiny_gsm", "doc_id": 0, "correct": True,
                                                          "output": "x"}])


def test_the_frontier_refuses_contended_rows_or_stars_them_with_the_reason():
    base, other = fr.CONFIGS[0], fr.CONFIGS[1]
    cells = [fr.cell_of(base, 4), fr.cell_of(other, 4)]
    params = [{"subset": "first"} | {n: to_text(v) for n, v in c.settings} for c in cells]   # a run logs every setting
    fair = [RunRecord(f"r{i}" + "0" * 30, "FINISHED", 10 + i, p, run(A, 100.0, 1).tags, run(A, 319.4, 1).metrics)
            for i, p in enumerate(params)]
    busy = RunRecord("busy" + "0" * 28, "FINISHED", 99, params[1], run(A, 1.0, 1, quality="contended: steal").tags,
                     run(A, 120.0, 1).metrics)
    assert frontier_report.pick(cells, fair + [busy], False)[1] is fair[1]   # the clean run at its commit wins
    with pytest.raises(Refused, match=r"contended.*output k=2 first \(busy0000@aaaaaaa\).*--rerun-contended"):
        frontier_report.pick(cells, [fair[0], busy], False)
    picked = frontier_report.pick(cells, [fair[0], busy], False, allow_contended=True)
    table = frontier_table(Report([frontier_row(base, picked[0]), frontier_row(other, picked[1])], None, 4, "f"))
    assert "| 319 ±2% |" in table and "| 120 ±2%* |" in table
    assert "\\* output k=2 first (busy0000): timing contended: steal" in table

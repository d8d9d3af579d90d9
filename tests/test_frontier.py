"""The frontier: its configurations run as tracked runs, and a report that reads them back.

End to end (three configurations, two tiny_gsm items, the bundled model): the grid ends
FINISHED runs at the checkout's commit, and the report's figures are the runs' own (lm-eval's
per-sample records through measures.py, the logged metrics). With fabricated runs: a FAILED or
dirty run is never a row, runs of two commits are refused or flagged, one row per configuration.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from reuse_exp.study import frontier as fr
from reuse_exp.study import frontier_report as report
from reuse_exp.study.compare import Refused
from reuse_exp.study.frontier_tables import dominated_by, frontier_table
from reuse_exp.study.measures import accuracy, pair
from services.checkout import clean_checkout
from services.fabricate import fabricate
from services.store import new_store

BY_NAME = {c.name: c for c in fr.CONFIGS}
SOME = (BY_NAME["k=1"], BY_NAME["output k=2 first"], BY_NAME["adaptive delta 1"])
LIMIT = 2


# -- end to end --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """SOME run by the frontier's grid from a clean checkout, into a fresh store."""
    tmp = tmp_path_factory.mktemp("frontier")
    repo = clean_checkout(tmp / "repo")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    script = ("import sys; from reuse_exp.study import frontier as fr\n"
              "some = tuple(c for c in fr.CONFIGS if c.name in sys.argv[1:])\n"
              f"sys.exit(len(fr.run({LIMIT}, 'frontier', configs=some, mc=None, folder=fr.Path(r'{tmp / 'jobs'}'))))")
    cmd = [sys.executable, "-c", script, *(c.name for c in SOME)]
    first = subprocess.run(cmd, cwd=repo.root, env=repo.env(MLFLOW_TRACKING_URI=uri), capture_output=True,
                           text=True, timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr
    again = subprocess.run(cmd, cwd=repo.root, env=repo.env(MLFLOW_TRACKING_URI=uri), capture_output=True,
                           text=True, timeout=300)
    return {"uri": uri, "head": repo.head, "first": first.stdout, "again": again.stdout}


@pytest.mark.slow
def test_the_grid_ends_finished_runs_at_the_commit(ran):
    import mlflow
    cl = mlflow.MlflowClient(ran["uri"])
    runs = cl.search_runs([cl.get_experiment_by_name("frontier").experiment_id])
    assert len(runs) == len(SOME)
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["git_commit"] for r in runs} == {ran["head"]}
    assert all(f"] {c.name}" in ran["first"] for c in SOME), ran["first"]
    assert f"nothing to run: all {len(SOME)} configuration(s) done" in ran["again"]


def per_sample(cl, run_id: str, tmp_path) -> list[dict]:
    """The artifact as the run wrote it, read here without the report's code."""
    path = cl.download_artifacts(run_id, "per_sample.jsonl", str(tmp_path))
    return [json.loads(line) for line in open(path) if line.strip()]


@pytest.mark.slow
def test_the_report_is_the_runs_figures(ran, tmp_path, monkeypatch):
    import mlflow
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ran["uri"])
    # figures, whatever the machine did meanwhile: a run of the suite's beside another may be contended
    built = report.build(LIMIT, "frontier", configs=SOME, mc=None, allow_contended=True)
    assert [r.name for r in built.rows] == [c.name for c in SOME]
    cl = mlflow.MlflowClient(ran["uri"])
    base = per_sample(cl, built.rows[0].run.run_id, tmp_path / "base")
    for row in built.rows:
        run = cl.get_run(row.run.run_id)
        assert run.info.status == "FINISHED" and row.run.commit == ran["head"]
        m = run.data.metrics
        records = per_sample(cl, row.run.run_id, tmp_path / row.run.run_id)
        assert row.accuracy == accuracy(records)
        assert row.accuracy.n == len(records) == m["n_samples"] == LIMIT
        assert row.accuracy.mean == pytest.approx(m["accuracy"])           # lm-eval's aggregate
        assert row.accuracy.stderr == pytest.approx(m["accuracy_stderr"])  # and its stderr
        assert (row.skipped, row.replayed, row.tokens_per_second) == (
            m["skipped_fraction"], m.get("replayed_fraction", 0.0), m["tokens_per_second"])
        assert row.figures()["tokens_per_second_noise"] == m["tokens_per_second_noise"]
        assert row.contended == (run.data.tags["timing_quality"] != "clean")
        if not row.config.baseline:
            assert row.paired == pair(base, records)
    paths = report.write(built, tmp_path / "out")
    md, raw = paths["md"].read_text(), json.loads(paths["json"].read_text())
    assert all(f"{r.run.run_id[:8]}@{ran['head'][:7]}" in md for r in built.rows)
    assert all(f"| {r.speed_text()} |" in md and "±" in r.speed_text() for r in built.rows)
    assert raw["commits"] == {ran["head"][:7]: len(SOME)} and raw["mixed_commits"] is False
    assert {n: v["run_id"] for n, v in raw["results"].items()} == {r.name: r.run.run_id for r in built.rows}
    assert raw["commands"][0] == f"reuse-exp frontier run --limit {LIMIT} --experiment frontier"
    assert paths["png"].stat().st_size > 0


# -- fabricated runs ---------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path_factory, tmp_path):
    return new_store(tmp_path_factory.getbasetemp(), tmp_path, experiment="frontier")


def make(store, config, commit: str, correct: list[bool], outputs: list[str] | None = None, **kw) -> str:
    """A run of `config` with the tracked run's params, as the frontier's cell asks for them."""
    settings = dict(fr.cell_of(config, 4).settings)   # a run logs every setting: those not passed at their defaults
    task, k, subset = settings.pop("task"), settings.pop("k", 1), settings.pop("subset", "first")
    return fabricate(store.client, store.exp_id, task=task, k=k, subset=subset, commit=commit,
                     correct=correct, outputs=outputs, **settings, **kw)


HEAD, OTHER = "a" * 40, "b" * 40
TRUTH = [True, True, False, True]


def fill(store, commit=HEAD):
    return {c.name: make(store, c, commit, TRUTH if c.name == "k=1" else [True, False, False, True],
                         ["x", "y", "z", "w"] if c.name != "k=1" else None) for c in SOME}


def test_one_row_per_configuration_paired_against_k1(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    ids = fill(store)
    built = report.build(4, "frontier", configs=SOME, mc=None)
    assert len(built.rows) == len(SOME) and [r.run.run_id for r in built.rows] == [ids[c.name] for c in SOME]
    row = built.row("output k=2 first")
    assert (row.accuracy.n, row.accuracy.correct, row.accuracy.mean) == (4, 2, 0.5)
    assert (row.paired.changed, row.paired.correct_to_wrong, row.paired.wrong_to_correct) == (4, 1, 0)
    assert "| output k=2 first | " + ids["output k=2 first"][:8] + "@aaaaaaa |" in frontier_table(built)


def test_a_failed_or_dirty_run_is_never_a_row(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    ids = fill(store)
    later = {"start_ms": 2 ** 42}
    make(store, SOME[1], HEAD, [True] * 4, status="FAILED", **later)
    make(store, SOME[1], HEAD, [True] * 4, dirty=True, **later)
    assert report.build(4, "frontier", configs=SOME, mc=None).row(SOME[1].name).run.run_id == ids[SOME[1].name]
    only_failed = fr.config("output", "k=3 last", k=3, subset="last", mode="output")
    make(store, only_failed, HEAD, [True] * 4, status="FAILED")
    with pytest.raises(Refused, match="no FINISHED clean run of output k=3 last"):
        report.build(4, "frontier", configs=(*SOME, only_failed), mc=None)


def test_runs_of_two_commits_are_refused_or_flagged(store, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    fill(store)
    make(store, SOME[2], OTHER, [True] * 4, start_ms=2 ** 42)   # the newest of its configuration
    with pytest.raises(Refused, match="2 commits.*aaaaaaa.*bbbbbbb"):
        report.build(4, "frontier", configs=SOME, mc=None)
    built = report.build(4, "frontier", configs=SOME, mc=None, allow_mixed=True)
    assert built.mixed and built.commits == {"aaaaaaa": 2, "bbbbbbb": 1}
    md = report.write(built, tmp_path / "out")["md"].read_text()
    assert "**Mixed commits: aaaaaaa (2 runs), bbbbbbb (1 run).**" in md and "@bbbbbbb |" in md


def test_frontier_run_reruns_a_configuration_whose_runs_were_all_contended(store, monkeypatch):
    from reuse_exp.study.store import git_head
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    head = git_head()
    busy = {"timing_quality": "contended: its threads waited for a CPU 40%"}
    make(store, SOME[0], head, TRUTH)
    make(store, SOME[1], head, TRUTH, tags=busy)
    make(store, SOME[2], head, TRUTH, tags=busy)
    make(store, SOME[2], head, TRUTH, start_ms=1000)            # a clean run of it too: done
    plan = []
    fr.run(4, "frontier", dry_run=True, echo=plan.append, configs=SOME, mc=None)
    assert plan[-1].startswith("nothing to run: all 3 configuration(s) done"), plan
    plan.clear()
    fr.run(4, "frontier", dry_run=True, echo=plan.append, configs=SOME, mc=None, rerun_contended=True)
    assert [line for line in plan if line.startswith("would run")] == [f"would run {SOME[1].name}"], plan


def test_tiny_mc_row_states_its_n_and_the_readme_sections(store, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    fill(store)
    make(store, fr.MC, HEAD, [True, False, False, False, True], kind="loglikelihood")
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- frontier:start -->\nSTALE TEXT\n<!-- frontier:end -->\nb\n"
                      "<!-- tiny_table:start -->\nSTALE TEXT\n<!-- tiny_table:end -->\nc\n")
    built = report.build(4, "frontier", configs=SOME, mc=fr.MC)
    report.write(built, tmp_path / "docs", readme)
    text = readme.read_text()
    assert "tiny_mc (5 items, run " in text and "): 40.0% ± 24.5%." in text
    assert "STALE TEXT" not in text and "![frontier](docs/frontier.png)" in text
    assert "reuse-exp frontier report --limit 4 --experiment frontier" in text


def test_the_declaration_adds_a_row_in_one_line():
    """A new policy's row is one `config(...)` in CONFIGS: its cell passes its settings to the run."""
    toy = fr.config("toy delta", "1", policy="depth", mode="delta", drift=1.5, max_reuse=8)
    cell = fr.cells(200, (*fr.CONFIGS, toy))[-2]
    assert cell.name == "toy delta 1" and {("policy", "depth"), ("drift", 1.5), ("limit", 200),
                                             ("batch_size", 200), ("device", "cpu")} <= set(cell.settings)
    assert toy.learned and len(fr.cells()) == len(fr.CONFIGS) + 1
    with pytest.raises(Exception, match="twice"):
        fr.cells(4, (*fr.CONFIGS, fr.CONFIGS[3]))


def test_a_row_is_at_its_baseline_by_its_own_policy():
    """The row every other is paired against is where its policy never reuses (the policy's
    `baseline`): k=1 for the fixed policy, drift 0 for the adaptive one, whatever its k."""
    assert [c.name for c in fr.CONFIGS if c.baseline] == ["k=1"]
    assert fr.config("a", policy="adaptive", mode="delta", drift=0.0).baseline
    assert not fr.config("a", policy="adaptive", mode="delta", drift=0.5, k=1).baseline


@pytest.mark.parametrize("skip, dominated", [(0.3, True), (0.1, False)])
def test_dominance_needs_at_least_the_skip_and_more_accuracy(store, monkeypatch, skip, dominated):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    make(store, SOME[0], HEAD, TRUTH)
    make(store, SOME[1], HEAD, [True, False, False, True], skipped=0.2)
    make(store, SOME[2], HEAD, [True, True, False, True], skipped=skip)
    built = report.build(4, "frontier", configs=SOME, mc=None)
    assert dominated_by(built.rows, "output k=2 first") == (["adaptive delta 1"] if dominated else [])
    goal = "met by adaptive delta 1." if dominated else "not met by any threshold measured."
    assert goal in frontier_table(built)

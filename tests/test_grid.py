"""Grid status and planning against runs fabricated in a temporary sqlite store (fast)."""
from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

from reuse_exp.errors import SettingError
from reuse_exp.study.cells import LOGLIKELIHOOD, GridRequest, build_request, run_command, task_kind
from reuse_exp.study.grid import DONE, FAILED, MISSING, RUNNING, STALE, classify, todo
from reuse_exp.study.store import RunRecord, fetch_runs, store_error
from services.fabricate import fabricate
from services import store as stores
from reuse_exp.cli import study as cli_study
from reuse_exp.tracking.heartbeat import stamp
from reuse_exp.tracking.schema import HEARTBEAT_TAG, REFUSED_TAG

store = stores.fabricated_store   # a Store of its own per test (services/store.py)
head = stores.head

OLD = "0" * 40


def request4(**kw) -> GridRequest:
    return build_request("tiny_gsm", k=kw.get("ks", "1,2,3"), subset=kw.get("subsets", "first,middle,last"), limit=4,
                         params=kw.get("params", ()))


def states_of(store, head, req=None, now_ms=None, stale_after=3600.0):
    req = req or request4()
    runs = fetch_runs(store.client, store.exp_id, "tiny_gsm")
    now_ms = now_ms or int(time.time() * 1000)
    return {c.name: classify(c, runs, head, now_ms, stale_after) for c in req.cells("generate_until")}


def test_each_state_of_a_cell(store, head):
    c, e = store.client, store.exp_id
    done = fabricate(c, e, k=1, subset="first", commit=head)
    stale = fabricate(c, e, k=1, subset="middle", commit=OLD)
    fabricate(c, e, k=1, subset="last", commit=head, dirty=True)                 # dirty is never done
    failed = fabricate(c, e, k=2, subset="first", commit=head, status="FAILED")
    fabricate(c, e, k=2, subset="first", commit=OLD)                             # ...and stale elsewhere
    running = fabricate(c, e, k=2, subset="middle", commit=head, status="RUNNING")
    dead = fabricate(c, e, k=2, subset="last", commit=head, status="RUNNING",
                     start_ms=int(time.time() * 1000) - 7200_000)                # no heartbeat for 2 h
    fabricate(c, e, k=3, subset="first", commit=head, limit="8")                # other settings: not this grid
    fabricate(c, e, k=3, subset="middle", commit=head, threshold="0.5")
    st = states_of(store, head)
    assert {n: s.state for n, s in st.items()} == {
        "k1_any": DONE, "k2_first": FAILED, "k2_middle": RUNNING,
        "k2_last": FAILED, "k3_first": MISSING, "k3_middle": MISSING, "k3_last": MISSING}
    assert st["k1_any"].runs[0].run_id == done   # the baseline: the k=1 run at HEAD, whatever its subset
    c.delete_run(done)
    again = states_of(store, head)["k1_any"]   # left: the dirty k1_last at HEAD and k1_middle elsewhere
    assert again.state == STALE and stale in [r.run_id for r in again.runs]
    assert st["k2_first"].runs[0].run_id == failed
    assert st["k2_middle"].runs[0].run_id == running
    assert st["k2_last"].runs[0].run_id == dead and "dead" in st["k2_last"].note
    assert f"reuse-exp runs end {dead}" in st["k2_last"].note


def test_a_run_is_alive_while_its_heartbeat_is_recent(store, head):
    """Age is not death: a 2-hour-old run that beat a minute ago is running; one whose last
    beat is older than --stale-after is dead, and its configuration is not done."""
    now = time.time()
    old_start = int(now * 1000) - 7200_000
    alive = fabricate(store.client, store.exp_id, k=2, subset="first", commit=head, status="RUNNING",
                      start_ms=old_start, tags={HEARTBEAT_TAG: stamp(now - 60)})
    dead = fabricate(store.client, store.exp_id, k=2, subset="middle", commit=head, status="RUNNING",
                     start_ms=old_start, tags={HEARTBEAT_TAG: stamp(now - 420)})
    st = states_of(store, head, stale_after=300)
    assert st["k2_first"].state == RUNNING and st["k2_first"].runs[0].run_id == alive
    assert st["k2_middle"].state == FAILED and st["k2_middle"].runs[0].run_id == dead
    assert "last heartbeat" in st["k2_middle"].note and "(7m ago)" in st["k2_middle"].note
    assert [c.name for c in todo(list(st.values()), force=False)].count("k2_middle") == 1
    assert "k2_first" not in [c.name for c in todo(list(st.values()), force=False)]


def test_threshold_setting_separates_grids(store, head):
    """A run with a non-default setting counts only for a grid that asks for it."""
    fabricate(store.client, store.exp_id, k=3, subset="middle", commit=head, threshold="0.5")
    default = states_of(store, head)["k3_middle"]
    assert default.state == MISSING   # the grid pins the run's default threshold (0.9)
    asked = states_of(store, head, request4(params=("threshold=0.50",)))["k3_middle"]  # numbers compare as numbers
    assert asked.state == DONE
    other = states_of(store, head, request4(params=("threshold=0.7",)))["k3_middle"]
    assert other.state == MISSING


def test_status_command_prints_the_grid(store, head):
    fabricate(store.client, store.exp_id, k=1, subset="first", commit=head)
    fabricate(store.client, store.exp_id, k=2, subset="last", commit=OLD)
    out = CliRunner(env=store.env).invoke(cli_study.grid, ["status", "--task", "tiny_gsm", "--limit", "4"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].startswith("grid tiny_gsm") and head[:7] in lines[0]
    assert lines[1].split() == ["first", "middle", "last"]
    assert lines[2].startswith("k=1   done") and "one run for every subset" in lines[2]
    assert lines[3].split() == ["k=2", "missing", "missing", "stale@0000000"]
    assert "done at HEAD 1/7, stale 1, failed 0, running 0, missing 5" in out.output


def test_dry_run_plans_only_what_is_not_done(store, head):
    fabricate(store.client, store.exp_id, k=1, subset="middle", commit=head)
    fabricate(store.client, store.exp_id, k=2, subset="middle", commit=OLD)
    args = ["run", "--task", "tiny_gsm", "--limit", "4", "--k", "1,2", "--dry-run"]
    out = CliRunner(env=store.env).invoke(cli_study.grid, args)
    assert out.exit_code == 0, out.output
    assert "skip k1_any: done" in out.output      # k=1 runs once, whatever the subsets
    planned = [line.split()[2].rstrip(":") for line in out.output.splitlines() if line.startswith("would run")]
    assert planned == ["k2_first", "k2_middle", "k2_last"]
    forced = CliRunner(env=store.env).invoke(cli_study.grid, args + ["--force"])
    assert forced.output.count("would run") == 4
    k1 = next(line for line in forced.output.splitlines() if line.startswith("would run k1_any"))
    assert "--k 1" in k1 and "--subset" not in k1


def test_loglikelihood_grid_is_one_run_and_says_why(store, head):
    assert task_kind("tiny_mc") == LOGLIKELIHOOD
    out = CliRunner(env=store.env).invoke(cli_study.grid, ["status", "--task", "tiny_mc", "--limit", "4"])
    assert out.exit_code == 0, out.output
    assert "loglikelihood task" in out.output and "grid is one run (k=1)" in out.output
    assert "done at HEAD 0/1" in out.output
    plan = CliRunner(env=store.env).invoke(cli_study.grid, ["run", "--task", "tiny_mc", "--dry-run"])
    assert plan.output.count("would run") == 1


def test_task_kind_prefers_what_runs_recorded():
    run = RunRecord("r", "FINISHED", 0, {}, {"task_kind": "loglikelihood"}, {})
    assert task_kind("anything", [run]) == LOGLIKELIHOOD
    assert task_kind("gsm8k") == "generate_until" and task_kind("mmlu") == LOGLIKELIHOOD


@pytest.mark.parametrize("args,fix", [(["--k", "one"], "k=one: give a whole number"), (["--k", "0"], ">= 1"),
                                      (["--subset", "top"], "use first, middle, last or layer indices"),
                                      (["--limit", "1.5"], "limit=1.5: a limit of 1 or more must be a whole"),
                                      (["--mode", "bar"], "mode=bar: use one of output, delta, replay"),
                                      (["-P", "threshold"], "NAME=VALUE"), (["-P", "k=2"], "use --k"),
                                      (["-P", "policy=nope"], "unknown policy 'nope'; use one of adaptive"),
                                      (["--drift", "0.5"], "--drift: the fixed policy does not read drift"),
                                      (["--mode", "output,delta"], "mode is not a grid axis of the fixed policy"),
                                      (["-P", "policy=adaptive", "--k", "2"], "the adaptive policy does not read k")])
def test_bad_input_is_one_line_naming_the_fix(store, args, fix):
    out = CliRunner(env=store.env).invoke(cli_study.grid, ["status", "--task", "tiny_gsm", *args])
    assert out.exit_code == 2 and fix in out.output


def test_run_command_passes_every_setting():
    cell = request4(ks="2", subsets="middle", params=("threshold=0.8",)).cells("generate_until")[0]
    cmd = run_command(cell, allow_dirty=True)
    assert cmd[1:4] == ["-m", "reuse_exp.cli", "run"]
    pairs = dict(zip(cmd[4:-1:2], cmd[5:-1:2]))
    assert pairs["--task"] == "tiny_gsm" and pairs["--k"] == "2" and pairs["--subset"] == "middle"
    assert pairs["--limit"] == "4" and pairs["--threshold"] == "0.8" and pairs["--mode"] == "output"
    assert pairs["--apply-chat-template"] == "true"   # the run's defaults, pinned
    assert cmd[-1] == "--allow-dirty"


def test_store_error_names_the_server():
    line = store_error("sqlalchemy.exc.OperationalError: (sqlite3.OperationalError) database is locked",
                       "sqlite:////x/mlflow.db")
    assert line and "database is locked" in line and "mlflow server" in line and "\n" not in line
    assert store_error("database is locked", "http://127.0.0.1:5000") is None
    assert store_error("CUDA out of memory", "sqlite:////x/mlflow.db") is None


def test_relative_sqlite_uri_is_made_absolute(tmp_path):
    """Jobs run elsewhere (another cwd, a compute node): the default relative store must not move."""
    from reuse_exp.tracking.store_init import absolute_uri
    rel = absolute_uri("sqlite:///mlflow.db")
    assert rel.startswith("sqlite:////") and rel.endswith("/mlflow.db")
    assert absolute_uri(f"sqlite:///{tmp_path}/m.db") == f"sqlite:///{tmp_path}/m.db"
    assert absolute_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert absolute_uri("localhost:5000") == "localhost:5000"   # an address, mistyped: not a folder here


def test_a_killed_or_dead_cell_resumes_its_run_a_failed_one_starts_again(store, head):
    c, e = store.client, store.exp_id
    killed = fabricate(c, e, k=2, subset="first", commit=head, status="KILLED")
    fabricate(c, e, k=2, subset="first", commit=head, status="FAILED", tags={REFUSED_TAG: "true"},
              start_ms=int(time.time() * 1000) + 1000)   # a refused resume of it, not yet deleted: no failure
    fabricate(c, e, k=2, subset="middle", commit=head, status="FAILED")          # an error: run afresh
    dead = fabricate(c, e, k=2, subset="last", commit=head, status="RUNNING", start_ms=int(time.time() * 1000) - 7200_000)
    args = ["run", "--task", "tiny_gsm", "--limit", "4", "--k", "2", "--dry-run", "--stale-after", "3600"]
    out = CliRunner(env=store.env).invoke(cli_study.grid, args)
    assert out.exit_code == 0, out.output
    plans = {line.split()[2].rstrip(":"): line for line in out.output.splitlines() if line.startswith("would run")}
    assert plans["k2_first"].endswith(f"--resume {killed}") and plans["k2_last"].endswith(f"--resume {dead}")
    assert "--resume" not in plans["k2_middle"]
    forced = CliRunner(env=store.env).invoke(cli_study.grid, args + ["--force"])
    assert "--resume" not in forced.output


def test_replay_grid_shares_the_k1_baseline_and_runs_one_cell_per_k(store, head):
    """k=1 is one computation in every mode, and replay reuses whole forwards whatever the
    subset: `--mode replay` plans one cell per k > 1, named for the mode, with no subset."""
    fabricate(store.client, store.exp_id, k=1, subset="first", commit=head)          # an output-mode k=1 run
    args = ["run", "--task", "tiny_gsm", "--limit", "4", "--mode", "replay", "--dry-run"]
    out = CliRunner(env=store.env).invoke(cli_study.grid, args)
    assert out.exit_code == 0, out.output
    assert "skip k1_any: done" in out.output
    planned = [line.split()[2].rstrip(":") for line in out.output.splitlines() if line.startswith("would run")]
    assert planned == ["k2_any", "k3_any"]
    k2 = next(line for line in out.output.splitlines() if line.startswith("would run k2_any"))
    assert "--mode replay" in k2 and "--subset" not in k2
    status = CliRunner(env=store.env).invoke(cli_study.grid, ["status", "--task", "tiny_gsm", "--limit", "4",
                                                               "--mode", "replay"])
    assert "k=2   missing" in status.output and "one run for every subset" in status.output
    assert "done at HEAD 1/3" in status.output


def test_runs_of_one_computation_share_a_config_key_and_name():
    from reuse_exp.engine.policies.fixed import FixedPolicy
    from reuse_exp.tracking.schema import config_key
    base = {"task": "tiny_gsm", "policy": "fixed", "scope": "block"}
    key = lambda **p: config_key({**base, **p})   # noqa: E731
    assert key(k="1", mode="output", layers="1,2,3") == key(k="1", mode="replay", layers="0,1,2,3,4,5,6,7")
    assert key(k="2", mode="replay", layers="1,2,3") == key(k="2", mode="replay", layers="4,5,6")
    assert key(k="2", mode="output", layers="1,2,3") != key(k="2", mode="output", layers="4,5,6")
    assert key(k="2", mode="output", layers="1,2,3") != key(k="2", mode="replay", layers="1,2,3")
    assert FixedPolicy.run_name(k=2, subset="first", mode="replay") == "k2_replay"
    assert FixedPolicy.run_name(k=1, subset="first", mode="output") == "k1_all"
    for k, mode in ((1, "output"), (2, "replay")):   # what it computes: every layer
        policy = FixedPolicy.create(8, k=k, subset="first", mode=mode)
        assert (policy.describe()["subset"], policy.layers) == ("all", tuple(range(8)))


def test_a_grid_takes_its_policy_s_axes_and_baseline():
    """The adaptive policy's grid varies drift (not k or subset) and measures against drift 0,
    run first wherever it is asked for, and is no baseline where it is not."""
    def cells(**reuse):
        request = build_request("tiny_gsm", limit=4, params=("policy=adaptive",), **reuse)
        return request, [(c.name, c.baseline) for c in request.cells("generate_until")]
    request, default = cells()
    assert request.axes == (("drift", (0.0, 0.5, 1.0)),) and request.describe_baseline() == "drift=0.0"
    assert default == [("drift0", True), ("drift0.5", False), ("drift1", False)]
    assert cells(drift="0.5,0")[1] == [("drift0", True), ("drift0.5", False)]
    assert cells(drift="0.5,1")[1] == [("drift0.5", False), ("drift1", False)]
    with pytest.raises(SettingError, match="the adaptive policy does not read k"):
        cells(k="1,2")

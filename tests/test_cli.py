"""`reuse-exp run`: bad input in one line, and runs that end FAILED or KILLED, never RUNNING."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from conftest import subprocess_env, write_tasks

from reuse_exp.cli import main
from reuse_exp.tracking import provenance as provmod
from reuse_exp.errors import DirtyTree, Terminated
from reuse_exp.runner import run as tracked
from reuse_exp.tracking.schema import REFUSED_TAG


@pytest.mark.parametrize("args, says", [
    (["--k", "0"], "Invalid value for '--k'"),
    (["--subset", "middles"], "use first, middle, last or layer indices"),
    (["--limit", "-3"], "the limit must be positive"),
    (["--limit", "2.5"], "must be a whole number"),
    (["--mode", "copy"], "Invalid value for '--mode'"),
    (["--block-size", "32", "--small-block-size", "5"], "small_block_size=5 must divide block_size=32"),
    (["--include-path", "/no/such/tasks"], "include_path=/no/such/tasks: no folder '/no/such/tasks' here"),
])
def test_bad_input_is_one_line_naming_the_fix(args, says):
    result = CliRunner().invoke(main, ["run", *args])
    assert result.exit_code == 2
    assert says in result.output and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("args", [["--k", "abc"], ["--subset", "foo"], ["--batch-size", "0"], ["--no-such", "1"],
                                  ["--block-size", "32", "--small-block-size", "5"]])
def test_a_refused_value_ends_the_run_mlflow_opened_refused(store, monkeypatch, args):
    """`mlflow run` opens the run before our code starts: a value refused on the command
    line ends it FAILED, tagged refused with the commit, so the audit ignores it."""
    import mlflow
    client = mlflow.MlflowClient(store)
    opened = client.create_run("0")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_RUN_ID", opened.info.run_id)
    result = CliRunner().invoke(main, ["run", *args])
    assert result.exit_code == 2 and "Traceback" not in result.output
    run = client.get_run(opened.info.run_id)
    t = run.data.tags
    assert run.info.status == "FAILED" and t[REFUSED_TAG] == "true" and t["end_status"] == "FAILED"
    assert t["git_commit"] == provmod.provenance().commit and t["error"]


def test_a_run_refused_under_reuse_exp_run_leaves_the_runs_table_at_once(store, monkeypatch, tmp_path):
    """No MLflow ends a `reuse-exp run` after it: a run refused once opened (its model has a
    config, so its policy could be checked, but no weights) is deleted by the run itself, its
    record kept for the audit to count; one refused before (no model at all) opens none."""
    import shutil
    from conftest import runs_of
    from reuse_exp.tiny import MODEL_DIR
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    result = CliRunner().invoke(main, ["run", "--model", str(tmp_path / "no_such_model"), "--limit", "1",
                                       "--allow-dirty"])
    assert result.exit_code == 2 and "not found" in result.output, result.output
    assert runs_of(store)[1] == []
    (tmp_path / "no_weights").mkdir()
    shutil.copy(MODEL_DIR / "config.json", tmp_path / "no_weights")
    result = CliRunner().invoke(main, ["run", "--model", str(tmp_path / "no_weights"), "--limit", "1",
                                       "--allow-dirty"])
    assert result.exit_code == 2 and "neither model.safetensors" in result.output, result.output
    _, runs = runs_of(store)
    assert [(r.info.lifecycle_stage, r.info.status, r.data.tags.get(REFUSED_TAG)) for r in runs] == \
           [("deleted", "FAILED", "true")]


def test_underscore_spellings_reach_the_same_options():
    """`mlflow run -P max_new_tokens=8` arrives as --max_new_tokens 8."""
    result = CliRunner().invoke(main, ["run", "--max_new_tokens", "0"])
    assert result.exit_code == 2 and "--max-new-tokens" in result.output


def test_classify_failures():
    import torch
    assert tracked.classify(KeyboardInterrupt())[:2] == ("KILLED", 130)
    assert tracked.classify(Terminated())[:2] == ("KILLED", 143)
    status, code, line = tracked.classify(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert (status, code) == ("FAILED", 3) and "--batch-size" in line
    assert tracked.classify(DirtyTree("refusing"))[:2] == ("FAILED", 2)
    _, _, line = tracked.classify(RuntimeError("Dataset 'Idavidrein/gpqa' is a gated dataset on the Hub"))
    assert "HF_TOKEN" in line


@pytest.mark.slow
def test_unknown_task_fails_the_run_mlflow_opened(store, monkeypatch):
    import mlflow
    client = mlflow.MlflowClient(store)
    opened = client.create_run("0")  # what `mlflow run` does before it starts the command
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_RUN_ID", opened.info.run_id)
    result = CliRunner().invoke(main, ["run", "--task", "no_such_task_xyz", "--allow-dirty"])
    assert result.exit_code == 2
    assert "unknown task 'no_such_task_xyz'" in result.output and "Traceback" not in result.output
    run = client.get_run(opened.info.run_id)
    assert run.info.status == "FAILED" and "unknown task" in run.data.tags["error"]
    assert len(client.search_runs(["0"])) == 1


def failing_task(tasks_dir):
    """t_gen whose scoring raises after generation: a failure late in the run."""
    (tasks_dir / "boom.py").write_text("def process_results(doc, results):\n"
                                       "    raise RuntimeError('scoring broke')\n")
    text = (tasks_dir / "t_gen.yaml").read_text().replace("task: t_gen", "task: t_boom")
    (tasks_dir / "t_boom.yaml").write_text(text + "process_results: !function boom.process_results\n")


def cli_run(repo, store, *args, **popen):
    cmd = [sys.executable, "-m", "reuse_exp.cli", "run", *args]
    return subprocess.Popen(cmd, cwd=repo, env=subprocess_env(store), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.slow
def test_failure_ends_failed_with_the_metrics_so_far(clean_repo, store, tiny_ckpt, tasks_dir, tmp_path):
    import shutil

    import mlflow
    tasks = tmp_path / "tasks"
    shutil.copytree(tasks_dir, tasks)
    failing_task(tasks)
    proc = cli_run(clean_repo, store, "--model", str(tiny_ckpt), "--task", "t_boom", "--include-path", str(tasks),
                   "--limit", "2", "--max-new-tokens", "32", "--batch-size", "2")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1
    assert "reuse-exp: RuntimeError: scoring broke (traceback: the run's error.txt)" in err
    client = mlflow.MlflowClient(store)
    [run] = client.search_runs(["0"])
    assert run.info.status == "FAILED"
    assert run.data.metrics["generated_tokens"] > 0 and "seconds" in run.data.metrics
    assert "scoring broke" in run.data.tags["error"]
    assert "error.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_sigterm_ends_killed(clean_repo, store, tiny_ckpt, tmp_path):
    import mlflow
    client = mlflow.MlflowClient(store)
    # 64 requests, one at a time: the signal lands while it decodes, not after the last batch
    many = write_tasks(tmp_path / "tasks", n=64)
    proc = cli_run(clean_repo, store, "--model", str(tiny_ckpt), "--task", "t_gen", "--include-path", str(many),
                   "--max-new-tokens", "256", "--batch-size", "1")
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:  # wait for the first progress metric
        runs = client.search_runs(["0"])
        if runs and "generated_tokens" in runs[0].data.metrics:
            break
        time.sleep(1)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    [run] = client.search_runs(["0"])
    assert run.info.status == "KILLED" and run.data.tags["end_status"] == "KILLED"
    assert run.data.metrics["generated_tokens"] > 0


@pytest.mark.parametrize("args, allow", [(["--allow-dirty", "--k", "2"], True), (["--allow-dirty", "false"], False),
                                         (["--allow_dirty", "true"], True), ([], False)])
def test_allow_dirty_is_a_flag_or_takes_a_value(args, allow):
    """The grid passes a bare flag, MLproject a value."""
    from reuse_exp.cli.run import run
    assert run.make_context("run", list(args)).params["allow_dirty"] is allow


@pytest.mark.slow
def test_loglikelihood_run_says_reuse_cannot_act(clean_repo, store, tiny_ckpt, tasks_dir):
    import mlflow
    proc = cli_run(clean_repo, store, "--model", str(tiny_ckpt), "--task", "t_mc", "--include-path", str(tasks_dir),
                   "--limit", "4", "--k", "3", "--subset", "last", "--batch-size", "4")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    [run] = mlflow.MlflowClient(store).search_runs(["0"])
    t, m = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED" and t["task_kind"] == "loglikelihood"
    assert "reuse cannot act" in t["reuse_note"] and t["accuracy_metric"] == "acc,none"
    assert m["skipped_fraction"] == 0 and m["generated_tokens"] == 0
    # 4 documents x 2 choices of 2 tokens (" 0": a space and a digit), every token scored
    assert m["scored_tokens"] == 16 and m["tokens_per_second"] > 0 and "accuracy" in m and "acc_stderr" in m
    assert m["n_samples"] == 4 and m["accuracy_stderr"] == m["acc_stderr"] and "loglikelihood_ties" in m
    assert m["timed_batches"] == 2 and m["tokens_per_second_median"] > 0

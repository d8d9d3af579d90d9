"""One line per error and per signal, and no progress bars in a log file, under both entry
points: real `mlflow run` and `reuse-exp run` processes whose stderr is a pipe, as in a
batch job's log. (Two ranks and SIGTERM: tests/test_distributed.py.)"""
from __future__ import annotations

import re

import pytest
from conftest import mlflow_run, run_cli, runs_of, subprocess_env

pytestmark = pytest.mark.slow


def test_a_refused_value_under_mlflow_run_is_one_line_besides_mlflows_own(clean_repo, store):
    """click's usage lines name `python -m reuse_exp.cli run [OPTIONS]`, which the user never typed."""
    out = mlflow_run(clean_repo, store, {"k": 0})
    assert out.returncode != 0
    ours = out.stderr.split("=== Running command", 1)[1].splitlines()[1:]
    assert len(ours) == 2, out.stderr[-3000:]
    assert ours[0] == "reuse-exp: Invalid value for '--k': k=0: must be >= 1"
    assert re.search(r"ERROR mlflow.cli: === Run \(ID '\w+'\) failed ===$", ours[1])   # MLflow's, after it
    _, [run] = runs_of(store)
    assert run.info.status == "FAILED" and run.data.tags["reuse_exp.refused"] == "true"


def test_lm_evals_progress_bars_stay_out_of_a_log_file(clean_repo, store):
    """lm-eval draws a bar building the requests and one checking its cache: carriage returns
    in a log file. What the log gets is the run's own progress lines."""
    out = run_cli(["run", "--k", "2", "--subset", "middle", "--limit", "2", "--max-new-tokens", "16"],
                  subprocess_env(store), clean_repo)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "\r" not in out.stderr and "it/s]" not in out.stderr and "Checking cached requests" not in out.stderr
    assert [line.split(":")[0] for line in out.stderr.splitlines()] == ["decoding"] * 2, out.stderr


# -- a tracking store that cannot work --------------------------------------------------------
def closed_port() -> int:
    from services import free_port
    return free_port()   # bound, then let go: nothing listens there


@pytest.mark.parametrize("command, uri, says", [
    ("mlflow run", "http://127.0.0.1:{port}", "http://127.0.0.1:{port}: the tracking server does not answer "
                                             "(connection refused, 3 tries): start it"),
    ("reuse-exp run", "localhost:5000", "MLFLOW_TRACKING_URI=localhost:5000 is no store MLflow can open "
                                        "(a server is http://localhost:5000)"),
    ("reuse-exp audit", "http://127.0.0.1:{port}", "the tracking server does not answer (connection refused"),
])
def test_a_tracking_uri_that_cannot_work_is_one_line(clean_repo, command, uri, says):
    """MLflow's own client retries an unreachable server for four minutes, then prints 30 lines
    ending in "Model registry functionality is unavailable" for an address it cannot open. Under
    `mlflow run` MLflow opens the store before the package runs: its store plug-ins say it there."""
    port = closed_port()
    uri, says = uri.format(port=port), says.format(port=port)
    if command == "mlflow run":
        out = mlflow_run(clean_repo, uri, {"limit": 1})
    else:
        out = run_cli(command.split()[1:] + (["--limit", "1"] if command.endswith("run") else []),
                      subprocess_env(uri), clean_repo)
    assert out.returncode in (1, 2), out.stderr[-3000:]
    said = [line for line in out.stderr.splitlines() if says in line]
    assert len(said) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert not [line for line in out.stderr.splitlines() if line.startswith(("  ", "mlflow.", "requests."))]

"""A store that outgrows one machine: a grid's configurations at once (k=1 once, k=2 and 3
on two subsets: 5 runs) against a real MLflow server on PostgreSQL, and the same against the
embedded sqlite store (works, or one clear line).

Real services, loopback only, started here and stopped in teardown; skipped, naming the
package, where a binary is missing (`bash .ci/services.sh` installs them)."""
from __future__ import annotations

import pytest

from services.checkout import clean_checkout
from services.mlflow_server import start_mlflow_server
from services.postgres import available, start_postgres

pytestmark = pytest.mark.slow

GRID = ["grid", "run", "--task", "tiny_gsm", "--limit", "1", "-P", "max_new_tokens=32", "--k", "1,2,3",
        "--subset", "first,last", "--executor", "submitit-local"]
CELLS = {("1", "any"), *((str(k), s) for k in (2, 3) for s in ("first", "last"))}
METRICS = ("accuracy", "tokens_per_second", "skipped_fraction", "generated_tokens", "seconds")


@pytest.fixture(scope="module")
def pg_server(tmp_path_factory):
    reason = available()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("pg")
    pg = start_postgres(root / "db")
    try:
        server = start_mlflow_server(pg.uri, root / "artifacts", root / "mlflow-server.log")
        try:
            yield server
        finally:
            server.stop()
    finally:
        pg.stop()


def concurrent_grid(tmp_path, tiny_ckpt, uri: str):
    repo = clean_checkout(tmp_path / "repo")
    env = repo.env(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME="concurrent")
    out = repo.cli([*GRID, "--model", str(tiny_ckpt), "--jobs-dir", str(tmp_path / "jobs")], env)
    return repo, out


def finished_runs(uri: str):
    import mlflow
    cl = mlflow.MlflowClient(uri)
    exp = cl.get_experiment_by_name("concurrent")
    return cl.search_runs([exp.experiment_id]) if exp else []


def test_concurrent_runs_on_postgres_server(tmp_path, tiny_ckpt, pg_server):
    repo, out = concurrent_grid(tmp_path, tiny_ckpt, pg_server.uri)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("submitted k") == len(CELLS)
    runs = finished_runs(pg_server.uri)
    assert len(runs) == len(CELLS) and all(r.info.status == "FINISHED" for r in runs)
    assert {(r.data.params["k"], r.data.params["subset"] if r.data.params["k"] != "1" else "any")
            for r in runs} == CELLS
    for r in runs:
        missing = [m for m in METRICS if m not in r.data.metrics]
        assert not missing, f"{r.info.run_id} lacks {missing}"
        assert r.data.tags["git_commit"] == repo.head and r.data.tags["git_dirty"] == "false"
    status = repo.cli(["grid", "status", "--task", "tiny_gsm", "--limit", "1", "-P", "max_new_tokens=32",
                       "--k", "1,2,3", "--subset", "first,last", "--model", str(tiny_ckpt)], repo.env(MLFLOW_TRACKING_URI=pg_server.uri,
                                                            MLFLOW_EXPERIMENT_NAME="concurrent"))
    assert f"done at HEAD {len(CELLS)}/{len(CELLS)}" in status.stdout, status.stdout + status.stderr


def test_concurrent_runs_on_sqlite_work_or_name_the_server(tmp_path, tiny_ckpt):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    _, out = concurrent_grid(tmp_path, tiny_ckpt, uri)
    runs = finished_runs(uri)
    if out.returncode == 0:
        print(f"sqlite took {len(CELLS)} concurrent runs")   # the grid creates schema and experiment first
        assert len(runs) == len(CELLS) and all(r.info.status == "FINISHED" for r in runs)
        assert all(m in r.data.metrics for r in runs for m in METRICS)
    else:
        last = out.stderr.strip().splitlines()[-1]
        print(f"sqlite failed under {len(CELLS)} concurrent runs: {last}")
        assert last.startswith("Error: the sqlite store") and "mlflow server" in last, out.stdout + out.stderr




def _log_datasets_at(uri: str, experiment_id: str, digests: list[str], barrier, results) -> None:
    """One process: per digest, a run that logs a dataset of that digest as the barrier lets all go."""
    import mlflow
    from reuse_exp.tracking.data import TaskData, log_datasets
    client = mlflow.MlflowClient(uri)
    runs = [client.create_run(experiment_id).info.run_id for _ in digests]
    for run_id, digest in zip(runs, digests):
        barrier.wait()
        try:
            log_datasets(client, run_id, [TaskData("tiny_gsm", "1.0", "cfg", digest, 2, {})])
            results.put("ok")
        except Exception as e:
            results.put(f"{digest}: {type(e).__name__}: {str(e)[:200]}")


def test_runs_that_log_one_new_dataset_at_once_all_log_it(pg_server):
    # MLflow's SQL store looks a dataset up, then inserts it: runs that start together on one
    # server race on its key (seen in CI: 1 of 5 grid jobs failed). 6 processes, 8 new datasets.
    import multiprocessing

    import mlflow
    ctx = multiprocessing.get_context("spawn")
    experiment_id = mlflow.MlflowClient(pg_server.uri).create_experiment("dataset-race")
    digests = [f"race{i}" for i in range(8)]
    barrier, results = ctx.Barrier(6, timeout=120), ctx.Queue()
    procs = [ctx.Process(target=_log_datasets_at, args=(pg_server.uri, experiment_id, digests, barrier, results))
             for _ in range(6)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in range(len(procs) * len(digests))]
    for p in procs:
        p.join(30)
    assert outcomes == ["ok"] * len(outcomes), [o for o in outcomes if o != "ok"]
    runs = mlflow.MlflowClient(pg_server.uri).search_runs([experiment_id])
    assert len(runs) == len(outcomes) and all(len(r.inputs.dataset_inputs) == 1 for r in runs)
    assert len({r.inputs.dataset_inputs[0].dataset.digest for r in runs}) == len(digests)

"""The MLflow UI over a finished grid, read by headless Chromium (Debian's) on loopback.

What this checks, exactly: the UI is a JS app, and its experiment page hides param and
metric columns until a user picks them (the choice lives in the browser's local storage,
which a fresh headless profile has not got). So the test reads what the page does show:
1. the experiment's runs page lists all 9 runs by name (k{k}_{subset}_{task}, the names
   the tracked run gives), sorted by the accuracy metric through the page's own sort
   (URL orderByKey), in the order the fabricated accuracies imply;
2. the same page filtered through its search box (URL searchFilter) on params k and
   subset and metric accuracy lists exactly the one matching run;
3. the UI's compare page of the 9 runs shows the rows k, subset and accuracy with every
   run's value.
The grid is fabricated in the tracked run's schema (a real tracked grid is what
test_grid_e2e.py makes; the UI reads the same store fields).
4. A real run's summary ends with the addresses a newcomer opens: its experiment's runs
   table (not MLflow 3's GenAI overview) and its own page, which shows what it computed."""
from __future__ import annotations

import json
import re
import urllib.parse

import pytest

from conftest import run_cli, subprocess_env
from services.chromium import binary, page_text
from services.fabricate import fabricate
from services.mlflow_server import start_mlflow_server
from services.store import new_store

pytestmark = pytest.mark.slow

CELLS = [(k, s) for k in (1, 2, 3) for s in ("first", "middle", "last")]
ACCURACY = [0.375, 0.625, 0.125, 0.875, 0.25, 0.75, 0.5, 0.0, 1.0]   # not the creation order


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    if binary() is None:
        pytest.skip("missing chromium: install Debian's chromium (bash .ci/services.sh)")
    root = tmp_path_factory.mktemp("ui")
    store = new_store(tmp_path_factory.getbasetemp(), root, "ui-grid")
    # a model-training experiment: MLflow 3 opens GenAI experiments on a traces overview
    store.client.set_experiment_tag(store.exp_id, "mlflow.experimentKind", "custom_model_development")
    ids = [fabricate(store.client, store.exp_id, k=k, subset=s, commit="c" * 40, accuracy=a,
                     tags={"mlflow.runName": f"k{k}_{s}_tiny_gsm"}) for (k, s), a in zip(CELLS, ACCURACY)]
    server = start_mlflow_server(store.uri, root / "artifacts", root / "mlflow-server.log")
    try:
        yield server.uri, store.exp_id, ids
    finally:
        server.stop()


def names_in(text: str) -> list[str]:
    return re.findall(r"\bk[123]_(?:first|middle|last)_tiny_gsm\b", text)


def test_experiment_page_lists_runs_sorted_by_accuracy(ui):
    uri, exp_id, _ = ui
    order = urllib.parse.quote("metrics.`accuracy`")
    text = page_text(f"{uri}/#/experiments/{exp_id}/runs?orderByKey={order}&orderByAsc=false")
    assert "9 matching runs" in text, text[:2000]
    expected = [f"k{k}_{s}_tiny_gsm" for a, (k, s) in sorted(zip(ACCURACY, CELLS), reverse=True)]
    assert names_in(text) == expected


def test_experiment_page_filters_on_k_subset_and_accuracy(ui):
    uri, exp_id, _ = ui
    flt = urllib.parse.quote("params.k = '2' and params.subset = 'middle' and metrics.accuracy > 0.2")
    text = page_text(f"{uri}/#/experiments/{exp_id}/runs?searchFilter={flt}")
    assert "1 matching run" in text and names_in(text) == ["k2_middle_tiny_gsm"], text[:2000]


def test_compare_page_shows_k_subset_and_accuracy_of_every_run(ui):
    uri, exp_id, ids = ui
    q = urllib.parse.quote
    text = page_text(f"{uri}/#/compare-runs?runs={q(json.dumps(ids))}&experiments={q(json.dumps([exp_id]))}")
    assert f" k {' '.join(str(k) for k, _ in CELLS)} " in text, text[:3000]
    assert f" subset {' '.join(s for _, s in CELLS)} " in text
    metrics = text.split(" Metrics ", 1)[1]
    # metric names come first (the pinned column), then each metric's row: accuracy's is first
    assert metrics.startswith("Show diff only accuracy "), metrics[:600]
    values = re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", metrics)[:9]
    assert [float(v) for v in values] == ACCURACY, metrics[:600]


def test_the_summary_addresses_open_the_runs_table_and_the_run(clean_repo, store, tmp_path):
    if binary() is None:
        pytest.skip("missing chromium: install Debian's chromium (bash .ci/services.sh)")
    out = run_cli(["run", "--k", "1", "--limit", "2", "--max-new-tokens", "32"], subprocess_env(store), clean_repo)
    assert out.returncode == 0, out.stderr[-3000:]
    said = out.stdout.splitlines()
    assert said[-3] == f"ui        mlflow ui --backend-store-uri {store}"
    assert said[-2].startswith("this run  http://127.0.0.1:5000/") and said[-1].startswith("open it   http://127.0.0.1:5000/")
    server = start_mlflow_server(store, tmp_path / "artifacts", tmp_path / "mlflow-server.log")
    try:   # the addresses on this test's server instead of `mlflow ui`'s port
        table, run_page = (page_text(line.split()[-1].replace("http://127.0.0.1:5000", server.uri))
                           for line in (said[-1], said[-2]))
    finally:
        server.stop()
    assert "1 matching run" in table and "k1_all_tiny_gsm" in table and "Sort: accuracy" in table, table[:2000]
    assert "Overview" not in table.split("Settings", 1)[0], "the GenAI overview's navigation"
    assert "k1_all_tiny_gsm" in run_page and "accuracy" in run_page, run_page[:2000]
    assert " layers 0,1,2,3,4,5,6,7 " in run_page   # k=1 computes every layer

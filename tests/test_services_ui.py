"""The MLflow UI over a study, read by headless Chromium (Debian's) on loopback, with a fresh
browser profile each time: nothing configured, as a newcomer's browser.

MLflow 3's UI keeps a user's columns and its GenAI/model-training switch in the browser's local
storage, which no address or server sets; an experiment's saved views it reads from the store
(tracking/ui.py). What this checks, exactly:
1. `reuse-exp ui`, started for real over a study (the grid's 7 cells, a dirty repeat of one, the
   grid's comparison, a refused run), serves the store and prints the address that opens the
   study's view: every run at the top level (none folded under the comparison), named by its
   configuration with the dirty one marked, the columns a study reads first (accuracy, tokens/s,
   the commit, k, subset, ...) left to right in that order, best accuracy first; the refused run
   out of it. A screenshot is kept (its path is printed) for a person to look at.
2. the same page filtered through its search box (URL searchFilter) on params k and subset and
   metric accuracy lists exactly the one matching run;
3. the UI's compare page of the runs shows the rows k, subset and accuracy with every run's
   value, and the dirty one by name and tag;
4. a real run's summary ends with the addresses a newcomer opens: its experiment's runs table in
   the study's saved view (not MLflow 3's GenAI overview) and its own page, which shows what it
   computed;
5. SIGTERM to `reuse-exp ui` stops the server it started.
The study is fabricated in the tracked run's schema and names (a real tracked grid is what
test_grid_e2e.py makes; the UI reads the same store fields), the comparison is the real
`compare`'s."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.parse

import pytest

from conftest import run_cli, subprocess_env
from services import free_port, port_open, wait_until
from services.chromium import binary, column_positions, page_dom, page_text, screenshot, visible_text
from services.fabricate import fabricate
from services.mlflow_server import start_mlflow_server
from services.store import new_store

from reuse_exp.settings import RunSettings
from reuse_exp.tracking.schema import REFUSED_TAG, run_name

pytestmark = pytest.mark.slow

COMMIT = "c" * 40
STUDY = [(1, "first")] + [(k, s) for k in (2, 3) for s in ("first", "middle", "last")]   # the k=1 baseline once
ACCURACY = [0.5, 0.625, 0.125, 0.875, 0.25, 0.75, 0.375]   # not the creation order
DIRTY_ACCURACY = 0.3


def names(cells) -> list[str]:
    return [run_name(RunSettings(k=k, subset=s), dirty=False) for k, s in cells]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The study in a store, served by a real `reuse-exp ui`: (process, port, address, folder, run ids)."""
    if binary() is None:
        pytest.skip("missing chromium: install Debian's chromium (bash .ci/services.sh)")
    from unittest import mock

    from reuse_exp.study import compare
    from reuse_exp.study.cells import build_request
    root = tmp_path_factory.mktemp("study_ui")
    store = new_store(tmp_path_factory.getbasetemp(), root, "study")
    ids = [fabricate(store.client, store.exp_id, k=k, subset=s, commit=COMMIT, accuracy=a,
                     tags={"mlflow.runName": name, "mlflow.source.git.commit": COMMIT})
           for (k, s), a, name in zip(STUDY, ACCURACY, names(STUDY))]
    ids.append(fabricate(store.client, store.exp_id, k=2, subset="middle", commit=COMMIT, dirty=True,
                         accuracy=DIRTY_ACCURACY, tags={"mlflow.runName": run_name(RunSettings(k=2, subset="middle"),
                                                                                     dirty=True)}))
    refused = fabricate(store.client, store.exp_id, commit=COMMIT, status="FAILED",
                        tags={REFUSED_TAG: "true", "mlflow.runName": "refused_typo"})
    store.client.delete_run(refused)   # as a refusal leaves it: deleted, with its record
    with mock.patch.dict("os.environ", store.env):
        compare.compare(build_request("tiny_gsm", k="1,2,3", subset="first,middle,last", limit="4"), store.experiment,
                        COMMIT, echo=lambda *_: None)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "reuse_exp.cli", "ui", "--store", store.uri, "--port", str(port),
                             "--no-browser"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=subprocess_env(store.uri))
    try:
        lines = []
        while not lines or not lines[-1].startswith("open "):
            line = proc.stdout.readline()
            assert line, "reuse-exp ui ended: " + "".join(lines)
            lines.append(line)
        yield proc, port, lines[-1].split()[-1], root, ids
    finally:
        proc.terminate()
        proc.wait(60)


def test_reuse_exp_ui_opens_the_study_in_a_fresh_browser(study):
    proc, port, address, root, _ = study
    assert address == (f"http://127.0.0.1:{port}/#/experiments/1/runs?workflowType=machine_learning"
                       "&viewStateShareKey=reuse_exp_study")
    dom = page_dom(address, width=2400)
    text = visible_text(dom)
    shot = root / "study_view.png"
    screenshot(address, shot)
    print(f"screenshot of the study's view: {shot}")
    assert shot.stat().st_size > 50_000   # a rendered page, not a blank one
    assert "reuse_exp study" in text and "Model training" in text and "Traces 0" not in text, text[:2000]
    assert "9 matching runs" in text, text[:3000]   # 7 cells, the dirty repeat, the comparison
    expected = names(cell for _, cell in sorted(zip(ACCURACY, STUDY), reverse=True))
    assert expected[0] == "k2_last_tiny_gsm" and "k1_all_tiny_gsm" in expected
    assert re.findall(r"\bk[123]_\w+?_tiny_gsm\b(?!\*)", text) == expected   # best first, none folded away
    assert "k2_middle_tiny_gsm*dirty" in text and "grid tiny_gsm @ ccccccc" in text
    assert "refused_typo" not in text
    shown = column_positions(dom)   # the result first, then the commit, then the configuration, left to right
    order = [f"metrics.`{m}`" for m in ("accuracy", "accuracy_stderr", "tokens_per_second", "skipped_fraction",
                                         "n_samples")] + ["attributes.`Version`"] + \
            [f"params.`{p}`" for p in ("k", "subset", "mode", "policy", "limit", "task")]
    assert all(c in shown for c in order) and sorted(order, key=shown.get) == order, shown
    assert f" {COMMIT[:6]} " in text   # the Version column: the commit each run ran


def test_experiment_page_filters_on_k_subset_and_accuracy(study):
    _, port, address, _, _ = study
    flt = urllib.parse.quote("params.k = '2' and params.subset = 'middle' and metrics.accuracy < 0.2")
    text = page_text(f"{address}&searchFilter={flt}")
    assert "1 matching run" in text and "k2_middle_tiny_gsm" in text and "*dirty" not in text, text[:2000]


def test_compare_page_shows_k_subset_accuracy_and_dirty_of_every_run(study):
    _, port, _, _, ids = study
    q = urllib.parse.quote
    experiments = q(json.dumps(["1"]))
    text = page_text(f"http://127.0.0.1:{port}/#/compare-runs?runs={q(json.dumps(ids))}&experiments={experiments}")
    cells = [*STUDY, (2, "middle")]
    assert f" Run Name: {' '.join(names(STUDY))} k2_middle_tiny_gsm*dirty " in text, text[:3000]
    assert f" k {' '.join(str(k) for k, _ in cells)} " in text
    assert f" subset {' '.join(s for _, s in cells)} " in text
    assert f" git_dirty {' '.join(['false'] * len(STUDY))} true " in text
    metrics = text.split(" Metrics ", 1)[1]
    # metric names come first (the pinned column), then each metric's row: accuracy's is first
    assert metrics.startswith("Show diff only accuracy "), metrics[:600]
    values = re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", metrics)[:len(cells)]
    assert [float(v) for v in values] == [*ACCURACY, DIRTY_ACCURACY], metrics[:600]


def test_the_summary_addresses_open_the_runs_table_and_the_run(clean_repo, store, tmp_path):
    if binary() is None:
        pytest.skip("missing chromium: install Debian's chromium (bash .ci/services.sh)")
    out = run_cli(["run", "--k", "1", "--limit", "2", "--max-new-tokens", "32"], subprocess_env(store), clean_repo)
    assert out.returncode == 0, out.stderr[-3000:]
    said = out.stdout.splitlines()
    assert said[-3] == f"ui        reuse-exp ui --store {store}"
    assert said[-2].startswith("this run  http://127.0.0.1:5000/") and said[-1].startswith("open it   http://127.0.0.1:5000/")
    server = start_mlflow_server(store, tmp_path / "artifacts", tmp_path / "mlflow-server.log")
    try:   # the addresses on this test's server instead of `mlflow ui`'s port
        table, run_page = (page_text(line.split()[-1].replace("http://127.0.0.1:5000", server.uri))
                           for line in (said[-1], said[-2]))
    finally:
        server.stop()
    assert "1 matching run" in table and "k1_all_tiny_gsm" in table and "Sort: accuracy" in table, table[:2000]
    assert "reuse_exp study" in table and " accuracy " in table and " tokens_per_second " in table   # the view
    assert "Overview" not in table.split("Settings", 1)[0], "the GenAI overview's navigation"
    assert "k1_all_tiny_gsm" in run_page and "accuracy" in run_page, run_page[:2000]
    assert " layers 0,1,2,3,4,5,6,7 " in run_page   # k=1 computes every layer


def test_sigterm_stops_reuse_exp_ui_and_its_server(study):
    proc, port, _, _, _ = study
    proc.terminate()
    assert proc.wait(60) == 0
    wait_until(lambda: not port_open(port), 30, "the server's port to close")

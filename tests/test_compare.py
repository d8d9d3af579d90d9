"""compare: tables from one commit, refusals that name runs, the PNG and the parent run."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from reuse_exp.study import compare as cmp
from reuse_exp.study.cells import build_request
from reuse_exp.study.store import fetch_runs, git_head
from services.fabricate import fabricate
from services.store import new_store

OLD = "0" * 40


@pytest.fixture
def store(tmp_path_factory, tmp_path):
    return new_store(tmp_path_factory.getbasetemp(), tmp_path)


@pytest.fixture
def head() -> str:
    """Read per test: in a shared working tree another developer may commit meanwhile."""
    return git_head()


def grid_at(store, commit: str) -> dict[str, str]:
    ids = {}
    for k in (1, 2, 3):
        for i, s in enumerate(("first", "middle", "last")):
            ids[f"k{k}_{s}"] = fabricate(store.client, store.exp_id, k=k, subset=s, commit=commit,
                                         accuracy=0.8 - 0.1 * k - 0.01 * i, tps=100.0 * (1 + 0.25 * (k - 1)))
    return ids


def cells():
    return build_request("tiny_gsm", "1,2,3", "first,middle,last", None, 4, None, ()).cells("generate_until")


def test_tables_from_one_commit(store, head):
    grid_at(store, head)
    picks = cmp.pick(cells(), fetch_runs(store.client, store.exp_id), head, False, False)
    values = cmp.tables(picks, [1, 2, 3], ["first", "middle", "last"])
    assert values["speedup over k=1"][(3, "last")] == pytest.approx(1.5)
    assert values["accuracy"][(2, "middle")] == pytest.approx(0.59)
    text = cmp.format_tables(picks, values, [1, 2, 3], ["first", "middle", "last"])
    rows = [line.split() for line in text.splitlines()]
    assert ["k=3", "1.50x", "1.50x", "1.50x"] in rows
    assert ["k=1", "70.0%", "69.0%", "68.0%"] in rows


def test_refuses_other_commits_and_dirty_runs_naming_them(store, head):
    ids = grid_at(store, head)
    store.client.delete_run(ids["k2_middle"])
    stale = fabricate(store.client, store.exp_id, k=2, subset="middle", commit=OLD)
    dirty = fabricate(store.client, store.exp_id, k=3, subset="last", commit=head, dirty=True)
    store.client.delete_run(ids["k3_last"])
    runs = fetch_runs(store.client, store.exp_id)
    with pytest.raises(cmp.Refused) as e:
        cmp.pick(cells(), runs, head, False, False)
    assert f"k2_middle: {stale[:8]}@0000000" in str(e.value) and f"k3_last: {dirty[:8]}" in str(e.value)
    assert "--include-other-commits" in str(e.value)
    with pytest.raises(cmp.Refused):   # including other commits still leaves the dirty run out
        cmp.pick(cells(), runs, head, True, False)
    picks = {p.cell.name: p for p in cmp.pick(cells(), runs, head, True, True)}
    assert picks["k2_middle"].starred and picks["k2_middle"].run.run_id == stale
    assert picks["k3_last"].starred and not picks["k1_first"].starred
    out = CliRunner(env=store.env).invoke(cmp.compare_cmd, ["--task", "tiny_gsm", "--limit", "4"])
    assert out.exit_code == 1 and "refusing runs not from clean" in out.output and stale[:8] in out.output


def test_compare_logs_text_png_and_nests_the_runs(store, head, tmp_path):
    ids = grid_at(store, head)
    out = CliRunner(env=store.env).invoke(cmp.compare_cmd, ["--task", "tiny_gsm", "--limit", "4",
                                                           "--out", str(tmp_path)])
    assert out.exit_code == 0, out.output
    for title in ("accuracy", "tokens/s", "speedup over k=1", "skipped fraction"):
        assert f"\n{title}\n" in out.output
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    parent = out.output.strip().split()[-1]
    run = store.client.get_run(parent)
    assert run.data.tags["reuse_exp.role"] == "compare" and run.data.tags["git_commit"] == head
    assert run.info.status == "FINISHED"
    assert run.data.metrics["accuracy.k1_first"] == pytest.approx(0.7)
    assert {a.path for a in store.client.list_artifacts(parent)} == {"compare.png", "compare.txt", "compare.json"}
    assert all(store.client.get_run(r).data.tags["mlflow.parentRunId"] == parent for r in ids.values())
    again = CliRunner(env=store.env).invoke(cmp.compare_cmd, ["--task", "tiny_gsm", "--limit", "4"])
    assert again.output.strip().split()[-1] == parent   # same runs, same parent


def test_refuses_runs_that_differ_in_unpinned_settings(store, head):
    """A CPU and a GPU run of one grid: accuracy may agree, tokens/s do not belong together."""
    ids = grid_at(store, head)
    gpu = fabricate(store.client, store.exp_id, k=2, subset="last", commit=head, resolved_device="cuda:0",
                    resolved_dtype="bfloat16")
    with pytest.raises(cmp.Refused) as e:
        cmp.pick(cells(), fetch_runs(store.client, store.exp_id), head, False, False)
    assert "device_type: cpu" in str(e.value) and f"cuda ({gpu[:8]})" in str(e.value)
    assert "resolved_dtype: float32" in str(e.value) and "-P NAME=VALUE" in str(e.value)
    assert ids


def test_loglikelihood_compare_is_one_cell(store, head):
    fabricate(store.client, store.exp_id, task="tiny_mc", commit=head, kind="loglikelihood", skipped=0.0)
    out = CliRunner(env=store.env).invoke(cmp.compare_cmd, ["--task", "tiny_mc", "--limit", "4", "--no-log"])
    assert out.exit_code == 0, out.output
    assert "grid is one run" in out.output and "k=2" not in out.output


def test_nothing_to_compare_says_what_to_run(store):
    out = CliRunner(env=store.env).invoke(cmp.compare_cmd, ["--task", "tiny_gsm", "--no-log"])
    assert out.exit_code == 1 and "run `reuse-exp grid run` first" in out.output

"""compare: one k=1 baseline per grid, n and stderr, speed ratios that print noise as noise,
paired counts, refusals that name runs, the PNG and the parent run."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from reuse_exp.evaluation.stats import sample_records
from reuse_exp.cli.study import compare_cmd
from reuse_exp.study import compare as cmp
from reuse_exp.study.cells import build_request
from reuse_exp.study.measures import MIN_TIMINGS, pair, speed_ratio
from reuse_exp.study.store import fetch_runs
from reuse_exp.tracking.schema import config_key
from reuse_exp.tracking.ui import VIEW_ID, VIEW_TAG_PREFIX
from services.fabricate import PARAMS, fabricate
from services import store as stores

store = stores.fabricated_store   # a Store of its own per test (services/store.py)
head = stores.head

OLD = "0" * 40
SUBSETS = ("first", "middle", "last")
# Per-batch tokens/s of a k=1 run: eight batches, +-10% between them (prompt lengths, early stops).
BASE = [90.0, 95.0, 100.0, 105.0, 110.0, 98.0, 102.0, 93.0]


def cells():
    return build_request("tiny_gsm", k="1,2,3", subset="first,middle,last", limit=4).cells("generate_until")


def scaled(factor: float, rates=BASE) -> list[float]:
    return [r * factor for r in reversed(rates)]   # another order too: the runs are not paired by batch


def grid_at(store, commit: str, speedup: dict[int, float] | None = None) -> dict[str, str]:
    """k1 once, k2 and k3 per subset; k=2 runs as fast as k=1 (within noise), k=3 1.5x faster."""
    speedup = speedup or {1: 1.0, 2: 1.02, 3: 1.5}
    ids = {"k1_any": fabricate(store.client, store.exp_id, k=1, subset="middle", commit=commit, accuracy=0.75,
                               rates=BASE)}
    for k in (2, 3):
        for i, s in enumerate(SUBSETS):
            ids[f"k{k}_{s}"] = fabricate(store.client, store.exp_id, k=k, subset=s, commit=commit,
                                         accuracy=0.75 - 0.125 * (k - 1) - 0.125 * (i == 2),
                                         rates=scaled(speedup[k]))
    return ids


def rows_of(store, head):
    picks = cmp.pick(cells(), fetch_runs(store.client, store.exp_id), head, False, False)
    return {r.pick.cell.name: r for r in cmp.rows(store.client, picks)}


def table_rows(text: str) -> dict[str, str]:
    return {line.split()[0]: line for line in text.splitlines() if line.startswith("k")}


# -- the k=1 baseline, once ---------------------------------------------------------------------
def test_k1_is_one_cell_for_every_subset(store, head):
    names = [c.name for c in cells()]
    assert names == ["k1_any", "k2_first", "k2_middle", "k2_last", "k3_first", "k3_middle", "k3_last"]
    baseline = cells()[0]
    assert "subset" not in baseline.as_dict()          # the run is given no subset: any k=1 run matches
    run = fabricate(store.client, store.exp_id, k=1, subset="last", commit=head)
    picks = cmp.pick(cells(), fetch_runs(store.client, store.exp_id), head, False, False)
    assert picks[0].run.run_id == run and all(p.run is None for p in picks[1:])
    only_k2 = build_request("tiny_gsm", k="2", subset="first", limit=4).cells("generate_until")
    assert [c.name for c in only_k2] == ["k2_first"]


def test_config_key_ignores_layers_at_k1_only():
    k1 = {**PARAMS, "k": "1", "layers": "1,2,3", "device_type": "cpu"}
    assert config_key(k1) == config_key({**k1, "layers": "5,6,7"})
    k2 = {**k1, "k": "2"}
    assert config_key(k2) != config_key({**k2, "layers": "5,6,7"})


# -- speed: ratios with intervals; noise as noise -------------------------------------------------
def test_speed_ratio_interval_and_noise():
    same = speed_ratio([BASE], [scaled(1.03)])
    assert same.has_interval and same.low < 1 < same.high and same.within_noise
    assert same.text() == "~1 (noise)"
    fast = speed_ratio([BASE], [scaled(1.5)])
    assert fast.low > 1.3 and fast.text() == "1.50x" and not fast.within_noise
    assert speed_ratio([BASE], [scaled(1.5)]) == fast      # a fixed seed: the same table twice
    one = speed_ratio([[700.0]], [[740.0]])                 # one big batch: one timing each
    assert not one.has_interval and one.text() == "1.06x?" and one.interval_text() == "none: 1 timing"
    few = speed_ratio([BASE[:MIN_TIMINGS - 1]], [scaled(1.5)[:MIN_TIMINGS - 1]])
    assert not few.has_interval


def test_repeated_baseline_runs_carry_the_drift_between_runs(store, head):
    """k=1 ran four times, once on a busy machine (30% slower); inside each run the batches agree
    within 2%. A k=2 run on a busy machine looks 0.75x against the newest k=1 run alone, and
    against the 32 batches of k=1 pooled as if independent; resampling runs, then batches, it is noise."""
    tight = [98.0, 99.0, 100.0, 101.0, 102.0, 99.5, 100.5, 100.0]
    for i, factor in enumerate((0.7, 1.0, 1.0, 1.0)):
        fabricate(store.client, store.exp_id, k=1, commit=head, rates=scaled(factor, tight), start_ms=1_000 + i)
    fabricate(store.client, store.exp_id, k=2, subset="first", commit=head, rates=scaled(0.75, tight))
    assert speed_ratio([tight], [scaled(0.75, tight)]).text() == "0.75x"
    pooled = [scaled(f, tight) for f in (0.7, 1.0, 1.0, 1.0)]
    assert speed_ratio([[r for run in pooled for r in run]], [scaled(0.75, tight)]).text() == "0.75x"
    rows = rows_of(store, head)
    assert rows["k2_first"].ratio.within_noise and rows["k2_first"].ratio.text() == "~1 (noise)"
    base = rows["k1_any"]
    assert len(base.pick.runs) == 4 and base.figures()["timed_batches"] == 32 and base.figures()["runs"] == 4
    assert "(32 in 4 runs)" in cmp.format_rows([base])


def test_three_k1_like_runs_are_within_noise_and_a_real_difference_is_a_ratio(store, head):
    """The issue's case: runs of one configuration that differ by a few percent in tokens/s."""
    grid_at(store, head)
    rows = rows_of(store, head)
    for name in ("k2_first", "k2_middle", "k2_last"):
        assert rows[name].ratio.within_noise and rows[name].ratio.text() == "~1 (noise)"
    for name in ("k3_first", "k3_middle", "k3_last"):
        assert rows[name].ratio.text() == "1.50x" and rows[name].ratio.low > 1
    text = cmp.format_rows(list(rows.values()))
    lines = table_rows(text)
    assert "~1 (noise)" in lines["k2_first"] and "1.02x" not in text
    assert "1.50x" in lines["k3_last"] and "baseline" in lines["k1_any"]


def test_each_row_shows_n_accuracy_stderr_and_tokens_per_second_spread(store, head):
    grid_at(store, head)
    rows = rows_of(store, head)
    f = rows["k1_any"].figures()
    assert f["n_samples"] == 8 and f["timed_batches"] == 8
    assert f["tokens_per_second_median"] == pytest.approx(99.0)
    assert f["tokens_per_second_p25"] == pytest.approx(94.5) and f["tokens_per_second_p75"] == pytest.approx(102.75)
    line = table_rows(cmp.format_rows(list(rows.values())))["k1_any"].split()
    assert line[:6] == ["k1_any", "8", "75.0%", "±", "16.4", "99.0"] and "(8)" in line


def test_compare_ranks_a_run_of_two_ranks_by_its_all_ranks_median(store, head):
    """The figure compare ranks by is the one the run logged: two ranks decode twice the tokens."""
    fabricate(store.client, store.exp_id, k=1, commit=head, rates=BASE)
    fabricate(store.client, store.exp_id, k=2, subset="first", commit=head, rates=BASE, world_size=2)
    rows = rows_of(store, head)
    two = rows["k2_first"]
    assert two.figures()["tokens_per_second_median"] == pytest.approx(2 * rows["k1_any"].figures()["tokens_per_second_median"])
    assert two.ratio.point == pytest.approx(2.0)


def test_a_run_without_per_batch_timings_says_it_has_one(store, head):
    fabricate(store.client, store.exp_id, k=1, commit=head, tps=700.0)
    fabricate(store.client, store.exp_id, k=2, subset="first", commit=head, tps=740.0)
    row = rows_of(store, head)["k2_first"]
    assert row.ratio.text() == "1.06x?" and row.ratio.interval_text() == "none: 1 timing"
    assert "1.06x?" in cmp.format_rows([row])
    assert "speedup_within_noise" not in row.figures() and row.figures()["speedup"] == pytest.approx(740 / 700)


# -- paired view -------------------------------------------------------------------------------------
def test_paired_counts_against_k1(store, head):
    base_correct = [True, True, True, False, False, True, False, True]
    base_out = ["a", "b", "c", "d", "e", "f", "g", "h"]
    other_correct = [True, False, True, True, False, True, False, False]   # c->w: docs 1, 7; w->c: doc 3
    other_out = ["a", "B", "c", "D", "E", "f", "g", "H"]                     # changed: 1, 3, 4, 7
    fabricate(store.client, store.exp_id, k=1, commit=head, correct=base_correct, outputs=base_out, rates=BASE)
    fabricate(store.client, store.exp_id, k=2, subset="middle", commit=head, correct=other_correct,
              outputs=other_out, rates=BASE)
    row = rows_of(store, head)["k2_middle"]
    p = row.paired
    assert (p.pairs, p.changed, p.correct_to_wrong, p.wrong_to_correct, p.unpaired) == (8, 4, 2, 1, 0)
    f = row.figures()
    assert (f["outputs_changed"], f["correct_to_wrong"], f["wrong_to_correct"]) == (4, 2, 1)
    assert f["accuracy"] == pytest.approx(0.5) and rows_of(store, head)["k1_any"].figures()["accuracy"] == 0.625
    line = table_rows(cmp.format_rows([row]))["k2_middle"].split()
    assert line[-3:] == ["4/8", "2", "1"]


def test_pairs_only_documents_both_scored():
    rec = lambda i, c, o: {"task": "t", "doc_id": i, "correct": c, "output": o}   # noqa: E731
    p = pair([rec(0, True, "x"), rec(1, True, "y"), rec(2, True, "z")],      # doc 1: no 0/1 metric in one run
             [rec(0, False, "x2"), rec(1, None, "y2"), rec(3, True, "w")])
    assert (p.pairs, p.changed, p.correct_to_wrong, p.wrong_to_correct, p.unpaired) == (2, 2, 1, 0, 2)


def test_sample_records_keep_the_primary_filter_once_per_document():
    rows = [{"doc_id": 0, "filter": "flexible-extract", "exact_match": 0.0, "resps": [["a"]]},
            {"doc_id": 0, "filter": "strict-match", "exact_match": 1.0, "resps": [["a"]]},
            {"doc_id": 1, "filter": "flexible-extract", "exact_match": 1.0, "resps": [["b"]]},
            {"doc_id": 1, "filter": "strict-match", "exact_match": 0.0, "resps": [["b"]]}]
    recs = sample_records({"gsm8k": rows}, "exact_match,strict-match")
    assert [(r["doc_id"], r["correct"]) for r in recs] == [(0, True), (1, False)]
    assert recs[0]["output"] != recs[1]["output"]
    assert len(sample_records({"gsm8k": rows}, None)) == 2


def test_runs_without_per_sample_file_pair_from_lm_evals_samples(store, head, tmp_path):
    """Runs older than per_sample.jsonl: their samples_<task>.jsonl is parsed instead."""
    ids = []
    for k, correct in ((1, [1.0, 0.0]), (2, [0.0, 0.0])):
        rid = fabricate(store.client, store.exp_id, k=k, subset="first", commit=head)
        path = tmp_path / "samples_tiny_gsm.jsonl"
        path.write_text("".join(json.dumps({"doc_id": i, "filter": "strict-match", "exact_match": c,
                                            "resps": [[f"{k}{i}"]]}) + "\n" for i, c in enumerate(correct)))
        store.client.log_artifact(rid, str(path))
        ids.append(rid)
    p = rows_of(store, head)["k2_first"].paired
    assert (p.pairs, p.changed, p.correct_to_wrong, p.wrong_to_correct) == (2, 2, 1, 0)


# -- the command ----------------------------------------------------------------------------------
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
    assert picks["k3_last"].starred and not picks["k1_any"].starred
    out = CliRunner(env=store.env).invoke(compare_cmd, ["--task", "tiny_gsm", "--limit", "4"])
    assert out.exit_code == 1 and "refusing runs not from clean" in out.output and stale[:8] in out.output


def test_compare_logs_text_png_and_metrics_and_nests_the_runs(store, head, tmp_path):
    ids = grid_at(store, head)
    out = CliRunner(env=store.env).invoke(compare_cmd, ["--task", "tiny_gsm", "--limit", "4",
                                                           "--out", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "n = 8 documents per configuration" in out.output and "k1_any is the baseline of every subset" in out.output
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    parent = out.output.strip().split()[-1]
    run = store.client.get_run(parent)
    assert run.data.tags["reuse_exp.role"] == "compare" and run.data.tags["git_commit"] == head
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert m["accuracy.k1_any"] == pytest.approx(0.75) and m["n_samples.k2_first"] == 8
    assert m["accuracy_stderr.k1_any"] == pytest.approx((0.75 * 0.25 / 7) ** 0.5)
    assert m["speedup.k3_last"] == pytest.approx(1.5) and m["speedup_low.k3_last"] > 1
    assert m["speedup_within_noise.k2_first"] == 1.0 and m["speedup_within_noise.k3_first"] == 0.0
    assert m["tokens_per_second_median.k1_any"] == pytest.approx(99.0)
    assert {a.path for a in store.client.list_artifacts(parent)} == {"compare.png", "compare.txt", "compare.json"}
    # the grid's runs stay at the top of the runs table (not folded under the comparison), in the study's view
    assert run.data.tags["compared_runs"] == ",".join(sorted(ids.values()))
    assert not any("mlflow.parentRunId" in store.client.get_run(r).data.tags for r in ids.values())
    assert VIEW_TAG_PREFIX + VIEW_ID in store.client.get_experiment(store.exp_id).tags
    folded = next(iter(ids.values()))
    store.client.set_tag(folded, "mlflow.parentRunId", parent)   # as earlier versions nested them
    again = CliRunner(env=store.env).invoke(compare_cmd, ["--task", "tiny_gsm", "--limit", "4"])
    assert again.output.strip().split()[-1] == parent   # same runs, same parent
    assert "mlflow.parentRunId" not in store.client.get_run(folded).data.tags


def test_figure_has_legends_axes_from_zero_error_bars_and_n(store, head):
    import matplotlib
    import matplotlib.pyplot as plt

    from reuse_exp.study.figure import BASELINE_COLOUR, COLOURS, MARKERS, figure
    grid_at(store, head)
    rows = list(rows_of(store, head).values())
    fig, (colours, markers, caption) = figure(rows, "t")
    ax = fig.axes[0]
    assert ax.get_xlim()[0] == 0 and ax.get_ylim()[0] == 0 and ax.get_yticks()[-1] == 100
    assert "tokens/s" in ax.get_xlabel() and "%" in ax.get_ylabel()
    assert [t.get_text() for t in colours.get_texts()] == ["k=1 baseline (every layer)", "subset first",
                                                          "subset middle", "subset last"]
    assert [t.get_text() for t in markers.get_texts()] == ["k=1", "k=2", "k=3"]
    assert "n = 8 documents per configuration" in caption.get_text() and "8 timed batches" in caption.get_text()
    assert len(ax.containers) == 7 and all(c.has_xerr and c.has_yerr for c in ax.containers)
    colour_of = {"any": BASELINE_COLOUR, "first": COLOURS[0], "middle": COLOURS[1], "last": COLOURS[2]}
    for r, c in zip(rows, ax.containers):   # colour = subset (the last axis), marker = k (the first)
        point, cell = c.lines[0], r.pick.cell
        assert point.get_color() == colour_of[cell.value("subset")]
        assert point.get_marker() == MARKERS[cell.value("k") - 1]
    assert [h.get_facecolor() for h in colours.legend_handles] == [
        matplotlib.colors.to_rgba(colour_of[s]) for s in ("any", "first", "middle", "last")]
    plt.close(fig)


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
    out = CliRunner(env=store.env).invoke(compare_cmd, ["--task", "tiny_mc", "--limit", "4", "--no-log"])
    assert out.exit_code == 0, out.output
    assert "grid is one run" in out.output and "k2" not in out.output and "k1_any" in out.output


def test_nothing_to_compare_says_what_to_run(store):
    out = CliRunner(env=store.env).invoke(compare_cmd, ["--task", "tiny_gsm", "--no-log"])
    assert out.exit_code == 1 and "run `reuse-exp grid run` first" in out.output

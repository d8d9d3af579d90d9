"""The guard over what surrounds the code: a grid whose cells ran in different environments
(GPU model, CUDA, library versions) or read different data (task version, configuration,
documents) at one commit is flagged by the audit, refused by `compare` unless asked, and not
"done" for a grid run here. GPU model and CUDA differences are fabricated store records;
the data differences, the thread count and what a run logs are real runs on this machine."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import subprocess_env

from reuse_exp.cli.study import audit_cmd, compare_cmd, grid
from reuse_exp.study.audit import audit
from reuse_exp.study.cells import build_request
from reuse_exp.study.grid import DONE, STALE, grid_status
from reuse_exp.study.store import fetch_runs
from reuse_exp.tracking.schema import ANY_ENVIRONMENT_TAG
from services.fabricate import environment_tags, fabricate
from services import store as stores

store = stores.fabricated_store   # a Store of its own per test (services/store.py)
head = stores.head

A100 = environment_tags(cuda="12.1", device="NVIDIA A100-SXM4-80GB")
H100 = environment_tags(cuda="12.8", device="NVIDIA H100 80GB HBM3")
CELLS = [(1, "first"), (2, "first"), (2, "middle"), (2, "last")]


def grid_of(store, commit: str, odd: dict, where=(2, "middle"), base: dict = A100, **kw) -> dict:
    """A whole grid at `commit`, every cell on `base` but the one at `where` on `odd`."""
    return {(k, s): fabricate(store.client, store.exp_id, k=k, subset=s, commit=commit,
                              env=odd if (k, s) == where else base, **kw) for k, s in CELLS}


def audit_lines(store) -> list[str]:
    out = CliRunner(env=store.env).invoke(audit_cmd, [])
    return [line for line in out.output.splitlines() if "mixes environments" in line], out


# -- the audit -----------------------------------------------------------------------------------
def test_audit_names_the_cell_on_another_gpu_and_cuda_in_one_line(store, head):
    ids = grid_of(store, head, H100)
    lines, out = audit_lines(store)
    assert out.exit_code == 1
    assert len(lines) == 1, out.output
    assert lines[0].split()[0] == ids[(2, "middle")]
    assert lines[0].endswith("k2_middle: CUDA 12.8 on NVIDIA H100 80GB HBM3; "
                             "every other cell: CUDA 12.1 on NVIDIA A100-SXM4-80GB"), lines[0]


@pytest.mark.parametrize("odd, says", [
    (environment_tags(cuda="12.8", device="NVIDIA A100-SXM4-80GB"), "CUDA 12.8; every other cell: CUDA 12.1"),
    (environment_tags(cuda="12.1", device="NVIDIA H100 80GB HBM3"), "on NVIDIA H100 80GB HBM3; every other"),
    (environment_tags(cuda="12.1", device="NVIDIA A100-SXM4-80GB", torch="2.7.0"), "torch 2.7.0"),
    (environment_tags(cuda="12.1", device="NVIDIA A100-SXM4-80GB", cudnn="91002"), "cuDNN 91002"),
    (environment_tags(cuda="12.1", device="NVIDIA A100-SXM4-80GB", lm_eval="0.4.9"), "lm-eval 0.4.9"),
    (environment_tags(cuda="12.1", device="NVIDIA A100-SXM4-80GB", data_digest="e" * 16), "data tiny_gsm documents eeeeee"),
])
def test_audit_flags_library_versions_and_data(store, head, odd, says):
    grid_of(store, head, odd)
    lines, out = audit_lines(store)
    assert len(lines) == 1 and f"k2_middle: {says}" in lines[0], out.output


def test_what_does_not_shape_a_result_splits_nothing(store, head):
    """MLflow's version, the hostname and the threads describe a run; they never split a table."""
    context = {**A100, "env.mlflow": "2.0.0", "env.hostname": "elsewhere", "env.torch_threads": "64",
               "env.omp_num_threads": "64"}
    grid_of(store, head, context)
    assert audit(fetch_runs(store.client, store.exp_id)) == []


def test_a_grid_told_the_environment_does_not_matter_is_checked_for_data_only(store, head):
    tag = {ANY_ENVIRONMENT_TAG: "true"}
    grid_of(store, head, H100, tags=tag)
    assert audit(fetch_runs(store.client, store.exp_id)) == []
    grid_of(store, head, {**A100, "data_digest": "e" * 16}, tags=tag)   # newer runs, one read other data
    lines, _ = audit_lines(store)
    assert len(lines) == 1 and "k2_middle: data tiny_gsm" in lines[0]


def test_a_whole_grid_on_the_new_machine_supersedes_the_old_one(store, head):
    grid_of(store, head, A100, base=A100)
    grid_of(store, head, H100, base=H100)    # every cell again, newer, on one other machine
    assert audit(fetch_runs(store.client, store.exp_id)) == []


# -- compare -------------------------------------------------------------------------------------
def compare(store, *flags):
    return CliRunner(env=store.env).invoke(compare_cmd, ["--task", "tiny_gsm", "--limit", "4", "--k", "1,2",
                                                         "--no-log", *flags])


def test_compare_refuses_a_mixed_table_then_stars_it_saying_what_was_mixed(store, head):
    grid_of(store, head, H100)
    refused = compare(store)
    assert refused.exit_code == 1
    assert ("k2_middle: CUDA 12.8 on NVIDIA H100 80GB HBM3; every other cell: CUDA 12.1 on "
            "NVIDIA A100-SXM4-80GB") in refused.output
    assert "--include-other-environments" in refused.output
    shown = compare(store, "--include-other-environments")
    assert shown.exit_code == 0, shown.output
    rows = {line.split()[0] for line in shown.output.splitlines() if line.startswith("k")}
    assert "k2_middle*" in rows and "k2_first" in rows and "k1_any" in rows
    assert "mixed environments or data (* cells):\n  k2_middle: CUDA 12.8" in shown.output


def test_repeats_on_two_machines_compare_only_with_the_difference_shown(store, head):
    grid_of(store, head, A100)
    again = fabricate(store.client, store.exp_id, k=1, commit=head, env=H100)   # k=1 again, on an H100
    refused = compare(store)
    assert refused.exit_code == 1 and f"k1_any run {again[:8]}: CUDA 12.8" in refused.output, refused.output
    shown = compare(store, "--include-other-environments")
    assert shown.exit_code == 0 and "k1_any*" in shown.output


def test_compare_of_one_environment_is_unchanged(store, head):
    grid_of(store, head, A100)
    out = compare(store)
    assert out.exit_code == 0 and "*" not in "".join(l.split()[0] for l in out.output.splitlines()
                                                     if l.startswith("k")), out.output


# -- the grid ------------------------------------------------------------------------------------
def here_on(tags: dict):
    """A machine whose environment is that of `tags` (what the grid can know of it)."""
    values = tuple(sorted((k[4:], v) for k, v in tags.items()
                          if k[4:] in ("torch", "transformers", "lm_eval", "cuda", "cudnn", "device")))
    return lambda device_type: values


def test_a_cell_done_on_another_gpu_is_not_done_here_unless_told(store, head):
    grid_of(store, head, H100)
    runs = fetch_runs(store.client, store.exp_id)
    request = build_request("tiny_gsm", k="1,2", subset="first,middle,last", limit=4)
    on_a100 = {s.cell.name: s for s in grid_status(request, runs, head, "generate_until", where=here_on(A100))}
    assert on_a100["k2_middle"].state == STALE and on_a100["k2_middle"].label() == "stale@env"
    assert {n for n, s in on_a100.items() if s.state == DONE} == {"k1_any", "k2_first", "k2_last"}
    on_h100 = {s.cell.name: s.state for s in grid_status(request, runs, head, "generate_until", where=here_on(H100))}
    assert {n for n, s in on_h100.items() if s == DONE} == {"k2_middle"}
    anywhere = grid_status(request, runs, head, "generate_until", where=None)
    assert all(s.state == DONE for s in anywhere)


def test_grid_run_here_plans_the_cells_done_elsewhere_and_any_environment_skips_them(store, head):
    """This machine (a CPU) against a grid whose cells were done on GPUs at HEAD."""
    grid_of(store, head, H100, base=A100)
    grid_of(store, head, A100, where=(2, "first"), base=environment_tags())   # k1, k2_middle, k2_last here
    args = ["run", "--task", "tiny_gsm", "--limit", "4", "--k", "1,2", "--dry-run"]
    planned = CliRunner(env=store.env).invoke(grid, args)
    assert planned.exit_code == 0, planned.output
    assert [l.split()[2] for l in planned.output.splitlines() if l.startswith("would run")] == ["k2_first:"]
    told = CliRunner(env=store.env).invoke(grid, [*args, "--any-environment"])
    assert "nothing to run: all 4 configuration(s) done" in told.output, told.output


# -- real runs: what a run logs, which data it read, and whether threads shape its tokens -------------
def run_cli(repo, store_uri, *args, env=None):
    proc = subprocess.run([sys.executable, "-m", "reuse_exp.cli", "run", *args], cwd=repo,
                          env={**subprocess_env(store_uri), "MLFLOW_EXPERIMENT_NAME": "grid", **(env or {})},
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def edited(tasks_dir, dst, edit_yaml=None, edit_data=None):
    shutil.copytree(tasks_dir, dst)
    yaml = dst / "t_gen.yaml"
    text = yaml.read_text()
    if edit_data:   # its own data file, one document changed
        text = text.replace(str(tasks_dir), str(dst))
        (dst / "data.jsonl").write_text(edit_data((dst / "data.jsonl").read_text()))
    yaml.write_text(edit_yaml(text) if edit_yaml else text)
    return dst


@pytest.mark.slow
def test_real_runs_log_environment_and_data_and_the_audit_flags_other_data(clean_repo, store, tiny_ckpt,
                                                                            tasks_dir, tmp_path):
    """One grid at one commit; three cells read edited copies of the task: its YAML (a stop
    sequence), one document, the prompt. Each is a line of the audit naming that cell."""
    same = edited(tasks_dir, tmp_path / "same")
    yaml = edited(tasks_dir, tmp_path / "yaml", edit_yaml=lambda t: t.replace("until: ['Question:']",
                                                                               "until: ['Question:', 'Q:']"))
    doc = edited(tasks_dir, tmp_path / "doc", edit_data=lambda t: t.replace("What is 1 plus 1?", "What is 1 + 1?"))
    prompt = edited(tasks_dir, tmp_path / "prompt", edit_yaml=lambda t: t.replace('\\nAnswer:"', '\\nA:"'))
    common = ["--model", str(tiny_ckpt), "--task", "t_gen", "--limit", "3", "--max-new-tokens", "8"]
    cells = [("1", "first", tasks_dir), ("2", "first", same), ("3", "first", yaml), ("2", "middle", doc),
             ("2", "last", prompt)]
    for k, subset, include in cells:
        run_cli(clean_repo, store.uri, *common, "--k", k, "--subset", subset, "--include-path", str(include),
                env={"REUSE_EXP_ANY_ENVIRONMENT": "1"} if k == "3" else None)
    cl, exp = store.client, store.exp_id
    runs = {(r.data.params["k"], r.data.params["subset"]): r for r in cl.search_runs([exp])}
    base = runs[("1", "first")]

    tags = base.data.tags
    from reuse_exp.tracking.environment import cpu_model
    assert tags["env.device"] == cpu_model() == tags["device_name"] != "x86_64"
    assert tags["env.cuda"] == "none" and tags["env.dtype"] == "float32" and tags["env.path"] == "eager"
    assert "cuda_visible_devices" not in tags and "env.gpu_count" not in tags   # GPUs only where there are any
    threads = os.environ["OMP_NUM_THREADS"]   # the runs inherit it (conftest: 1 unless set)
    assert tags["env.omp_num_threads"] == threads and int(tags["env.torch_threads"]) == int(threads)
    assert base.data.metrics["peak_rss_mb"] > 50
    assert ANY_ENVIRONMENT_TAG not in tags and runs[("3", "first")].data.tags[ANY_ENVIRONMENT_TAG] == "true"
    record = json.loads(Path(cl.download_artifacts(base.info.run_id, "environment.json")).read_text())
    assert record["shapes_result"]["torch"] == tags["env.torch"]
    assert record["context"]["hostname"] == tags["env.hostname"]
    assert record["data"][0]["documents"] == 3 and record["peak_rss_mb"] > 50
    (dataset,) = base.inputs.dataset_inputs
    assert dataset.dataset.name == "t_gen" and dataset.dataset.digest == tags["data.t_gen.digest"]

    def data(key):
        return {k: runs[key].data.tags[f"data.t_gen.{k}"] for k in ("version", "config_hash", "digest")}
    assert data(("2", "first")) == data(("1", "first")), "another copy of the same task reads the same data"
    assert data(("3", "first"))["config_hash"] != data(("1", "first"))["config_hash"]
    assert data(("3", "first"))["digest"] == data(("1", "first"))["digest"]   # same documents and prompts
    assert data(("2", "middle"))["digest"] != data(("1", "first"))["digest"]
    assert data(("2", "last"))["digest"] != data(("1", "first"))["digest"]     # the prompt lm-eval built
    assert data(("2", "last"))["config_hash"] != data(("1", "first"))["config_hash"]

    findings = [f for f in audit(fetch_runs(cl, exp)) if "mixes environments" in f.reason]
    assert sorted(f.reason.split(": ")[1] for f in findings) == ["k2_last", "k2_middle", "k3_first"], findings
    assert all(f.reason.count("most cells: data t_gen") == 1 for f in findings)
    reasons = {f.reason.split(": ")[1]: f.reason for f in findings}
    assert "k3_first: data t_gen config " in reasons["k3_first"] and "documents" not in reasons["k3_first"]
    assert "k2_middle: data t_gen " in reasons["k2_middle"] and " documents " in reasons["k2_middle"]


def test_thread_count_does_not_change_the_bundled_models_tokens():
    """Measured, so the thread count is context, not part of the environment that shapes a
    result: the bundled model decodes the same tokens at 1 and 2 torch threads."""
    import torch

    from reuse_exp.engine.decoding import generate
    from reuse_exp.engine.loading import decode_config_for, load_model, load_tokenizer
    from reuse_exp.engine.policies.fixed import FixedPolicy
    from reuse_exp.evaluation.models import bundled_model_dir
    if bundled_model_dir() is None:
        pytest.skip("no bundled model in this checkout")
    model, ckpt = load_model(bundled_model_dir(), "float32")
    tok = load_tokenizer(ckpt)
    rows = [json.loads(l) for l in (bundled_model_dir().parents[1] / "evaluation" / "tasks" / "data" /
                                    "tiny_gsm_test.jsonl").read_text().splitlines()[:4]]
    prompts = [tok(f"Question: {r['question']}\nAnswer:")["input_ids"] for r in rows]
    cfg = decode_config_for(tok, max_new_tokens=64)
    before = torch.get_num_threads()
    out = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            policy = FixedPolicy.create(model.config.num_hidden_layers, k=2, subset="middle", mode="output")
            out[threads] = generate(model, prompts, cfg, policy).tokens
    finally:
        torch.set_num_threads(before)
    assert out[1] == out[2] and sum(map(len, out[1])) > 20


def test_grid_run_any_environment_reaches_its_runs(store, head, monkeypatch):
    """The jobs inherit REUSE_EXP_ANY_ENVIRONMENT, which a run logs as a tag (the real run above)."""
    from reuse_exp.study import grid as grid_mod
    seen = []
    monkeypatch.setattr(grid_mod, "run_local", lambda cells, *a, **kw: seen.append(
        __import__("os").environ.get("REUSE_EXP_ANY_ENVIRONMENT")) or [])
    args = ["run", "--task", "tiny_gsm", "--limit", "4", "--k", "1", "--allow-dirty"]
    for flags in ([], ["--any-environment"]):
        out = CliRunner(env=store.env).invoke(grid, [*args, *flags])
        assert out.exit_code == 0, out.output
    assert seen == [None, "1"]
    assert "REUSE_EXP_ANY_ENVIRONMENT" not in __import__("os").environ


def test_config_hash_is_the_task_not_where_its_yaml_lies():
    """A grid's jobs read the bundled YAML from a snapshot elsewhere: the same task."""
    from reuse_exp.tracking.data import config_hash
    cfg = {"task": "t", "doc_to_text": "Question: {{q}}", "metadata": {"version": 1.0, "config_source": "/a/t.yaml"}}
    assert config_hash(cfg) == config_hash({**cfg, "metadata": {"version": 1.0, "config_source": "/b/t.yaml"}})
    assert config_hash(cfg) != config_hash({**cfg, "doc_to_text": "Q: {{q}}"})
    assert config_hash(cfg) != config_hash({**cfg, "metadata": {"version": 2.0, "config_source": "/a/t.yaml"}})

"""The decoding path a run takes by default, the compile cache that makes a machine pay the
fast path's kernel compilation once, and the warm-up the benchmark measures in fresh processes."""
import dataclasses
import json
import os
import shlex
import shutil

import pytest
import torch

from reuse_exp.cli.tools import bench as bench_cmd
from reuse_exp.cli.tools import bench_command
from reuse_exp.engine import compile_cache
from reuse_exp.engine.bench import BenchArgs, BenchResult
from reuse_exp.engine.bench_paths import fresh_processes
from reuse_exp.engine.bench_report import warmup_table
from reuse_exp.engine.compile_cache import ENV_VARS, compile_dir, key_parts, use_compile_caches
from reuse_exp.engine.fast import FastRunner
from reuse_exp.engine.loading import random_model
from reuse_exp.engine.static_forward import layer_step
from reuse_exp.errors import SettingError
from reuse_exp.evaluation.models import make_runner
from reuse_exp.settings import RunSettings

CPU = torch.device("cpu")


@pytest.fixture
def root(monkeypatch, tmp_path):
    """An empty cache root, and neither compile cache variable set (restored afterwards)."""
    monkeypatch.setenv("REUSE_EXP_CACHE_ROOT", str(tmp_path / "cache"))
    for var in ENV_VARS:
        monkeypatch.setenv(var, "")   # recorded, so whatever the code sets is undone
    return tmp_path / "cache"


# -- the path a run takes -----------------------------------------------------------------------
def test_on_the_cpu_the_paths_are_unchanged(root):
    model = random_model("tiny", seed=0)
    assert (FastRunner(model).name, FastRunner(model).step) == ("static", layer_step)
    assert make_runner(model, "auto").name == "eager" and make_runner(model, "eager").name == "eager"
    assert make_runner(model, "fast").name == "static"


def test_the_compiled_path_is_gone_and_a_typo_is_one_line():
    assert RunSettings().decode_path == "auto"
    for typo in ("complied", "compiled"):
        with pytest.raises(SettingError, match=rf"^decode_path={typo}: use one of auto, eager, fast$"):
            RunSettings.parse({"decode_path": typo})


# -- the compile cache --------------------------------------------------------------------------
def test_the_compile_folder_is_keyed_by_torch_and_the_engine_code(root, monkeypatch, tmp_path):
    here = key_parts(CPU)
    assert compile_dir(here).parent == root / "compile"
    assert compile_dir(key_parts(CPU)) == compile_dir(here)    # the same machine, the same folder
    code = tmp_path / "engine"
    code.mkdir()
    for name in compile_cache.COMPILED_CODE:
        shutil.copy(compile_cache.ENGINE / name, code / name)
    assert compile_dir(key_parts(CPU, code)) == compile_dir(here)   # the code's contents, not its place
    with open(code / "triton_kernels.py", "a") as f:
        f.write("\n# an edit\n")
    assert compile_dir(key_parts(CPU, code)) != compile_dir(here)
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert compile_dir(key_parts(CPU)) != compile_dir(here)


def test_the_caches_go_under_the_root_unless_the_user_set_them(root, monkeypatch, tmp_path):
    mine = str(tmp_path / "my_inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", mine)
    folder = compile_dir(key_parts(CPU))
    assert use_compile_caches(CPU) == {"TORCHINDUCTOR_CACHE_DIR": mine, "TRITON_CACHE_DIR": str(folder / "triton")}
    assert json.loads((folder / "key.json").read_text())["torch"] == torch.__version__
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "my_triton"))
    assert use_compile_caches(CPU)["TRITON_CACHE_DIR"] == str(tmp_path / "my_triton")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == mine


def test_torch_s_own_default_is_not_the_user_s(root, monkeypatch):
    """Importing Inductor sets its variable to torch's default: the package's folder replaces it."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    folder = compile_dir(key_parts(CPU))
    assert use_compile_caches(CPU)["TORCHINDUCTOR_CACHE_DIR"] == str(folder / "torchinductor")


# -- the benchmark's paths and warm-up ----------------------------------------------------------
SETTINGS = {"shape": "tiny", "device": "cpu", "dtype": "float32", "prompt_len": 32, "new_tokens": 32,
            "batches": [1, 2]}


@pytest.mark.slow
def test_two_fresh_processes_report_their_first_and_warm_decodes(monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")   # not for the measured processes
    w = fresh_processes(SETTINGS, processes=2)
    assert w["path"] == "static" and [p["cache"] for p in w["processes"]] == ["empty", "kept"]
    for p in w["processes"]:
        assert [b["batch"] for b in p["batches"]] == [1, 2]
        assert all(0 < b["warm_s"] and 0 < b["first_s"] < p["process_s"] for b in p["batches"])
        assert 0 < p["model_ready_s"] < p["process_s"] and p["caches"] is None
    assert w["goals"] == {"first_s": 10.0, "second_process_s": 3.0}
    assert w["met"]["first"] == (w["processes"][0]["batches"][0]["first_s"] <= 10.0)
    result = BenchResult(machine={"python": "3", "torch": "t", "date": "d"}, settings={}, command="",
                         bandwidth_gbs=1, peak_tflops=1, weights_gb=1, fresh_processes=[w])
    table = "\n".join(warmup_table(result))
    assert "| static | 2 (kept) |" in table and "second process ≤ 3 s" in table


def test_quick_is_the_preset_and_given_options_win():
    from reuse_exp.engine.bench import QUICK
    ctx = bench_cmd.make_context("bench", ["--quick", "--batch", "1"])
    params = dict(ctx.params)
    quick = params.pop("quick")
    given = {k for k in params if ctx.get_parameter_source(k).name != "DEFAULT"}
    assert quick and given == {"batch"}
    assert QUICK["warmup_processes"] == 0 and set(QUICK) <= {f.name for f in dataclasses.fields(BenchArgs)}


def test_the_warm_up_options_repeat_in_the_recorded_command():
    argv = ["--warmup-batches", "1,8", "--warmup-processes", "3"]
    params = bench_cmd.make_context("bench", argv).params
    json_out, md, quick = params.pop("json_out"), params.pop("markdown"), params.pop("quick")
    args = BenchArgs(**params)
    assert (args.warmup_batches, args.warmup_processes) == ((1, 8), 3)
    again = bench_cmd.make_context("bench", shlex.split(bench_command(args, json_out, md))[2:]).params
    assert again == {**params, "json_out": json_out, "markdown": md, "quick": quick}
    assert BenchArgs(device="cpu").resolved().warmup_processes == 0

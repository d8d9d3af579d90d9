"""The decoding path a run takes by default (the one that decodes eager's tokens), the compile
cache that makes a machine pay compilation once, and the warm-up the benchmark measures in
fresh processes."""
import json
import os
import shlex
import shutil
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from reuse_exp.cli import main
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
def test_the_default_gpu_path_runs_the_layers_as_written():
    """On a GPU (faked: the runner reads only the model's device when built) the default runner
    and decode path `auto` replay graphs of the uncompiled layers; `compiled` is the opt-in."""
    gpu_model = SimpleNamespace(device=torch.device("cuda"))
    runner = FastRunner(gpu_model)
    assert (runner.name, runner.use_graphs, runner.step) == ("cuda-graph", True, layer_step)
    assert make_runner(gpu_model, "auto").name == "cuda-graph"
    assert make_runner(gpu_model, "fast").name == "cuda-graph"


def test_on_the_cpu_the_paths_are_unchanged(root):
    model = random_model("tiny", seed=0)
    assert (FastRunner(model).name, FastRunner(model).step) == ("static", layer_step)
    assert make_runner(model, "auto").name == "eager" and make_runner(model, "eager").name == "eager"
    assert make_runner(model, "fast").name == "static"
    assert make_runner(model, "compiled").name == "static+compile"


def test_decode_path_compiled_parses_and_a_typo_is_one_line():
    assert RunSettings.parse({"decode_path": "compiled"}).decode_path == "compiled"
    assert RunSettings().decode_path == "auto"
    with pytest.raises(SettingError, match=r"^decode_path=complied: use one of auto, eager, fast, compiled$"):
        RunSettings.parse({"decode_path": "complied"})


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
    with open(code / "static_forward.py", "a") as f:
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


def test_a_compiled_runner_points_the_caches_before_it_compiles(root):
    runner = FastRunner(random_model("tiny", seed=0), compile_layers=True)
    assert runner.name == "static+compile"
    folder = compile_dir(key_parts(CPU))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder / "torchinductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(folder / "triton")


# -- the benchmark's paths and warm-up ----------------------------------------------------------
SETTINGS = {"shape": "tiny", "device": "cpu", "dtype": "float32", "prompt_len": 32, "new_tokens": 32,
            "batches": [1, 2]}


@pytest.mark.slow
def test_two_fresh_processes_report_their_first_and_warm_decodes(monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")   # not for the measured processes
    w = fresh_processes(SETTINGS | {"compile": False}, processes=2)
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


@pytest.mark.slow
def test_a_second_process_finds_the_compiled_kernels_of_the_first(monkeypatch, tmp_path):
    """The compiled path on the CPU (Inductor's C++ kernels): the second process reads what the
    first compiled, from the measurement's own root (not the caches this user keeps), and its
    first decode is much shorter."""
    for var in ENV_VARS:
        monkeypatch.setenv(var, str(tmp_path / var))
    w = fresh_processes(SETTINGS | {"compile": True, "batches": [1]}, processes=2)
    first, second = (p["batches"][0]["first_s"] for p in w["processes"])
    caches = [p["caches"] for p in w["processes"]]
    assert caches[0] == caches[1] and all("reuse_exp_warmup_" in c and "/compile/" in c for c in caches[0].values())
    assert second < first / 2, (first, second)


def test_compare_compiled_with_compile_is_refused_in_one_line():
    out = CliRunner().invoke(main, ["bench", "--compare-compiled", "--compile"])
    assert out.exit_code == 2 and "drop --compile" in out.output and "Traceback" not in out.output


def test_the_warm_up_options_repeat_in_the_recorded_command():
    argv = ["--compare-compiled", "--warmup-batches", "1,8", "--warmup-processes", "3"]
    params = bench_cmd.make_context("bench", argv).params
    json_out, md = params.pop("json_out"), params.pop("markdown")
    args = BenchArgs(**params)
    assert (args.compare_compiled, args.warmup_batches, args.warmup_processes) == (True, (1, 8), 3)
    again = bench_cmd.make_context("bench", shlex.split(bench_command(args, json_out, md))[2:]).params
    assert again == {**params, "json_out": json_out, "markdown": md}
    assert BenchArgs(device="cpu").resolved().warmup_processes == 0 and not BenchArgs().compile

"""Shared fixtures: a random tiny checkpoint with a byte-level tokenizer, and two small tasks.

They stand in for the bundled model where a test must not depend on its training, and
give the tracked run something to evaluate in seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# The tiny model's ops are too small to gain from intra-op threads, and on two shared cores
# the threads' barriers cost ten times the work (measured: 17 s against 1.6 s for one decode).
# Set before torch is imported here or in any subprocess a test starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# MLflow's usage telemetry asks a server from a thread of every process that imports it: here
# there is no network, and one such lookup crashed a test worker (SIGSEGV in getaddrinfo).
# MLflow skips it under pytest only where PYTEST_CURRENT_TEST was set at import, which neither
# collection nor the tests' subprocesses have; DO_NOT_TRACK reaches both.
os.environ.setdefault("DO_NOT_TRACK", "true")
# The speed probe spreads its bursts over a second before and after each run's evaluation
# (tracking/probe.py); the suite's runs are not timed for their speed, and tests/test_speed.py
# gives the probe its real span.
os.environ.setdefault("REUSE_EXP_PROBE_SPAN_S", "0.02")
# Every run keeps its requests' results for a resume (runner/resume.py): not in the home folder.
os.environ.setdefault("REUSE_EXP_CACHE_ROOT", tempfile.mkdtemp(prefix="reuse_exp_requests_"))

import pytest  # noqa: E402

# tests/reference.py and other helpers import as top-level modules
sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]


# The test files that take longest on two cores (seconds summed from a full run's --durations),
# slowest first. xdist's loadfile gives each worker whole files in collection order (with
# --no-loadscope-reorder; its own order is by test count): the long files start first and the
# short ones fill in at the end, so the two workers finish together. A file missing here only
# runs later; a wrong order costs minutes, never a result.
SLOWEST_FIRST = ("test_lifecycle.py", "test_distributed.py", "test_resume.py", "test_services_store.py",
                 "test_launch.py", "test_grid_policies_e2e.py", "test_services_ui.py", "test_environment.py",
                 "test_tracking.py", "test_grid_e2e.py", "test_services_slurm.py", "test_checkouts.py",
                 "test_fresh_clone.py", "test_refusals.py", "test_cli.py", "test_stride_policy.py",
                 "test_tiny_model.py", "test_frontier.py", "test_policy_registry.py", "test_fast_path.py",
                 "test_harness.py", "test_one_line.py", "test_audit.py", "test_replay.py")


def pytest_collection_modifyitems(config, items):
    """The slowest files first (SLOWEST_FIRST; a stable sort keeps each file's own order).
    `hub` tests need the network: they run only with RUN_HUB_TESTS=1."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    if os.environ.get("RUN_HUB_TESTS") != "1":
        skip = pytest.mark.skip(reason="needs the Hugging Face hub: set RUN_HUB_TESTS=1")
        for item in items:
            if "hub" in item.keywords:
                item.add_marker(skip)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tokenizer(directory: Path) -> None:
    """Byte-level, no merges: 256 byte tokens plus the special tokens Fast-dLLM v2 needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "|<MASK>|"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))


def write_checkpoint(directory: Path, seed: int = 0) -> Path:
    from reuse_exp.engine.loading import random_model, save_model
    save_model(random_model("tiny", seed=seed), directory)
    write_tokenizer(directory)
    return directory


def write_tasks(directory: Path, n: int = 8) -> Path:
    """`t_gen` (generate_until, GSM8K-shaped) and `t_mc` (multiple choice) on local data."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i} plus {i} is {2 * i}.\n#### {2 * i}",
             "choices": [str(2 * i), str(2 * i + 1)], "label": 0} for i in range(n)]
    data = directory / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (directory / "t_gen.yaml").write_text(
        "task: t_gen\n" + common + "output_type: generate_until\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_target: "{{answer}}"\n'
        "generation_kwargs:\n  until: ['Question:']\n  max_gen_toks: 24\n"
        "filter_list:\n  - name: strict-match\n    filter:\n"
        '      - function: regex\n        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"\n'
        "      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    (directory / "t_mc.yaml").write_text(
        "task: t_mc\n" + common + "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    return directory


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"))


@pytest.fixture(scope="session")
def tasks_dir(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


def run_cli(args: list[str], env: dict, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reuse_exp.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def bundled_or(tiny_ckpt: Path, tasks_dir: Path) -> dict[str, str]:
    """Run settings for the e2e tests: the bundled defaults (model and task) where this tree
    has them, else the random checkpoint and the local tasks."""
    from reuse_exp.evaluation.models import bundled_model_dir
    if bundled_model_dir() is not None and (REPO / "reuse_exp" / "evaluation" / "tasks" / "tiny_gsm.yaml").is_file():
        return {}
    return {"model": str(tiny_ckpt), "task": "t_gen", "include_path": str(tasks_dir)}


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """One migrated MLflow sqlite store; tests copy it (migrating takes seconds)."""
    import mlflow
    db = tmp_path_factory.mktemp("store_template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store(store_template, tmp_path) -> str:
    import shutil
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(store_template, db)
    return f"sqlite:///{db}"


def git(args: list[str], cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="session")
def clean_repo(tmp_path_factory) -> Path:
    """The working tree (tracked and untracked-not-ignored files) committed in a fresh repo:
    the code under test, in a checkout the dirty guard accepts."""
    import shutil
    dst = tmp_path_factory.mktemp("repo") / "reuse_exp_repo"
    files = git(["ls-files", "-co", "--exclude-standard", "-z"], REPO).split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    git(["init", "-q", "-b", "main"], dst)
    git(["add", "-A"], dst)
    git(["-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "-m", "snapshot"], dst)
    return dst


def subprocess_env(store_uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTEST_"))}
    env |= {"MLFLOW_TRACKING_URI": store_uri, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_TOKEN": SECRET}
    return env


SECRET = "hf_SECRETtoken0123456789"


def mlflow_run(repo: Path, store_uri: str, params: dict, timeout: int = 900, env: dict | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`mlflow run REPO --env-manager local -P k=v ...`, as a user types it."""
    args = [sys.executable, "-m", "mlflow", "run", str(repo), "--env-manager", "local"]
    for k, v in params.items():
        args += ["-P", f"{k}={v}"]
    return subprocess.run(args, cwd=cwd or repo, env={**subprocess_env(store_uri), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def runs_of(store_uri: str):
    """The store's client and every run in it, deleted ones too (a refused run is deleted once
    `mlflow run` has ended it)."""
    import mlflow
    from mlflow.entities import ViewType
    client = mlflow.MlflowClient(store_uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(exps, run_view_type=ViewType.ALL)

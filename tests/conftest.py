"""Shared fixtures: a random tiny checkpoint with a byte-level tokenizer, and two small tasks.

They stand in for the bundled model where a test must not depend on its training, and
give the tracked run something to evaluate in seconds.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# tests/reference.py and other helpers import as top-level modules
sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
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
    from reuse_exp.loading import random_model, save_model
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


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    """No hub, a private datasets cache, and a secret that must never reach the store."""
    for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                 "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets"), "HF_TOKEN": "hf_SECRETtoken0123456789"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)


def run_cli(args: list[str], env: dict, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reuse_exp.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)

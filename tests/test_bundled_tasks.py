"""The bundled lm-eval tasks: offline loading, lm-eval's gsm8k filters, sound data, no test leak."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reuse_exp.tiny import data as tiny_data
from reuse_exp.evaluation.tasks import TASKS_DIR

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class _Loader(yaml.SafeLoader):
    """Reads lm-eval YAML without importing the `!function` targets."""


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def read_yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_Loader)


# A fresh interpreter: the offline switches are read when `datasets` is imported, and the
# scripted models show what lm-eval's own pipeline (prompt, filters, metric) makes of answers.
LM_EVAL_PROBE = r"""
import json, sys
import lm_eval
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager
from reuse_exp.tiny import data as tiny_data
from reuse_exp.evaluation.tasks import TASKS_DIR

gold = {d["question"]: d for d in tiny_data.read_task_docs("tiny_gsm_test.jsonl")}
mc_gold = {tiny_data.mc_text(d): d for d in tiny_data.read_task_docs("tiny_mc_test.jsonl")}
seen = {"contexts": [], "until": None}

def question_of(context):
    return context.split("Question: ", 1)[1].split("\nAnswer:", 1)[0]

class Scripted(LM):
    def __init__(self, right):
        super().__init__()
        self.right = right
    def generate_until(self, requests):
        out = []
        for r in requests:
            context, kwargs = r.args
            seen["contexts"].append(context)
            seen["until"] = kwargs["until"]
            doc = gold[question_of(context)]
            answer = tiny_data.target_number(doc)
            out.append(doc["answer"] if self.right else doc["answer"].replace("#### " + answer, "#### " + answer + "1"))
        return out
    def loglikelihood(self, requests):
        out = []
        for r in requests:
            context, letter = r.args
            doc = mc_gold[context]
            right = "ABCD"[doc["answer"]] == letter
            out.append((0.0 if right == self.right else -5.0, False))
        return out
    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

tm = TaskManager(include_path=str(TASKS_DIR))
sizes = {name: len(list(task.test_docs())) for name, task in tm.load_task_or_group(["tiny_gsm", "tiny_mc"]).items()}
scores = {}
for right in (True, False):
    res = lm_eval.simple_evaluate(model=Scripted(right), tasks=["tiny_gsm", "tiny_mc"], num_fewshot=0,
                                  limit=12, task_manager=tm)
    scores[str(right)] = {t: {k: v for k, v in m.items() if isinstance(v, float)} for t, m in res["results"].items()}
print("RESULT" + json.dumps({"sizes": sizes, "scores": scores, "context": seen["contexts"][0], "until": seen["until"]}))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    env = {**os.environ, **OFFLINE}
    proc = subprocess.run([sys.executable, "-c", LM_EVAL_PROBE], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_tasks_load_offline_with_full_test_splits(probe):
    assert probe["sizes"]["tiny_gsm"] >= 200
    assert probe["sizes"]["tiny_mc"] >= 200


def test_gsm_prompt_and_until_are_gsm8k_shaped(probe):
    context = probe["context"]
    assert context.startswith("Question: ") and context.endswith("\nAnswer:")
    assert "<|im_end|>" in probe["until"]


def test_filters_and_metric_score_right_and_wrong_answers(probe):
    right, wrong = probe["scores"]["True"], probe["scores"]["False"]
    assert right["tiny_gsm"]["exact_match,strict-match"] == 1.0
    assert right["tiny_gsm"]["exact_match,flexible-extract"] == 1.0
    assert wrong["tiny_gsm"]["exact_match,strict-match"] == 0.0
    assert right["tiny_mc"]["acc,none"] == 1.0
    assert wrong["tiny_mc"]["acc,none"] == 0.0


def test_gsm_task_uses_lm_eval_gsm8k_filters_and_metric():
    import lm_eval
    gsm8k = read_yaml(Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml")
    ours = read_yaml(TASKS_DIR / "tiny_gsm.yaml")
    assert ours["filter_list"] == gsm8k["filter_list"]
    assert ours["metric_list"] == gsm8k["metric_list"]
    assert ours["doc_to_text"] == gsm8k["doc_to_text"]
    assert ours["generation_kwargs"]["do_sample"] is False
    assert ours["generation_kwargs"]["max_gen_toks"] >= 128
    # our strict extraction is the task's regex
    assert ours["filter_list"][0]["filter"][0]["regex_pattern"] == tiny_data.STRICT_MATCH.pattern


def _checked_steps(answer: str) -> list[int]:
    """Evaluate every `a op b = c` of an answer, asserting it; return the results."""
    results = []
    for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", answer):
        a, b, c = int(a), int(b), int(c)
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        assert value == c and (op != "/" or a % b == 0), answer
        results.append(c)
    return results


def test_gsm_answers_are_correct_multi_block_and_end_in_hashes():
    docs = tiny_data.read_task_docs("tiny_gsm_test.jsonl")
    assert len({d["question"] for d in docs}) == len(docs)
    for doc in docs:
        steps = _checked_steps(doc["answer"])
        assert len(steps) >= 2
        assert doc["answer"].endswith(f"\n#### {steps[-1]}")
        assert len(doc["answer"]) >= 64   # character tokens: at least two blocks of 32


def test_mc_items_have_one_right_choice():
    for doc in tiny_data.read_task_docs("tiny_mc_test.jsonl"):
        a, b = map(int, re.findall(r"\d+", doc["question"])[:2])
        result = a + b if "buys" in doc["question"] else a - b
        assert len(set(doc["choices"])) == 4
        assert doc["choices"][doc["answer"]] == str(result)


def test_shipped_data_is_what_the_generator_writes(tmp_path):
    tiny_data.write_task_data(tmp_path)
    for f in ("tiny_gsm_test.jsonl", "tiny_gsm_train.jsonl", "tiny_mc_test.jsonl"):
        assert (tmp_path / f).read_text() == (tiny_data.TASKS_DATA / f).read_text(), f


def test_test_items_never_reach_the_training_stream():
    test_questions = {d["question"] for d in tiny_data.read_task_docs("tiny_gsm_test.jsonl")}
    test_questions |= {d["question"] for d in tiny_data.read_task_docs("tiny_mc_test.jsonl")}
    assert all(tiny_data.in_test_pool(q) for q in test_questions)
    for make in (tiny_data.make_gsm, tiny_data.make_mc):
        gen = tiny_data.stream(make, seed=1, test=False)
        train = [next(gen)["question"] for _ in range(5000)]
        assert not any(tiny_data.in_test_pool(q) for q in train)
        assert not test_questions & set(train)
    # the pool split is real: unfiltered draws do hit the test pool
    import random
    r = random.Random(0)
    assert any(tiny_data.in_test_pool(tiny_data.make_gsm(r)["question"]) for _ in range(200))

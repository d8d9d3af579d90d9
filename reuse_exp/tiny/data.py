"""Data of the bundled tiny model: GSM8K-shaped word problems with small numbers.

Every problem is drawn from one of a few templates (two arithmetic steps each,
numbers below 100) and answered in GSM8K's form: reasoning lines (worded one of several
ways), then `#### <n>`.
The same generator makes the training stream and the shipped test split; a problem
belongs to the test pool iff a hash of its question says so (`in_test_pool`), and
the training stream rejects every such problem, so no test item is ever trained on,
whatever the seed or the stream's length.

`reuse-exp tiny data` rewrites the shipped task data under reuse_exp/evaluation/tasks/data.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

from ..engine.prompts import rewrite_prompt

NAMES = ["Tom", "Anna", "Ben", "Sara", "Leo", "Mia", "Sam", "Lily", "Max", "Emma", "Jack", "Nora",
         "Paul", "Ruth", "Omar", "Ivy", "Carl", "Zoe", "Dan", "Eva"]
ITEMS = ["apples", "pens", "books", "cards", "eggs", "shells", "stamps", "coins", "marbles", "cookies",
         "stickers", "flowers", "candles", "buttons", "rocks"]
PLACES = ["shop", "farm", "school", "library", "bakery", "market"]

TEST_FRACTION = 8          # 1 in 8 questions (by hash) is reserved for the test split
TASKS_DATA = Path(__file__).resolve().parents[1] / "evaluation" / "tasks" / "data"
GSM_TEST_SIZE, GSM_FEWSHOT_SIZE, MC_TEST_SIZE = 200, 16, 200
GSM_TEST_SEED, GSM_FEWSHOT_SEED, MC_TEST_SEED = 1001, 1002, 1003


def in_test_pool(question: str) -> bool:
    digest = hashlib.sha256(question.encode()).digest()
    return int.from_bytes(digest[:4], "little") % TEST_FRACTION == 0


# -- templates: each returns (question, reasoning lines, final number) -----------------------
# Answers vary the way natural ones do: a line's wording is one of three, the operands of
# + and * come in either order, and an opening sentence may precede the steps. Whichever
# variant the model starts, the rest follows; until it commits, those positions stay below
# the decoding threshold, so a small block takes more than one forward (and reuse has
# steps to act on). A fully determined answer would be unmasked in one forward per small
# block, where layer reuse never applies.
OPENINGS = ["", "Let's think step by step.\n", "We solve it in two steps.\n", "Here is the reasoning.\n"]


def _sum(r: random.Random, a: int, b: int, op: str = "+") -> str:
    x, y = (a, b) if r.random() < 0.5 else (b, a)
    return f"{x} {op} {y}"


def _buy_give(r: random.Random):
    n, m = r.sample(NAMES, 2)
    it = r.choice(ITEMS)
    a, b = r.randint(2, 40), r.randint(2, 40)
    s = a + b
    c = r.randint(1, s - 1)
    q = f"{n} has {a} {it}. {n} buys {b} more and then gives {c} to {m}. How many {it} does {n} have now?"
    add = f"{_sum(r, a, b)} = {s} {it}"
    sub = f"{s} - {c} = {s - c} {it}"
    steps = [r.choice([f"{n} buys {b} more, so {n} has {add}.", f"After buying {b} more, {n} has {add}.",
                       f"First, {add}."]),
             r.choice([f"{n} gives {c} to {m}, so {sub} are left.", f"After giving {c} away, {n} has {sub}.",
                       f"Then {sub}."])]
    return q, steps, s - c


def _bags_found(r: random.Random):
    n = r.choice(NAMES)
    it = r.choice(ITEMS)
    a, b = r.randint(2, 9), r.randint(2, 9)
    p = a * b
    c = r.randint(1, 30)
    q = f"{n} buys {a} bags of {it}. Each bag has {b} {it}. {n} also finds {c} {it}. How many {it} does {n} have?"
    mul = f"{_sum(r, a, b, '*')} = {p} {it}"
    add = f"{_sum(r, p, c)} = {p + c} {it}"
    steps = [r.choice([f"The bags hold {mul}.", f"Each of the {a} bags has {b}, so {mul}.", f"First, {mul}."]),
             r.choice([f"With the {c} found, {add}.", f"Adding the {c} found gives {add}.", f"Then {add}."])]
    return q, steps, p + c


def _shop_sells(r: random.Random):
    place = r.choice(PLACES)
    it = r.choice(ITEMS)
    a = r.randint(20, 99)
    b = r.randint(1, a - 2)
    c = r.randint(1, a - b - 1)
    q = f"A {place} has {a} {it}. It sells {b} in the morning and {c} in the afternoon. How many {it} are left?"
    first = f"{a} - {b} = {a - b} {it}"
    second = f"{a - b} - {c} = {a - b - c} {it}"
    steps = [r.choice([f"After the morning, {first} are left.", f"In the morning it sells {b}, so {first} remain.",
                       f"First, {first}."]),
             r.choice([f"After the afternoon, {second} are left.", f"In the afternoon it sells {c}, so {second} remain.",
                       f"Then {second}."])]
    return q, steps, a - b - c


def _weekly_pages(r: random.Random):
    n = r.choice(NAMES)
    a, b = r.randint(2, 12), r.randint(2, 12)
    s = a + b
    c = r.randint(2, 4)
    q = f"{n} reads {a} pages on Monday and {b} pages on Tuesday every week. How many pages does {n} read in {c} weeks?"
    add = f"{_sum(r, a, b)} = {s} pages"
    mul = f"{_sum(r, s, c, '*')} = {s * c} pages"
    steps = [r.choice([f"Each week {n} reads {add}.", f"In one week that is {add}.", f"First, {add} a week."]),
             r.choice([f"In {c} weeks {n} reads {mul}.", f"Over {c} weeks that is {mul}.", f"Then {mul}."])]
    return q, steps, s * c


def _share_equally(r: random.Random):
    n = r.choice(NAMES)
    it = r.choice(ITEMS)
    k, each = r.randint(2, 9), r.randint(2, 9)
    a = k * each
    e = r.randint(1, 20)
    q = f"{n} shares {a} {it} equally among {k} friends. Each friend then gets {e} more. How many {it} does each friend have?"
    div = f"{a} / {k} = {each} {it}"
    add = f"{_sum(r, each, e)} = {each + e} {it}"
    steps = [r.choice([f"Each friend first gets {div}.", f"Sharing {a} among {k} gives {div} each.", f"First, {div}."]),
             r.choice([f"With {e} more, {add}.", f"Adding {e} more gives {add}.", f"Then {add}."])]
    return q, steps, each + e


TEMPLATES = [_buy_give, _bags_found, _shop_sells, _weekly_pages, _share_equally]


MIN_ANSWER_CHARS = 64   # character tokens: every answer fills at least two blocks of 32


def make_gsm(r: random.Random) -> dict:
    while True:   # redraw the few short ones
        q, steps, result = r.choice(TEMPLATES)(r)
        answer = r.choice(OPENINGS) + "\n".join(steps) + f"\n#### {result}"
        if len(answer) >= MIN_ANSWER_CHARS:
            return {"question": q, "answer": answer}


def make_mc(r: random.Random) -> dict:
    """One arithmetic step, four numeric choices, the answer is a letter."""
    n = r.choice(NAMES)
    it = r.choice(ITEMS)
    a, b = r.randint(2, 40), r.randint(2, 40)
    if r.random() < 0.5:
        q, result = f"{n} has {a} {it} and buys {b} more. How many {it} does {n} have now?", a + b
    else:
        a, b = max(a, b), min(a, b)
        q, result = f"{n} has {a} {it} and gives {b} away. How many {it} does {n} have now?", a - b
    wrong = set()
    while len(wrong) < 3:
        w = result + r.choice([-10, -2, -1, 1, 2, 10])
        if w >= 0 and w != result:
            wrong.add(w)
    choices = [str(result)] + [str(w) for w in sorted(wrong)]
    r.shuffle(choices)
    return {"question": q, "choices": choices, "answer": choices.index(str(result))}


def mc_text(doc: dict) -> str:
    """The tiny_mc prompt (the YAML's doc_to_text renders the same string)."""
    lines = [f"Question: {doc['question']}"]
    lines += [f"{'ABCD'[i]}. {c}" for i, c in enumerate(doc["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def stream(make, seed: int, test: bool):
    """Problems of one pool (test or train), distinct questions, reproducible from `seed`."""
    r = random.Random(seed)
    seen = set()
    while True:
        doc = make(r)
        if in_test_pool(doc["question"]) != test or doc["question"] in seen:
            continue
        seen.add(doc["question"])
        yield doc


def take(make, seed: int, test: bool, n: int) -> list[dict]:
    gen = stream(make, seed, test)
    return [next(gen) for _ in range(n)]


# -- prompts and answers, exactly as lm-eval and the harness see them ------------------------
STRICT_MATCH = re.compile(r"#### (\-?[0-9\.\,]+)")   # lm-eval gsm8k's strict-match filter


def strict_answer(text: str) -> str | None:
    """The number after the first `#### `, as the strict-match filter extracts it."""
    m = STRICT_MATCH.search(text)
    return m.group(1) if m else None


def target_number(doc: dict) -> str:
    return doc["answer"].split("#### ")[-1].strip()


def chat_prompt(tokenizer, user: str, task: str) -> str:
    """lm-eval's 0-shot chat-templated context (checked against lm-eval 0.4.13: the user turn
    is doc_to_text verbatim), then the harness's prompt rewrite for `task`."""
    context = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                            add_generation_prompt=True)
    return rewrite_prompt(task, context)


def gsm_prompt(tokenizer, doc: dict) -> str:
    return chat_prompt(tokenizer, f"Question: {doc['question']}\nAnswer:", "tiny_gsm")


def read_task_docs(name: str, data: Path = TASKS_DATA) -> list[dict]:
    with open(data / name) as f:
        return [json.loads(line) for line in f]


def write_task_data(out: Path = TASKS_DATA) -> None:
    out.mkdir(parents=True, exist_ok=True)
    files = {"tiny_gsm_test.jsonl": take(make_gsm, GSM_TEST_SEED, True, GSM_TEST_SIZE),
             # few-shot examples come from the training pool, like gsm8k's train split
             "tiny_gsm_train.jsonl": take(make_gsm, GSM_FEWSHOT_SEED, False, GSM_FEWSHOT_SIZE),
             "tiny_mc_test.jsonl": take(make_mc, MC_TEST_SEED, True, MC_TEST_SIZE)}
    for name, docs in files.items():
        (out / name).write_text("".join(json.dumps(d) + "\n" for d in docs))
        print(f"wrote {len(docs)} items to {out / name}")


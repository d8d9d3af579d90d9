"""The bundled tiny model's reuse table: `python -m reuse_exp.tiny.table [--limit 200] [--readme FILE]`.

For k in 1, 2, 3 and subsets first/middle/last, in output and delta mode, and the replay
control: strict-match accuracy on tiny_gsm's test split, generated tokens/s, the fraction
of layer evaluations that reuse, and the paired view against k=1 (items whose text
changed, correct to wrong, wrong to correct: decoding is deterministic, so these are
exact). Decoding is `reuse_exp.engine.decoding.generate`, batched, with the defaults
(threshold 0.9, block 32, small block 8) and the exact prompts lm-eval builds (0-shot,
chat template, the harness's rewrite). k=1 computes every layer, so it is one measurement.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import data as tiny_data
from . import MODEL_DIR as TINY_MODEL_DIR
from ..engine.decoding import generate
from ..engine.loading import decode_config_for, load_model, load_tokenizer, token_ids
from ..engine.policies.fixed import FixedPolicy
from ..engine.reuse import SUBSETS

MAX_GEN_TOKS = 192   # tiny_gsm.yaml's max_gen_toks
LAYER_MODES = ("output", "delta")


@dataclass
class EvalResult:
    correct: list[bool]
    texts: list[str]
    generated_tokens: int
    seconds: float
    skipped_fraction: float
    replayed_fraction: float = 0.0

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    @property
    def stderr(self) -> float:
        """Of the mean of 0/1 outcomes (lm-eval's: sample standard deviation / sqrt(n))."""
        n, p = len(self.correct), self.accuracy
        return math.sqrt(p * (1 - p) * n / (n - 1) / n) if n > 1 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def paired(self, base: "EvalResult") -> tuple[int, int, int]:
        """Against `base`, item by item: text changed, correct -> wrong, wrong -> correct."""
        changed = sum(a != b for a, b in zip(self.texts, base.texts))
        lost = sum(b and not a for a, b in zip(self.correct, base.correct))
        won = sum(a and not b for a, b in zip(self.correct, base.correct))
        return changed, lost, won


def normalize(number: str | None) -> str | None:
    """lm-eval gsm8k's exact_match ignores ',', '$' and a trailing '.'."""
    if number is None:
        return None
    return re.sub(r"\.$", "", number.replace(",", "").replace("$", ""))


def is_correct(text: str, doc: dict) -> bool:
    return normalize(tiny_data.strict_answer(text)) == normalize(tiny_data.target_number(doc))


def evaluate_gsm(model, tokenizer, docs: list[dict], policy=None, batch_size: int = 200,
                 max_new_tokens: int = MAX_GEN_TOKS) -> EvalResult:
    """Generate for `docs` in batches and score with the strict-match extraction."""
    cfg = decode_config_for(tokenizer, max_new_tokens=max_new_tokens)
    prompts = [tokenizer(tiny_data.gsm_prompt(tokenizer, d), add_special_tokens=False)["input_ids"] for d in docs]
    texts, tokens, seconds, run, skipped, replays, steps = [], 0, 0.0, 0, 0, 0, 0
    for i in range(0, len(prompts), batch_size):
        res = generate(model, prompts[i:i + batch_size], cfg, policy, trace_sample=None)
        texts += [tokenizer.decode(t, skip_special_tokens=True) for t in res.tokens]
        tokens += res.report.generated_tokens
        seconds += res.report.wall_seconds
        run += sum(s.layer_evals_run for s in res.report.samples)
        skipped += sum(s.layer_evals_skipped for s in res.report.samples)
        fw = res.report.summary()["sample_forwards"]
        replays += fw.get("replay", 0)
        steps += sum(fw.get(k, 0) for k in ("full_block", "small_block", "replay"))
    correct = [is_correct(t, d) for t, d in zip(texts, docs)]
    return EvalResult(correct, texts, tokens, seconds, skipped / (run + skipped) if run + skipped else 0.0,
                      replays / steps if steps else 0.0)


@torch.no_grad()
def mc_accuracy(model, tokenizer, docs: list[dict]) -> float:
    """tiny_mc by the public loglikelihood scoring (as the harness does it): the choice letter
    is masked, the sequence padded with masks to a block multiple, one block-causal forward,
    and the letter is scored by the logit before it."""
    from ..engine.model import block_causal_mask
    ids = token_ids(tokenizer)
    bs = model.config.bd_size
    letters = tokenizer.convert_tokens_to_ids(list("ABCD"))
    correct = 0
    for doc in docs:
        prompt = tokenizer(tiny_data.mc_prompt(tokenizer, doc), add_special_tokens=False)["input_ids"]
        length = -(-(len(prompt) + 1) // bs) * bs
        tokens = torch.full((1, length), ids.mask, dtype=torch.long)
        tokens[0, :len(prompt)] = torch.tensor(prompt)
        hidden = model.forward_masked(tokens.to(model.device), torch.arange(length, device=model.device),
                                      block_causal_mask(0, length, length, bs, model.device))
        logprobs = model.logits(hidden[0, len(prompt) - 1]).float().log_softmax(-1)
        correct += int(logprobs[letters].argmax()) == doc["answer"]
    return correct / len(docs)


def fixed_policies(num_layers: int) -> dict[str, FixedPolicy | None]:
    """The study's grid (k x subset, output and delta mode) and the replay control, by name."""
    out: dict[str, FixedPolicy | None] = {"k=1": None}
    for mode in LAYER_MODES:
        for k in (2, 3):
            for subset in SUBSETS:
                out[f"{mode} k={k} {subset}"] = FixedPolicy.create(num_layers, k=k, subset=subset, mode=mode)
    for k in (2, 3):
        out[f"replay k={k}"] = FixedPolicy.create(num_layers, k=k, subset="first", mode="replay")
    return out


def measure(model, tokenizer, docs, batch_size: int, policies: dict) -> dict[str, EvalResult]:
    evaluate_gsm(model, tokenizer, docs[:8], batch_size=8)   # warm-up: the first call is the slow one
    results = {}
    for name, policy in policies.items():
        r = evaluate_gsm(model, tokenizer, docs, policy, batch_size=batch_size)
        results[name] = r
        print(f"{name}: {r.accuracy:.3f}, {r.tokens_per_second:.0f} tok/s, skipped {r.skipped_fraction:.3f}",
              flush=True)
    return results


def cell(r: EvalResult) -> str:
    return f"{r.accuracy:.1%} / {r.tokens_per_second:.0f} / {r.skipped_fraction:.3f}"


def markdown(results: dict[str, EvalResult], num_layers: int, machine: str, n: int, mc: float | None = None,
             batch_size: int | None = None) -> str:
    from ..engine.reuse import resolve_subset
    base = results["k=1"]
    batch = f", batches of {batch_size}" if batch_size else ""
    lines = [f"tiny_gsm test split, {n} items{batch}, strict-match exact match; cell = accuracy / generated "
             f"tokens/s / skipped-layer fraction. Measured on {machine}.", ""]
    layers = ", ".join(f"{s} = {list(resolve_subset(s, num_layers))}" for s in SUBSETS)
    lines += [f"Subsets on {num_layers} layers: {layers}. k=1 computes every layer (one measurement: "
              f"{cell(base)}, ± {base.stderr:.1%} stderr).", ""]
    for mode in LAYER_MODES:
        lines += [f"**{mode} mode**", "", "| k | " + " | ".join(SUBSETS) + " |", "| --- |" + " --- |" * len(SUBSETS)]
        lines.append("| 1 | " + " | ".join(cell(base) for _ in SUBSETS) + " |")
        for k in (2, 3):
            lines.append(f"| {k} | " + " | ".join(cell(results[f"{mode} k={k} {s}"]) for s in SUBSETS) + " |")
        lines.append("")
    lines += ["**replay** (reuse steps skip the whole forward and unmask from the last logits; no subset)", "",
              "| k | all layers |", "| --- | --- |"]
    lines += [f"| {k} | {cell(results[f'replay k={k}'])} |" for k in (2, 3)] + [""]
    lines += [f"**Paired against k=1** (items of {n}: text changed / correct → wrong / wrong → correct)", "",
              "| config | first | middle | last |", "| --- | --- | --- | --- |"]
    for mode in LAYER_MODES:
        for k in (2, 3):
            lines.append(f"| {mode} k={k} | " + " | ".join(
                "{} / {} / {}".format(*results[f"{mode} k={k} {s}"].paired(base)) for s in SUBSETS) + " |")
    for k in (2, 3):
        lines.append(f"| replay k={k} | " + "{} / {} / {}".format(*results[f"replay k={k}"].paired(base))
                     + " (no subset) | | |")
    lines.append("")
    for k in (2, 3):   # observed, not assumed: do the subsets decode alike, and as replay does?
        for mode in LAYER_MODES:
            texts = [results[f"{mode} k={k} {s}"].texts for s in SUBSETS]
            if all(t == texts[0] for t in texts[1:]):
                same = " (and as replay)" if texts[0] == results[f"replay k={k}"].texts else ""
                lines.append(f"{mode} mode, k={k}: first, middle and last generated identical text for "
                             f"every item{same}.")
    if mc is not None:
        lines.append(f"tiny_mc (loglikelihood, first-token scoring like the harness; chance 25%): {mc:.1%}.")
    return "\n".join(lines)


def machine_description(threads: int, dtype: str) -> str:
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
             if line.startswith("model name")] if info.is_file() else []
    load = f", load average {os.getloadavg()[0]:.1f} at the start" if hasattr(os, "getloadavg") else ""
    return (f"{names[0] if names else cpu} ({os.cpu_count()} cores{load}), {threads} torch thread(s), "
            f"torch {torch.__version__}, {dtype}")


def update_readme(path: Path, table: str, section: str = "tiny_table") -> None:
    text = path.read_text()
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} section")
    head, rest = text.split(start, 1)
    path.write_text(head + start + "\n" + table + "\n" + end + rest.split(end, 1)[1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Reuse table of the bundled tiny model (markdown).")
    ap.add_argument("--model", type=Path, default=TINY_MODEL_DIR)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=200)
    # k=1 on the 200 items, 2 idle cores: 2 threads 58 s (batch 50) or 71 s (batch 200),
    # 1 thread 102 s (batch 50). On cores that other jobs share, the threads' barriers cost
    # several times the work (one cell took 10x longer), hence 1 thread by default.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--readme", type=Path, help="also write the table into this README's tiny_table section")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, dtype=args.dtype)
    tokenizer = load_tokenizer(args.model)
    docs = tiny_data.read_task_docs("tiny_gsm_test.jsonl")[:args.limit]
    t0 = time.perf_counter()
    machine = machine_description(args.threads, args.dtype)
    results = measure(model, tokenizer, docs, args.batch_size, fixed_policies(model.num_layers))
    mc = mc_accuracy(model, tokenizer, tiny_data.read_task_docs("tiny_mc_test.jsonl"))
    table = markdown(results, model.num_layers, machine, len(docs), mc, args.batch_size)
    print(table)
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.readme:
        update_readme(args.readme, table)


if __name__ == "__main__":
    main()

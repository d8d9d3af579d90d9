"""The lm-eval model: generation honours each request, scoring covers every answer token, stats add up."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from lm_eval.api.instance import Instance

from reuse_exp.engine.model import block_causal_mask
from reuse_exp.engine.prompts import REASONING_INSTRUCTION
from reuse_exp.engine.reuse import resolve_subset
from reuse_exp.evaluation import harness
from reuse_exp.evaluation import lm as lm_mod
from reuse_exp.evaluation import models
from reuse_exp.evaluation import stats as stats_mod
from reuse_exp.settings import RunSettings


@pytest.fixture(scope="module")
def lm(tiny_ckpt):
    return lm_mod.FastDLLMv2LM(RunSettings(model=str(tiny_ckpt), k=2, subset="middle", dtype="float32",
                                           device="cpu", batch_size=2, max_new_tokens=64))


def gen_request(context: str, i: int, task: str = "t_gen", **gen_kwargs) -> Instance:
    return Instance("generate_until", doc={}, arguments=(context, gen_kwargs), idx=0,
                    metadata=(task, i, 1))


def ll_request(context: str, continuation: str, i: int) -> Instance:
    return Instance("loglikelihood", doc={}, arguments=(context, continuation), idx=0, metadata=("t_mc", i, 1))


def test_registered_with_lm_eval():
    from lm_eval.api.registry import get_model
    assert get_model("fast_dllm_v2") is lm_mod.FastDLLMv2LM


def test_generate_until_honours_budget_until_and_rewrite(lm):
    lm.stats = stats_mod.HarnessStats()
    reqs = [gen_request("Question: 1+1?\nAnswer:", 0, task="gsm8k", until=["Question:"], max_gen_toks=5),
            gen_request("short", 1, until=["x"], max_gen_toks=40),
            gen_request("a much longer prompt than the others, " * 3, 2, max_gen_toks=40)]
    out = lm.generate_until(reqs)
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
    gens = {g["doc_id"]: g for g in lm.stats.generations}
    assert REASONING_INSTRUCTION in gens[0]["prompt"] and "Answer:" not in gens[0]["prompt"]
    assert gens[1]["prompt"] == "short"
    # max_gen_toks bounds what is returned (byte-level tokenizer: a token is at most one character)
    assert len(out[0]) <= 5 and len(out[1]) <= 40
    for i, g in gens.items():
        assert g["returned"] == lm_mod._cut_at(g["raw"], ["Question:"] if i == 0 else ["x"] if i == 1 else [])
        assert out[i] == g["returned"]
    assert lm.stats.warmup_seconds > 0


def test_cut_at_the_first_stop_string():
    assert lm_mod._cut_at("abc Question: x Answer: y", ["Answer:", "Question:"]) == "abc "
    assert lm_mod._cut_at("abc", []) == "abc" and lm_mod._cut_at("abc", [""]) == "abc"


def test_decoder_budget_covers_the_longest_prompt(lm):
    batch = [lm_mod._GenItem(0, None, "", [1] * 40, [], 5), lm_mod._GenItem(1, None, "", [1] * 3, [], 5)]
    budget = lm._decoder_budget(batch)
    assert budget % 32 == 0 and (budget // 32 + 40 // 32) * 32 - 40 >= 5


def test_stats_count_tokens_up_to_stop_and_reuse(lm):
    lm.stats = stats_mod.HarnessStats()
    lm.generate_until([gen_request("hello there", i, max_gen_toks=40) for i in range(3)])
    m = lm.stats.metrics()
    reports = lm.stats.decode
    assert m["generated_tokens"] == sum(s.generated_tokens for r in reports for s in r.samples) > 0
    assert m["tokens_per_second"] == pytest.approx(m["generated_tokens"] / m["seconds"])
    rates = sorted(r.generated_tokens / r.wall_seconds for r in reports)   # 3 requests, batches of 2
    assert m["timed_batches"] == 2 == len(rates)
    assert m["tokens_per_second_median"] == pytest.approx((rates[0] + rates[1]) / 2)
    assert m["tokens_per_second_p25"] == pytest.approx(rates[0] + (rates[1] - rates[0]) / 4)
    assert m["forwards_small_block"] > 0 and 0 < m["skipped_fraction"] < 1
    assert lm.stats.task_kind == "generate_until"
    trace = lm.stats.trace()
    assert trace["first_batch_sample0_trace"] and len(trace["layer_totals_computed_reused"]) == lm.model.num_layers


def masked_logprob(lm, visible: list[int], target: int) -> tuple[float, bool]:
    """Written out: `visible`, then a mask at the target's place, masks to a block multiple; one
    block-causal forward; the target predicted by the logit before it."""
    cfg = lm.decode_config
    length = -(-(len(visible) + 1) // cfg.block_size) * cfg.block_size
    tokens = torch.full((1, length), cfg.mask_id)
    tokens[0, :len(visible)] = torch.tensor(visible)
    mask = block_causal_mask(0, length, length, cfg.block_size, "cpu")
    with torch.no_grad():
        hidden = lm.model.forward_masked(tokens, torch.arange(length), mask)
        logits = lm.model.logits(hidden)[0, len(visible) - 1].float()
    return float(F.log_softmax(logits, -1)[target]), int(logits.argmax()) == target


def reference_continuation(lm, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Every continuation token by the chain rule: earlier tokens visible, this one and later masked."""
    terms = [masked_logprob(lm, ctx + cont[:i], cont[i]) for i in range(len(cont))]
    return sum(t for t, _ in terms), all(g for _, g in terms)


def reference_first_token(lm, ctx: list[int], cont: list[int]) -> float:
    """The public scoring written out: only the first continuation token masked, the rest visible."""
    cfg = lm.decode_config
    seq = ctx + cont
    length = -(-len(seq) // cfg.block_size) * cfg.block_size
    tokens = torch.full((1, length), cfg.mask_id)
    tokens[0, :len(seq)] = torch.tensor(seq)
    tokens[0, len(ctx)] = cfg.mask_id
    mask = block_causal_mask(0, length, length, cfg.block_size, "cpu")
    with torch.no_grad():
        hidden = lm.model.forward_masked(tokens, torch.arange(length), mask)
        logits = lm.model.logits(hidden)[0, len(ctx) - 1].float()
    return float(F.log_softmax(logits, -1)[cont[0]])


def with_settings(lm, **changes):
    """The same loaded model under other settings (loading again would cost seconds)."""
    other = lm_mod.FastDLLMv2LM.__new__(lm_mod.FastDLLMv2LM)
    other.__dict__.update(lm.__dict__, stats=stats_mod.HarnessStats())
    other.settings = lm.settings.replace(**changes)
    other.batch_size = other.settings.batch_size
    return other


LL_REQUESTS = [("Question: what is 2 plus 2?\nAnswer:", " 4"), ("Q?", "A"), ("x" * 70, "yz"),
               ("x" * 30, " across a block boundary")]


def test_loglikelihood_scores_every_continuation_token(lm):
    scorer = with_settings(lm, scoring="continuation")
    reqs = [ll_request(c, t, i) for i, (c, t) in enumerate(LL_REQUESTS)]
    out = scorer.loglikelihood(reqs)
    for (ctx, cont), (ll, greedy) in zip(LL_REQUESTS, out):
        c, t = scorer._encode_pair(ctx, cont)
        want, want_greedy = reference_continuation(scorer, c, t)
        assert ll == pytest.approx(want, abs=1e-4) and greedy == want_greedy
    one = with_settings(scorer, batch_size=1)
    assert [round(x, 4) for x, _ in one.loglikelihood(reqs)] == [round(x, 4) for x, _ in out]
    m = scorer.stats.metrics()
    tokens = sum(len(scorer._encode_pair(c, t)[1]) for c, t in LL_REQUESTS)
    assert m["scored_tokens"] == tokens and m["forwards_masked"] == tokens and m["truncated_continuations"] == 0
    assert m["skipped_fraction"] == 0 and m["generated_tokens"] == 0 and m["loglikelihood_ties"] == 0
    assert m["timed_batches"] == 2 and m["tokens_per_second_p25"] <= m["tokens_per_second_median"]
    assert scorer.stats.task_kind == "loglikelihood"
    assert scorer.stats.trace() == {"note": stats_mod.LOGLIKELIHOOD_NOTE}


def test_first_token_scoring_is_the_public_one(lm):
    public = with_settings(lm, scoring="first_token")
    reqs = [ll_request(c, t, i) for i, (c, t) in enumerate(LL_REQUESTS)]
    out = public.loglikelihood(reqs)
    for (ctx, cont), (ll, _) in zip(LL_REQUESTS, out):
        assert ll == pytest.approx(reference_first_token(public, *public._encode_pair(ctx, cont)), abs=1e-4)
    m = public.stats.metrics()
    assert m["scored_tokens"] == 4 and m["truncated_continuations"] == 3


def write_abc_task(directory, n: int = 4):
    """Choices ` (A)`, ` (B)`, ` (C)`: 4 byte tokens each, equal in the first two. Each question is
    exactly one block (32 bytes), so the first answer token's logit sits in a block that cannot
    see the rest of the answer."""
    import json
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"question": f"Which letter is number {i}?".ljust(32, "."), "choices": ["(A)", "(B)", "(C)"],
             "label": i % 3} for i in range(n)]
    assert all(len(r["question"]) == 32 for r in rows)
    (directory / "abc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "t_abc.yaml").write_text(
        f"task: t_abc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {directory / 'abc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    return directory


def test_choices_that_differ_after_the_first_token_do_not_tie(lm, tmp_path, caplog):
    tasks = write_abc_task(tmp_path / "tasks")
    tm = harness.task_manager_for("t_abc", [str(tasks)])
    results = {}
    for scoring in ("continuation", "first_token"):
        scorer = with_settings(lm, scoring=scoring, batch_size=3)
        caplog.clear()
        out = harness.evaluate(scorer, "t_abc", tm, apply_chat_template=False, fewshot_as_multiturn=False)
        results[scoring] = (scorer.stats.metrics()["loglikelihood_ties"], out["samples"]["t_abc"], caplog.text)
    ties, samples, warned = results["continuation"]
    assert ties == 0 and "tied" not in warned
    for s in samples:   # every choice has its own score
        lls = [r[0][0] for r in s["resps"]]
        assert len(set(lls)) == 3, lls
    ties, samples, warned = results["first_token"]
    assert ties == 4 and "4 of 4 documents have tied best choices (scoring=first_token)" in warned
    assert all(len({r[0][0] for r in s["resps"]}) == 1 for s in samples)


def test_rolling_loglikelihood_says_why_not(lm):
    with pytest.raises(NotImplementedError, match="rolling"):
        lm.loglikelihood_rolling([])


def test_chat_template_and_params(lm):
    text = lm.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    p = lm.params()
    middle = ",".join(map(str, resolve_subset("middle", lm.model.num_layers)))
    assert (p["k"], p["subset"], p["layers"], p["resolved_dtype"], p["model_revision"]) == (
        "2", "middle", middle, "float32", "local")
    assert len(p["model_hash"]) == 16


def test_random_weights_of_a_named_shape(tiny_ckpt):
    a = models.load("random:tiny", dtype="float32", tokenizer=str(tiny_ckpt), seed=3)
    b = models.load("random:tiny", dtype="float32", tokenizer=str(tiny_ckpt), seed=3)
    assert a.model_hash == b.model_hash and a.revision == "random" and a.path is None
    assert torch.equal(a.model.lm_head.weight, b.model.lm_head.weight)


def test_missing_model_and_bad_settings_are_config_errors(tmp_path, tiny_ckpt):
    with pytest.raises(lm_mod.ConfigError, match="not found"):
        models.load(str(tmp_path / "nothing_here"))
    with pytest.raises(lm_mod.ConfigError, match="batch_size=auto: give a whole number"):
        lm_mod.FastDLLMv2LM.create_from_arg_string(f"pretrained={tiny_ckpt},batch_size=auto")
    with pytest.raises(lm_mod.ConfigError, match="does not take"):
        lm_mod.FastDLLMv2LM.create_from_arg_obj({"pretrained": str(tiny_ckpt), "reuse_k": 2})


def test_primary_metric():
    assert harness.primary_metric({"exact_match,flexible-extract": 0.1, "exact_match,strict-match": 0.2,
                                   "exact_match_stderr,strict-match": 0.01}) == ("exact_match,strict-match", 0.2)
    assert harness.primary_metric({"acc,none": 0.5, "acc_norm,none": 0.6}) == ("acc,none", 0.5)
    assert harness.primary_metric({"alias": "x"}) is None


def test_unknown_task_names_the_fix(tasks_dir):
    assert "t_gen" in harness.task_manager_for("t_gen", [str(tasks_dir)]).all_tasks


@pytest.mark.slow
def test_lm_eval_cli_uses_the_model(tiny_ckpt, tasks_dir, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run(
        [sys.executable, "-m", "reuse_exp.cli", "lm-eval", "run", "--model", "fast_dllm_v2", "--model_args",
         f"pretrained={tiny_ckpt},dtype=float32,max_new_tokens=32,k=2,subset=last",
         "--include_path", str(tasks_dir), "--tasks", "t_mc", "--limit", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "t_mc" in out.stdout and "acc" in out.stdout


@pytest.mark.slow
def test_study_tasks_are_known_to_lm_eval():
    tm = harness.task_manager_for("gsm8k")  # indexes lm-eval's own tasks (half a minute)
    assert {"gsm8k", "mmlu", "minerva_math", "ifeval", "gpqa_main_zeroshot"} <= set(tm.all_tasks)


def test_gated_task_without_a_token_fails_in_one_line(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no stored login either
    with pytest.raises(lm_mod.ConfigError, match="gated data set Idavidrein/gpqa.*HF_TOKEN"):
        harness.check_gated("gpqa_main_zeroshot")
    harness.check_gated("gsm8k")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    harness.check_gated("gpqa_main_zeroshot")


@pytest.mark.hub
def test_gsm8k_from_the_hub(tiny_ckpt):
    """The real task path: gsm8k's data from the hub, prompt rewrite, strict-match metric."""
    lm = lm_mod.FastDLLMv2LM(RunSettings(model=str(tiny_ckpt), dtype="float32", max_new_tokens=32))
    results = harness.evaluate(lm, "gsm8k", harness.task_manager_for("gsm8k"), limit=1)
    assert "exact_match,strict-match" in results["results"]["gsm8k"]
    assert "Please reason step by step" in lm.stats.generations[0]["prompt"]


def test_hub_checkpoint_from_the_cache_is_pinned_to_its_commit(tiny_ckpt, tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub (here its offline cache): the run records the
    snapshot's commit as revision and model hash."""
    import shutil
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(tiny_ckpt, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    loaded = models.load("org/tiny", dtype="float32")
    assert (loaded.revision, loaded.model_hash) == (sha, sha[:16])

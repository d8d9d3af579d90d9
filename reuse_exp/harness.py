"""lm-eval model `fast_dllm_v2`: reuse-enabled block-diffusion generation and public scoring.

Registered with lm-eval on import. Through this package: `reuse-exp run` (tracked),
or lm-eval's own CLI with the model registered first:

    reuse-exp lm-eval run --model fast_dllm_v2 --model_args pretrained=DIR,k=2,subset=middle \
        --tasks gsm8k --apply_chat_template --fewshot_as_multiturn --batch_size 1

(`reuse-exp lm-eval ARGS` is `lm-eval ARGS` after `import reuse_exp.harness`; lm-eval
0.4.13 has no plugin entry points.)

`pretrained` is a checkpoint directory, a hub id, `bundled` (the package's tiny model)
or `random:<shape>` (random weights of a named shape from config.SHAPES, for benchmarks
and dry runs: its outputs mean nothing).
"""
from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from .config import ConfigError, shape as named_shape
from .decoding import DecodeConfig, EagerRunner, generate
from .fast import FastRunner
from .instrument import DecodeReport
from .loading import (checkpoint_hash, decode_config_for, load_model, load_tokenizer, parse_dtype,
                      random_model, resolve_checkpoint)
from .model import FastDLLM, block_causal_mask
from .prompts import rewrite_prompt
from .reuse import ReusePolicy

BUNDLED = "bundled"
RANDOM_PREFIX = "random:"
SCORING_KIND = "masked"  # the forward kind of loglikelihood scoring (FastDLLM.forward_masked)
LOGLIKELIHOOD_NOTE = ("reuse cannot act on loglikelihood: each request is scored by one forward, "
                      "so every k and subset give the same result")


def bundled_model_dir() -> Path | None:
    """The bundled tiny model's directory, or None where this checkout has none."""
    try:
        from .assets import TINY_MODEL_DIR
    except ImportError:
        return None
    return Path(TINY_MODEL_DIR) if (Path(TINY_MODEL_DIR) / "config.json").is_file() else None


def _bundled() -> Path:
    path = bundled_model_dir()
    if path is None:
        raise ConfigError("this checkout has no bundled tiny model (reuse_exp/assets/tiny): "
                          "give --model a checkpoint directory, a hub id or random:<shape>")
    return path


def resolve_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA device: use --device cpu")
    return str(device)


@dataclass
class LoadedModel:
    model: FastDLLM
    tokenizer: object
    source: str             # as given: a directory, a hub id, `bundled`, `random:<shape>`
    path: Path | None       # the checkpoint directory read (None for random weights)
    model_hash: str         # content hash of the checkpoint, or of the random recipe
    revision: str           # hub revision, `local` for a directory, `random` for random weights


def load(source: str, dtype: str = "bfloat16", device: str = "cpu", revision: str | None = None,
         tokenizer: str | None = None, seed: int = 0) -> LoadedModel:
    """Model and tokenizer from any `pretrained` form (see the module docstring)."""
    if source.startswith(RANDOM_PREFIX):
        cfg = named_shape(source[len(RANDOM_PREFIX):])
        tok_dir = Path(tokenizer) if tokenizer else _bundled()
        tok = load_tokenizer(tok_dir)
        if len(tok) > cfg.vocab_size:
            raise ConfigError(f"tokenizer in {tok_dir} has {len(tok)} tokens, shape {source} only {cfg.vocab_size}")
        model = random_model(cfg, dtype=dtype, device=device, seed=seed)
        recipe = f"{source}:seed={seed}:std=0.02:{parse_dtype(dtype)}"
        return LoadedModel(model, tok, source, None, hashlib.sha256(recipe.encode()).hexdigest()[:16], "random")
    path = _bundled() if source == BUNDLED else resolve_checkpoint(source, revision)
    model, ckpt = load_model(path, dtype=dtype, device=device)
    tok = load_tokenizer(Path(tokenizer) if tokenizer else ckpt)
    if source == BUNDLED or Path(source).expanduser().is_dir():
        return LoadedModel(model, tok, source, ckpt, checkpoint_hash(ckpt), "local")
    # A hub snapshot's directory is named by its commit: exact, and no 15 GB re-read to hash.
    commit = ckpt.name if ckpt.parent.name == "snapshots" else (revision or "main")
    return LoadedModel(model, tok, source, ckpt, commit[:16] if commit != "main" else checkpoint_hash(ckpt),
                       commit)


# -- what the harness measured ----------------------------------------------------------------
@dataclass
class ScoringStats:
    """Loglikelihood scoring: one masked forward per request."""
    requests: int = 0
    scored_tokens: int = 0            # the masked first target token of each request
    truncated_continuations: int = 0  # continuations of >1 token, scored on their first token
    positions: int = 0                # tokens run through the model, padding included
    batch_forwards: int = 0
    seconds: float = 0.0


@dataclass
class HarnessStats:
    decode: list[DecodeReport] = field(default_factory=list)
    scoring: ScoringStats = field(default_factory=ScoringStats)
    warmup_seconds: float = 0.0
    truncated_prompts: int = 0
    generations: list[dict] = field(default_factory=list)  # one record per generate_until request

    @property
    def task_kind(self) -> str:
        kinds = [k for k, ran in (("generate_until", bool(self.decode)),
                                  ("loglikelihood", self.scoring.requests > 0)) if ran]
        return "+".join(kinds) or "none"

    def metrics(self) -> dict[str, float]:
        """Throughput and reuse metrics (names: the schema in tracking.py)."""
        m: dict[str, float] = {"warmup_seconds": self.warmup_seconds}
        if self.decode:
            sample_fw, batch_fw = Counter(), Counter()
            for r in self.decode:
                for s in r.samples:
                    sample_fw.update(s.forwards)
                batch_fw.update(r.batch_forwards)
            run = sum(s.layer_evals_run for r in self.decode for s in r.samples)
            skipped = sum(s.layer_evals_skipped for r in self.decode for s in r.samples)
            tokens = sum(r.generated_tokens for r in self.decode)
            seconds = sum(r.wall_seconds for r in self.decode)
            m |= {"generated_tokens": tokens, "seconds": seconds,
                  "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
                  "tokens_per_forward": tokens / sum(sample_fw.values()) if sample_fw else 0.0,
                  "skipped_fraction": skipped / (run + skipped) if run + skipped else 0.0,
                  "truncated_prompts": self.truncated_prompts}
            m |= {f"forwards_{k}": v for k, v in sample_fw.items()}
            m |= {f"batch_forwards_{k}": v for k, v in batch_fw.items()}
        sc = self.scoring
        if sc.requests:
            m |= {"scored_tokens": sc.scored_tokens, "scoring_seconds": sc.seconds,
                  "truncated_continuations": sc.truncated_continuations,
                  f"forwards_{SCORING_KIND}": sc.requests, f"batch_forwards_{SCORING_KIND}": sc.batch_forwards,
                  "positions_per_second": sc.positions / sc.seconds if sc.seconds > 0 else 0.0}
            if not self.decode:  # a pure scoring run: its throughput is scored tokens/s
                m |= {"seconds": sc.seconds, "generated_tokens": 0, "skipped_fraction": 0.0,
                      "tokens_per_second": sc.scored_tokens / sc.seconds if sc.seconds > 0 else 0.0,
                      "tokens_per_forward": sc.scored_tokens / sc.requests}
        return m

    def trace(self) -> dict:
        """The reuse trace: per-layer counts of every batch, one sample's decisions."""
        if not self.decode:
            return {"note": LOGLIKELIHOOD_NOTE}
        totals = None
        for r in self.decode:
            t = r.layer_counts.totals()
            totals = t if totals is None else [[a + c, b + d] for (a, b), (c, d) in zip(totals, t)]
        first = self.decode[0]
        return {"layer_totals_computed_reused": totals,
                "first_batch_per_block": {str(b): rows for b, rows in first.layer_counts.per_block.items()},
                "first_batch_summary": first.summary(),
                "first_batch_sample0_trace": first.trace}


@dataclass
class _GenItem:
    """One generate_until request, as the decoder sees it."""
    index: int
    request: object       # lm-eval's Instance
    prompt: str           # after the prompt rewrite
    ids: list[int]
    until: list[str]
    budget: int           # tokens the request may return


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _cut_at(text: str, until: list[str]) -> str:
    """The text up to the first of the request's stop strings."""
    for s in until:
        if s and s in text:
            text = text[:text.index(s)]
    return text


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


DECODE_PATHS = ("auto", "eager", "fast")


def make_runner(model: FastDLLM, decode_path: str = "auto"):
    """auto: the fast path (CUDA graphs + compiled layers) on a GPU, plain PyTorch on CPU."""
    if decode_path not in DECODE_PATHS:
        raise ConfigError(f"unknown decode_path {decode_path!r}; use one of {', '.join(DECODE_PATHS)}")
    if decode_path == "fast" or (decode_path == "auto" and model.device.type == "cuda"):
        return FastRunner(model)
    return EagerRunner(model)


@register_model("fast_dllm_v2")
class FastDLLMv2LM(TemplateLM):
    """Fast-dLLM v2 for lm-eval, with a layer-reuse policy (k, subset, mode, scope)."""

    def __init__(self, pretrained: str = BUNDLED, k: int = 1, subset: str = "middle", mode: str = "output",
                 scope: str = "block", dtype: str = "bfloat16", device: str | None = None,
                 batch_size: int | str = 1, threshold: float = 0.9, block_size: int = 32,
                 small_block_size: int = 8, max_new_tokens: int = 256, use_block_cache: bool = True,
                 revision: str | None = None, tokenizer: str | None = None, seed: int = 0,
                 max_batch_size: int | None = None, decode_path: str = "auto", **unknown):
        super().__init__()
        if unknown:
            raise ConfigError(f"fast_dllm_v2 does not take {', '.join(sorted(unknown))}")
        if str(batch_size).startswith("auto"):
            raise ConfigError("batch_size auto is not supported: give a number (the study used 1)")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self._device = torch.device(resolve_device(device))
        self.loaded = load(str(pretrained), dtype=dtype, device=str(self._device), revision=revision,
                           tokenizer=tokenizer, seed=int(seed))
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        self.policy = ReusePolicy.create(int(k), subset, self.model.num_layers, mode=mode, scope=scope)
        self.decode_config: DecodeConfig = decode_config_for(
            self.tokenizer, block_size=int(block_size), small_block_size=int(small_block_size),
            threshold=float(threshold), max_new_tokens=int(max_new_tokens),
            use_block_cache=bool(use_block_cache)).validate()
        self.runner = make_runner(self.model, decode_path)
        self.path = self.runner.name  # which decoding path ran: logged as the `path` param
        self.stats = HarnessStats()
        self.on_batch: Callable[[HarnessStats], None] | None = None  # progress, after each batch

    # -- what lm-eval asks of a TemplateLM ---------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.decode_config.stop_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "fast_dllm_v2")).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("fast_dllm_v2 has no rolling loglikelihood (perplexity tasks): "
                                  "the public scoring masks one target token per forward")

    # -- generation ---------------------------------------------------------------------------
    def _prompt_ids(self, task_name: str | None, context: str, budget: int) -> tuple[str, list[int]]:
        prompt = rewrite_prompt(task_name, context)
        ids = self.tok_encode(prompt)
        room = self.max_length - budget - self.decode_config.block_size
        if len(ids) > room:  # keep the end of the prompt, like lm-eval's HF model
            ids = ids[-room:]
            self.stats.truncated_prompts += 1
        return prompt, ids

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy block-diffusion decoding, batched by prompt length.

        The decoder stops a sample at the stop token; each request's `until` strings cut the
        returned text (decoding may run past them: those tokens count as generated) and its
        `max_gen_toks` (capped by max_new_tokens) bounds the decoding budget.
        """
        items = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = min(int(gen_kwargs.get("max_gen_toks", self.decode_config.max_new_tokens)),
                         self.decode_config.max_new_tokens)
            prompt, ids = self._prompt_ids(getattr(req, "task_name", None), context, budget)
            items.append(_GenItem(i, req, prompt, ids, until, budget))
        # One budget per batch (the decoder's max_new_tokens); longest prompts first.
        items.sort(key=lambda it: (-it.budget, -len(it.ids)))
        batches = []
        for budget in dict.fromkeys(it.budget for it in items):
            batches += list(_chunks([it for it in items if it.budget == budget], self.batch_size))
        if batches and not self.stats.decode:
            self._warm_up_generate(batches[0])
        out: list[str | None] = [None] * len(requests)
        for batch in batches:
            cfg = replace(self.decode_config, max_new_tokens=self._decoder_budget(batch))
            # Trace one sample of the first batch only: the trace grows with every forward.
            result = generate(self.model, [it.ids for it in batch], cfg, self.policy,
                              trace_sample=0 if not self.stats.decode else None, runner=self.runner)
            self.stats.decode.append(result.report)
            for it, tokens, s in zip(batch, result.tokens, result.report.samples):
                raw = self.tok_decode(tokens[:it.budget])
                text = _cut_at(raw, it.until)
                out[it.index] = text
                self.cache_hook.add_partial("generate_until", it.request.args, text)
                self.stats.generations.append({
                    "task": getattr(it.request, "task_name", None), "doc_id": getattr(it.request, "doc_id", None),
                    "prompt": it.prompt, "prompt_tokens": len(it.ids), "raw": raw, "returned": text,
                    "generated_tokens": s.generated_tokens, "stopped": s.finished, "forwards": dict(s.forwards)})
            if self.on_batch is not None:
                self.on_batch(self.stats)
        return out

    def _decoder_budget(self, batch: list[_GenItem]) -> int:
        """max_new_tokens for the decoder so that every sample can reach the request's budget.

        The decoder runs `max_new_tokens // block + longest_prompt // block` blocks, so the
        longest prompt's partial block eats into the budget; ask for whole blocks that cover it.
        The returned text is cut back to the budget; tokens decoded past it still count as
        generated (they were computed), as in the public code's throughput.
        """
        bs = self.decode_config.block_size
        longest = max(len(it.ids) for it in batch)
        return -(-(batch[0].budget + longest % bs) // bs) * bs

    def _warm_up_generate(self, batch: list[_GenItem]) -> None:
        """One short untimed decode of the first batch's shapes, so timing excludes cold start."""
        t0 = time.perf_counter()
        cfg = replace(self.decode_config, max_new_tokens=self.decode_config.block_size)
        generate(self.model, [it.ids for it in batch], cfg, self.policy, trace_sample=None, runner=self.runner)
        self.stats.warmup_seconds += time.perf_counter() - t0

    # -- scoring ------------------------------------------------------------------------------
    @torch.no_grad()
    def _score_batch(self, batch: list[tuple[list[int], list[int]]]) -> tuple[list[tuple[float, bool]], int]:
        """The public scoring: mask the first target token, pad with masks to a block multiple,
        one block-causal forward; the token is predicted by the logit before it (AR shift)."""
        cfg, dev = self.decode_config, self.device
        bs = cfg.block_size
        seqs = [ctx + cont for ctx, cont in batch]
        length = -(-max(len(s) for s in seqs) // bs) * bs
        tokens = torch.full((len(seqs), length), cfg.mask_id, dtype=torch.long, device=dev)
        for b, s in enumerate(seqs):
            tokens[b, :len(s)] = torch.tensor(s, dtype=torch.long, device=dev)
        at = torch.tensor([len(ctx) for ctx, _ in batch], device=dev)
        target = torch.tensor([cont[0] for _, cont in batch], device=dev)
        rows = torch.arange(len(seqs), device=dev)
        tokens[rows, at] = cfg.mask_id
        mask = block_causal_mask(0, length, length, bs, dev)
        hidden = self.model.forward_masked(tokens, torch.arange(length, device=dev), mask)
        logits = self.model.logits(hidden[rows, at - 1]).float()
        ll = -F.cross_entropy(logits, target, reduction="none")
        greedy = logits.argmax(-1) == target
        return list(zip(ll.tolist(), greedy.tolist())), tokens.numel()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        room = self.max_length - self.decode_config.block_size
        pairs = []
        for _, ctx, cont in requests:
            if not cont:
                raise ConfigError("a loglikelihood request with an empty continuation cannot be scored")
            ctx = ctx[-(room - len(cont)):] if len(ctx) + len(cont) > room else ctx
            pairs.append((ctx, cont))
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        batches = list(_chunks(order, self.batch_size))
        if batches and self.stats.scoring.requests == 0:  # warm-up, untimed
            t0 = time.perf_counter()
            self._score_batch([pairs[i] for i in batches[0]])
            self.stats.warmup_seconds += time.perf_counter() - t0
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        sc = self.stats.scoring
        for batch in batches:
            _sync(self.device)
            t0 = time.perf_counter()
            scores, positions = self._score_batch([pairs[i] for i in batch])
            _sync(self.device)
            sc.seconds += time.perf_counter() - t0
            sc.batch_forwards += 1
            sc.positions += positions
            for i, score in zip(batch, scores):
                out[i] = score
                sc.requests += 1
                sc.scored_tokens += 1
                sc.truncated_continuations += len(pairs[i][1]) > 1
                (context, continuation), _, _ = requests[i]
                self.cache_hook.add_partial("loglikelihood", (context, continuation), score)
            if self.on_batch is not None:
                self.on_batch(self.stats)
        return out

    # -- what the tracked run logs ------------------------------------------------------------
    def params(self) -> dict:
        """Settings as this model used them (schema in tracking.py)."""
        cfg, pol, m = self.decode_config, self.policy, self.loaded
        layers = ",".join(map(str, pol.layers))
        return {"k": pol.k, "subset": layers if pol.subset == "custom" else pol.subset, "layers": layers,
                "mode": pol.mode, "scope": pol.scope, "model": m.source, "model_revision": m.revision,
                "model_hash": m.model_hash, "dtype": str(self.model.dtype).removeprefix("torch."),
                "threshold": cfg.threshold, "block_size": cfg.block_size,
                "small_block_size": cfg.small_block_size, "max_new_tokens": cfg.max_new_tokens,
                "use_block_cache": cfg.use_block_cache, "batch_size": self.batch_size,
                "device": str(self.device), "path": self.path}


# -- tasks and the evaluation -----------------------------------------------------------------
GATED_TASKS = {"gpqa": "Idavidrein/gpqa"}


def bundled_tasks_dir() -> Path:
    return Path(__file__).parent / "tasks"


def task_manager_for(task: str, include_path: list[str] | tuple[str, ...] = ()):
    """A TaskManager that knows `task`; bundled and included tasks are found without
    indexing lm-eval's thousands of built-in ones (half a minute)."""
    from lm_eval.tasks import TaskManager
    paths = [str(p) for p in (bundled_tasks_dir(), *map(Path, include_path)) if Path(p).is_dir()]
    if paths:
        tm = TaskManager(include_path=paths, include_defaults=False)
        if task in tm.all_tasks:
            return tm
    tm = TaskManager(include_path=paths or None)
    if task not in tm.all_tasks:
        raise ConfigError(f"unknown task {task!r}: not bundled and not an lm-eval task "
                          "(list them with `lm-eval ls tasks`; add yours with --include-path DIR)")
    return tm


def check_gated(task: str) -> None:
    """Fail before loading anything when a gated data set has no token to open it."""
    repo = next((r for prefix, r in GATED_TASKS.items() if task.startswith(prefix)), None)
    if repo is None:
        return
    from huggingface_hub import get_token
    if not get_token():
        raise ConfigError(f"{task} reads the gated data set {repo}: accept its terms on the hub, "
                          "then set HF_TOKEN (or run `hf auth login`)")


def evaluate(lm: FastDLLMv2LM, task: str, task_manager, limit: int | float | None = None,
             num_fewshot: int = 0, apply_chat_template: bool = True, fewshot_as_multiturn: bool = True,
             seed: int = 1234) -> dict:
    """lm-eval's simple_evaluate on one task with per-sample logging; returns its results dict."""
    import lm_eval
    return lm_eval.simple_evaluate(
        model=lm, tasks=[task], num_fewshot=num_fewshot, limit=limit, log_samples=True,
        apply_chat_template=apply_chat_template, fewshot_as_multiturn=fewshot_as_multiturn,
        task_manager=task_manager, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed)


def primary_metric(task_results: dict) -> tuple[str, float] | None:
    """The task's accuracy: exact_match after strict-match, else acc, else its first metric."""
    numeric = {k: v for k, v in task_results.items()
               if "," in k and "_stderr" not in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
    for want in ("exact_match,strict-match", "acc,none", "exact_match,none"):
        if want in numeric:
            return want, float(numeric[want])
    return next(iter(numeric.items()), None)

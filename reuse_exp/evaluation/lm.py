"""lm-eval model `fast_dllm_v2`: reuse-enabled block-diffusion generation and loglikelihood scoring.

Registered with lm-eval on import. Through this package: `reuse-exp run` (tracked),
or lm-eval's own CLI with the model registered first:

    reuse-exp lm-eval run --model fast_dllm_v2 --model_args pretrained=DIR,k=2,subset=middle \
        --tasks gsm8k --apply_chat_template --fewshot_as_multiturn --batch_size 1

(`reuse-exp lm-eval ARGS` is `lm-eval ARGS` after `import reuse_exp.evaluation.lm`;
lm-eval 0.4.13 has no plugin entry points.) The model arguments are the settings of
role `model` in reuse_exp/settings.py, with the same defaults; `pretrained` is lm-eval's
name for `model`.

Under a launcher (`torchrun --nproc-per-node N -m reuse_exp.cli lm-eval ...`,
`accelerate launch`), each process is one rank on its own GPU: lm-eval's evaluator shards
the documents by the model's rank and world size and gathers the results on rank 0
(evaluation/distributed.py).
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Callable

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator

from ..errors import ConfigError, SettingError
from ..engine.decoding import DecodeConfig, generate
from ..engine.loading import decode_config_for
from ..engine.policies import ReusePolicy, build as build_policy
from ..engine.prompts import rewrite_prompt

from ..settings import DEFAULTS, MODEL, SPECS, RunSettings, policy_class, to_text
from . import distributed
from .models import ANY_DEPTH, load, make_runner, model_depth
from .placement import Placement, resolve as resolve_placement
from .scoring import SCORERS
from .stats import HarnessStats

MODEL_ARGS = tuple(s.name for s in SPECS if s.role == MODEL)
log = logging.getLogger(__name__)


@dataclass
class _GenItem:
    """One generate_until request, as the decoder sees it."""
    index: int
    request: object       # lm-eval's Instance
    prompt: str           # after the prompt rewrite
    ids: list[int]
    until: list[str]
    budget: int           # tokens the request may return
    truncated: bool = False   # the prompt lost its beginning to fit the context


def _cut_at(text: str, until: list[str]) -> str:
    """The text up to the first of the request's stop strings."""
    for s in until:
        if s and s in text:
            text = text[:text.index(s)]
    return text


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_policy(s: RunSettings, num_layers: int) -> ReusePolicy:
    """The policy the settings name (engine/policies), built from the settings it reads and checked."""
    cls = policy_class(s.policy)
    return build_policy(cls, num_layers, **{name: getattr(s, name) for name in cls.reads})


def check_policy(s: RunSettings) -> None:
    """Build the policy before a run opens or a model loads, so a value it refuses is refused as a
    typo is (ConfigError, one line). The model's depth comes from its config.json where that is
    at hand; else (a hub model not downloaded yet) any depth does, and `subset` indices past the
    model's are refused once it loads."""
    make_policy(s, model_depth(s.model, s.revision) or ANY_DEPTH)


def model_settings(values: dict, additional_config: dict | None = None) -> RunSettings:
    """RunSettings from lm-eval's model arguments (strings or values): the settings of role `model`,
    `pretrained` for `model`; lm-eval's own `batch_size` and `device` fill what they leave out."""
    values = dict(values)
    if "pretrained" in values:
        values["model"] = values.pop("pretrained")
    for name, value in (additional_config or {}).items():
        if name in ("batch_size", "device") and value is not None:
            values.setdefault(name, value)
    unknown = sorted(set(values) - set(MODEL_ARGS))
    if unknown:
        raise SettingError(f"fast_dllm_v2 does not take {', '.join(unknown)}; it takes {', '.join(MODEL_ARGS)}")
    return RunSettings.parse(values)


@register_model("fast_dllm_v2")
class FastDLLMv2LM(TemplateLM):
    """Fast-dLLM v2 for lm-eval, with a layer-reuse policy (`policy` and the settings it reads)."""

    def __init__(self, settings: RunSettings = DEFAULTS, placement: Placement | None = None):
        """`settings`: typed, parsed where they entered (the CLI, or lm-eval's `--model_args`
        through `create_from_arg_string`). `placement`: where this process runs, resolved once
        by the caller; resolved here only when lm-eval's own CLI made the model."""
        super().__init__()
        if not isinstance(settings, RunSettings):
            raise TypeError(f"FastDLLMv2LM takes a RunSettings, not {type(settings).__name__}: "
                            "use FastDLLMv2LM.create_from_arg_string('k=2,subset=middle')")
        self.settings = s = settings
        # lm-eval's CLI cannot say `processes` (a run setting): the world is the launcher's.
        self.placement = placement if placement is not None else resolve_placement(s.replace(processes="auto"))
        self.batch_size = s.batch_size
        self._rank, self._world_size = self.placement.rank, self.placement.world_size
        self._device = self.placement.torch_device
        distributed.join(self.placement)
        self.loaded = load(s.model, dtype=self.placement.dtype, device=self.placement.device, revision=s.revision,
                           tokenizer=s.tokenizer, seed=s.seed)
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        self.policy = make_policy(s, self.model.num_layers)
        self.decode_config: DecodeConfig = decode_config_for(
            self.tokenizer, block_size=s.block_size, small_block_size=s.small_block_size,
            threshold=s.threshold, max_new_tokens=s.max_new_tokens, use_block_cache=s.use_block_cache).validate()
        self.runner = make_runner(self.model, s.decode_path)
        self.path = self.runner.name  # which decoding path ran: logged as the `path` param
        self.stats = HarnessStats()
        self.request_cache = None   # a RequestCache: results kept with their statistics (a resume reads it)
        self.on_batch: Callable[[HarnessStats], None] | None = None  # progress, after each batch

    # -- lm-eval's constructors: `--model_args` parsed once, by the settings' declaration -------
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "FastDLLMv2LM":
        """`k=2,subset=8,9,10,pretrained=DIR`: a part without `=` continues the value before it,
        so layer lists need no quoting."""
        values: dict[str, str] = {}
        name = None
        for part in (arg_string or "").split(","):
            key, sep, value = part.partition("=")
            if sep:
                name = key.strip()
                values[name] = value
            elif name is not None and part:
                values[name] += "," + part
            elif part.strip():
                raise ConfigError(f"--model_args {arg_string!r}: write NAME=VALUE,NAME=VALUE")
        return cls(model_settings(values, additional_config))

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "FastDLLMv2LM":
        return cls(model_settings(dict(arg_dict), additional_config))

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

    # -- lm-eval's collectives between ranks (single process: its no-op defaults) ----------
    def all_gather(self, tensor):
        return distributed.all_gather(tensor) if self.placement.parallel else tensor

    def gather_object(self, obj, dst: int = 0):
        return distributed.gather_object(obj, dst) if self.placement.parallel else [obj]

    def barrier(self) -> None:
        if self.placement.parallel:
            distributed.barrier()

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("fast_dllm_v2 has no rolling loglikelihood (perplexity tasks): "
                                  "it scores continuations of a context, not whole documents")

    # -- generation ---------------------------------------------------------------------------
    def _prompt_ids(self, task_name: str | None, context: str, budget: int) -> tuple[str, list[int], bool]:
        prompt = rewrite_prompt(task_name, context)
        ids = self.tok_encode(prompt)
        room = self.max_length - budget - self.decode_config.block_size
        if len(ids) > room:  # keep the end of the prompt, like lm-eval's HF model
            ids = ids[-room:]
            self.stats.truncated_prompts += 1
            return prompt, ids, True
        return prompt, ids, False

    def _kept(self, method: str, args):
        return self.request_cache.get(method, args) if self.request_cache is not None else None

    def _keep(self, method: str, args, result, record: dict) -> None:
        if self.request_cache is not None:
            self.request_cache.put(method, args, result, record)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy block-diffusion decoding, batched by prompt length.

        The decoder stops a sample at the stop token; each request's `until` strings cut the
        returned text (decoding may run past them: those tokens count as generated) and its
        `max_gen_toks` (capped by max_new_tokens) bounds the decoding budget.
        """
        items, first = [], {}
        out: list[str | None] = [None] * len(requests)
        for i, req in enumerate(requests):
            # lm-eval repeats a request object to pad a rank's shard (and for repeats): greedy
            # decoding gives it the same text, so it is decoded once.
            if first.setdefault(id(req), i) != i:
                continue
            if (kept := self._kept("generate_until", req.args)) is not None:
                out[i], record = kept
                self.stats.add_kept(record)
                continue
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = min(int(gen_kwargs.get("max_gen_toks", self.decode_config.max_new_tokens)),
                         self.decode_config.max_new_tokens)
            prompt, ids, truncated = self._prompt_ids(getattr(req, "task_name", None), context, budget)
            items.append(_GenItem(i, req, prompt, ids, until, budget, truncated))
        # One budget per batch (the decoder's max_new_tokens), largest first; longest prompts first.
        items.sort(key=lambda it: -it.budget)
        batches = list(Collator(items, sort_fn=lambda it: -len(it.ids), group_fn=lambda it: {"budget": it.budget},
                                group_by="gen_kwargs").get_batched(n=self.batch_size))
        if batches and not self.stats.decode:
            self._warm_up_generate(batches[0])
        self.stats.requests_total += len(requests)
        self.stats.phase = "decoding"
        if self.on_batch is not None:
            self.on_batch(self.stats)   # progress starts: 0 of them done
        for batch in batches:
            cfg = replace(self.decode_config, max_new_tokens=self._decoder_budget(batch))
            # Trace one sample of the first batch only: the trace grows with every forward.
            result = generate(self.model, [it.ids for it in batch], cfg, self.policy,
                              trace_sample=0 if not self.stats.decode else None, runner=self.runner)
            self.stats.decode.append(result.report)
            drifts = result.report.refresh_drifts   # the batch's: kept with its first request
            for j, (it, tokens, s) in enumerate(zip(batch, result.tokens, result.report.samples)):
                raw = self.tok_decode(tokens[:it.budget])
                text = _cut_at(raw, it.until)
                out[it.index] = text
                generation = {
                    "task": getattr(it.request, "task_name", None), "doc_id": getattr(it.request, "doc_id", None),
                    "prompt": it.prompt, "prompt_tokens": len(it.ids), "raw": raw, "returned": text,
                    "generated_tokens": s.generated_tokens, "stopped": s.finished, "forwards": dict(s.forwards)}
                self.stats.generations.append(generation)
                self._keep("generate_until", it.request.args, text, {
                    "generation": generation, "sample": s.as_dict(), "refresh_drifts": drifts if j == 0 else [],
                    "truncated_prompt": it.truncated})
            if self.on_batch is not None:
                self.on_batch(self.stats)
        return [out[first[id(req)]] for req in requests]

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
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm-eval's tokenisation and `_loglikelihood_tokens`, then ties: documents whose best
        choices share one score exactly, where lm-eval's argmax takes the first listed."""
        out = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        by_doc = defaultdict(list)
        for req, (ll, _) in zip(requests, out):
            by_doc[(getattr(req, "task_name", None), getattr(req, "doc_id", None))].append(ll)
        tied = [doc for doc, lls in by_doc.items() if len(lls) > 1 and lls.count(max(lls)) > 1]
        if tied:
            self.stats.scoring.ties += len(tied)
            log.warning("%d of %d documents have tied best choices (scoring=%s): lm-eval picks the first "
                        "listed; e.g. %s doc %s", len(tied), len(by_doc), self.settings.scoring, *tied[0])
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        room = self.max_length - self.decode_config.block_size
        score = SCORERS[self.settings.scoring]
        pairs, first = [], []
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        seen: dict[tuple, int] = {}   # a request padding a rank's shard repeats one: scored once
        for i, (args, ctx, cont) in enumerate(requests):
            if not cont:
                raise ConfigError("a loglikelihood request with an empty continuation cannot be scored")
            ctx = ctx[-(room - len(cont)):] if len(ctx) + len(cont) > room else ctx
            pairs.append((ctx, cont))
            first.append(seen.setdefault((tuple(ctx), tuple(cont)), i))
            if first[i] == i and (kept := self._kept("loglikelihood", args)) is not None:
                out[i], record = kept
                self.stats.scoring.add_kept(record)
        order = sorted((i for i in range(len(pairs)) if first[i] == i and out[i] is None),
                       key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        batches = list(Collator.get_chunks(order, n=self.batch_size))
        if batches and self.stats.scoring.requests == 0:  # warm-up, untimed
            t0 = time.perf_counter()
            score(self.model, self.decode_config, [pairs[i] for i in batches[0]])
            self.stats.warmup_seconds += time.perf_counter() - t0
        self.stats.requests_total += len(pairs)
        self.stats.phase = "scoring"
        if self.on_batch is not None:
            self.on_batch(self.stats)
        sc = self.stats.scoring
        first_only = self.settings.scoring == "first_token"
        for batch in batches:
            _sync(self.device)
            t0 = time.perf_counter()
            scores, positions, rows = score(self.model, self.decode_config, [pairs[i] for i in batch])
            _sync(self.device)
            seconds = time.perf_counter() - t0
            tokens = len(batch) if first_only else sum(len(pairs[i][1]) for i in batch)
            sc.seconds += seconds
            sc.batches.append((tokens, seconds))
            sc.batch_forwards += 1
            sc.positions += positions
            sc.rows += rows
            sc.scored_tokens += tokens
            for i, s in zip(batch, scores):
                out[i] = s
                scored = 1 if first_only else len(pairs[i][1])   # its rows: one per scored token
                truncated = first_only and len(pairs[i][1]) > 1
                sc.requests += 1
                sc.truncated_continuations += truncated
                self._keep("loglikelihood", requests[i][0], s, {"scored_tokens": scored, "rows": scored,
                                                                 "truncated_continuation": truncated})
            if self.on_batch is not None:
                self.on_batch(self.stats)
        return [out[j] for j in first]

    # -- what the tracked run logs ------------------------------------------------------------
    def params(self) -> dict:
        """The model's settings as given, and what they resolved to (names: tracking/schema.py)."""
        m = self.loaded
        return {**{n: to_text(v) for n, v in self.settings.of_role(MODEL).items()},
                "layers": ",".join(map(str, self.policy.layers)), "model_revision": m.revision,
                "model_hash": m.model_hash, "resolved_dtype": str(self.model.dtype).removeprefix("torch."),
                "resolved_device": str(self.device), "path": self.path, "world_size": self.world_size}

"""Block-diffusion decoding: the `batch_sample` algorithm of Fast-dLLM v2, with layer reuse.

Per block of 32: fill with masks, then for each small block of 8, while it has masks,
run a forward (full-block when the block cache is missing or the small block's first
position is still masked, small-block otherwise), unmask every masked position whose
argmax probability passes the threshold and always the most confident one. A block
without masks is finalized (committed to the prefix cache), and its last logit gives
the first token of the next block. Finished samples leave the batch and every cache.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .instrument import DecodeRecorder, DecodeReport, _Forward
from .model import FastDLLM, ForwardKind
from .replay import WindowLogits
from .policies import ReusePolicy
from .reuse import REUSED, ReuseCache
from .schedule import ReuseSchedule
from .trajectory import Trajectory, UnmaskingLog

REPLAY = "replay"  # a per-sample step that ran no forward (mode=replay)
# Token ids of the real checkpoint; a tokenizer's own ids take precedence (see TokenIds).
MASK_ID, STOP_ID, PAD_ID = 151665, 151645, 151643


@dataclass(frozen=True)
class DecodeConfig:
    mask_id: int = MASK_ID
    stop_id: int = STOP_ID
    pad_id: int = PAD_ID
    block_size: int = 32
    small_block_size: int = 8
    threshold: float = 0.9
    max_new_tokens: int = 256
    use_block_cache: bool = True
    ignore_stop: bool = False   # benchmarks: run the whole budget whatever is generated
    # How many tokens each step unmasks, replayed from a recorded decode in place of the
    # threshold (benchmarks: random weights never pass it); None: the threshold rule.
    trajectory: Trajectory | None = None

    def validate(self) -> "DecodeConfig":
        if self.block_size < 1 or self.small_block_size < 1 or self.block_size % self.small_block_size:
            raise ConfigError(f"small_block_size ({self.small_block_size}) must divide block_size ({self.block_size})")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold must lie in [0, 1], got {self.threshold}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        return self


@dataclass
class DecodeResult:
    tokens: list[list[int]]   # per sample, the generated tokens up to and including the stop token
    report: DecodeReport


class EagerRunner:
    """Runs each forward as plain PyTorch (any device). The fast path (fast.FastRunner)
    has the same interface."""
    name = "eager"

    def __init__(self, model: FastDLLM):
        self.model = model

    def __call__(self, tokens, kind, cache, replace_position=0, plan=None, active=None, rows=None):
        """`active` (bool [batch], device; None: every row) limits the rows whose caches the forward
        writes; `rows` is the same on the host (the fast path builds its row sets from it)."""
        return self.model(tokens, kind, cache, replace_position, plan, active)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)

    def new_cache(self, batch: int, max_len: int, block_size: int):
        return self.model.new_cache(batch, max_len, block_size)

    def buffer(self, key, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=self.model.device)

    def new_reuse_cache(self, policy: ReusePolicy, batch: int, block_size: int) -> ReuseCache:
        m = self.model
        return ReuseCache(policy.layers, policy.mode, batch, block_size, m.config.hidden_size, m.dtype, m.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Run:
    """State of one decoding call; lives only inside `generate`.

    Every decision is made per sample, never for the batch as a whole: whether a
    forward is full-block or small-block, the reuse step counter, and which rows a
    forward may write. A sample therefore decodes the same tokens in any batch as it
    does alone. (The public `batch_sample` decides for the whole batch, which lets a
    sample's neighbours change its forwards and, with reuse, its step counter.)
    The reuse decision is `ReuseSchedule`'s, the accounting `DecodeRecorder`'s.

    The rows of a step are decided on the device and read by the host once per step (`_flags`),
    which then picks the forwards to launch; nothing else of a step is read back.
    """

    def __init__(self, model: FastDLLM, prompts: list[list[int]], cfg: DecodeConfig,
                 policy: ReusePolicy | None, trace_sample: int | None, shadow: bool, runner):
        self.model, self.cfg, self.runner = model, cfg, runner
        dev = model.device
        bs = cfg.block_size
        self.seq_len = torch.tensor([len(p) for p in prompts], device=dev)
        # The public budget (whole blocks of new tokens past the longest prompt's block),
        # with at least one block so that a budget under 32 still generates.
        self.num_blocks = max(cfg.max_new_tokens // bs, 1) + max(len(p) for p in prompts) // bs
        total = self.num_blocks * bs + 1  # +1: the token a finalize predicts after the last block
        self.x = torch.full((len(prompts), total), cfg.mask_id, dtype=torch.long)
        for b, p in enumerate(prompts):
            self.x[b, :len(p)] = torch.tensor(p, dtype=torch.long)
        self.x = self.x.to(dev)
        self.cache = runner.new_cache(len(prompts), self.num_blocks * bs, bs)
        reuse_cache = None
        if policy is not None and policy.reuses and policy.mode != "replay":
            reuse_cache = runner.new_reuse_cache(policy, len(prompts), bs)
        self.schedule = ReuseSchedule(policy, reuse_cache, model, len(prompts), bs, shadow, runner.buffer)
        self.recorder = DecodeRecorder(len(prompts), model.num_layers, trace_sample)
        self.window_logits = WindowLogits(len(prompts), dev)
        self.finished = torch.zeros(len(prompts), dtype=torch.bool, device=dev)
        self.sample_ids = list(range(len(prompts)))   # original index of each batch row
        self.samples = torch.arange(len(prompts), device=dev)   # the same, on the device
        self.unmasking = UnmaskingLog(len(prompts))
        self.outputs: dict[int, list[int]] = {}

    @property
    def report(self) -> DecodeReport:
        return self.recorder.report

    def forward(self, tokens: torch.Tensor, kind: ForwardKind, replace_position: int = 0,
                active: list[bool] | None = None, rows: torch.Tensor | None = None):
        """One forward of `kind` for the rows `active` (host) = `rows` (device; None: all), as the
        schedule plans it. Returns the hidden states and, per row (device), whether it stood in
        cached layers."""
        B = tokens.shape[0]
        active = [True] * B if active is None else active
        rows = torch.ones(B, dtype=torch.bool, device=tokens.device) if rows is None else rows
        plan = self.schedule.plan(kind, rows, tokens, replace_position)
        hidden = self.runner(tokens, kind, self.cache, replace_position, plan, None if all(active) else rows,
                             active)
        self.recorder.record(_Forward(
            kind.value, self.schedule.block, tokens.shape[1],
            replace_position if kind is ForwardKind.SMALL_BLOCK else None, list(self.sample_ids), list(active),
            list(self.schedule.step), plan.groups if plan is not None else (),
            plan.log if plan is not None else None, cache_shape=plan.cache.shape if plan is not None else None))
        self.schedule.advance(kind, active, rows)
        reused = (plan.log[REUSED] > 0.5).any(0) if plan is not None else torch.zeros_like(rows)
        return hidden, reused

    def logits_at(self, hidden: torch.Tensor, positions: list[int]) -> torch.Tensor:
        logits = self.runner.logits(hidden[:, positions]).float()
        # The mask token is never a prediction: "unmasking" to it would loop forever
        # (possible for untrained weights; the public code does not guard against it).
        logits[..., self.cfg.mask_id] = -float("inf")
        return logits

    # -- the algorithm ----------------------------------------------------------------------
    def prefill(self) -> None:
        bs = self.cfg.block_size
        lengths = self.seq_len.tolist()
        min_len = min(lengths)
        if min_len < bs:
            return
        n = min_len // bs * bs
        hidden, _ = self.forward(self.x[:, :n], ForwardKind.PREFILL)
        if min_len % bs == 0:  # samples of exactly that length take one AR step
            nxt = self.logits_at(hidden, [n - 1]).argmax(-1)[:, 0]
            at_end = self.seq_len == min_len
            self.x[:, n] = torch.where(at_end, nxt, self.x[:, n])
            if not self.cfg.ignore_stop:
                self.finished |= at_end & (nxt == self.cfg.stop_id)

    @staticmethod
    def select(rows: torch.Tensor, new: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
        """`new` for `rows` (bool, device), `old` elsewhere (None: nothing yet)."""
        if old is None:
            return new
        return torch.where(rows[:, None, None], new, old)

    def replay(self, rows: list[bool], on_device: torch.Tensor, replace_position: int) -> None:
        """A step that skips the whole forward for `rows`: they unmask from their last logits."""
        self.recorder.record(_Forward(REPLAY, self.schedule.block, 0, replace_position, list(self.sample_ids),
                                      list(rows), list(self.schedule.step), replayed=True))
        self.schedule.advance(ForwardKind.SMALL_BLOCK, rows, on_device)

    def unmask(self, blk: torch.Tensor, logits: torch.Tensor, lo: int, hi: int, active: list[bool]) -> None:
        window = blk[:, lo:hi]
        masked = window == self.cfg.mask_id
        probs = torch.softmax(logits, dim=-1)
        conf, token = probs.max(dim=-1)
        conf = torch.where(masked, conf, torch.full_like(conf, -float("inf")))
        if self.cfg.trajectory is None:
            chosen = conf > self.cfg.threshold
            chosen[torch.arange(conf.shape[0], device=conf.device), conf.argmax(-1)] = True
        else:   # the n most confident (a stable sort: ties go to the first, as argmax does)
            n = self.unmasking.replayed_counts(self.cfg.trajectory, self.sample_ids, active, conf.device)
            rank = conf.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
            chosen = rank < n[:, None]
        chosen &= masked
        self.unmasking.step(chosen.sum(1), self.sample_ids, active)
        window.copy_(torch.where(chosen, token, window))
        if not self.cfg.ignore_stop:
            self.finished |= ((token == self.cfg.stop_id) & chosen).any(dim=1)

    def _flags(self, *rows: torch.Tensor) -> list[list[bool]]:
        """The step's one host read: several row masks at once (the time it waits is accounted)."""
        t0 = time.perf_counter()
        flags = torch.stack(rows).tolist()
        self.report.host_wait_seconds += time.perf_counter() - t0
        return flags

    def denoise_block(self, block: int) -> None:
        cfg, bs, sbs = self.cfg, self.cfg.block_size, self.cfg.small_block_size
        n_rows = self.x.shape[0]
        blk = self.x[:, block * bs:(block + 1) * bs]   # a view: writes land in self.x
        self.schedule.new_block(block, n_rows)
        has_block_cache = torch.zeros(n_rows, dtype=torch.bool, device=self.x.device)
        no_rows = torch.zeros_like(has_block_cache)
        reuses = self.schedule.policy is not None and self.schedule.policy.reuses
        # Shifted logits: block position p is predicted by the logit at p - 1 (p = 0 by its own);
        # a small-block forward shifts inside its window, so its first position uses its own
        # logit (the public code's approximation, kept on purpose).
        small_shift = [max(p - 1, 0) for p in range(sbs)]
        for start in range(0, bs, sbs):
            end = start + sbs
            self.unmasking.new_small_block()
            full_shift = [max(p - 1, 0) for p in range(start, end)]
            while True:
                masked = blk[:, start:end] == cfg.mask_id
                active_d = masked.any(dim=1)
                full_d = active_d & ~has_block_cache | active_d & masked[:, 0] if cfg.use_block_cache else active_d
                small_d = active_d & ~full_d
                replay_d = self.schedule.replaying(small_d, blk[:, start:end], start)
                replay_d = no_rows if replay_d is None else replay_d
                small_d = small_d & ~replay_d
                active, full, small, replaying = self._flags(active_d, full_d, small_d, replay_d)
                if not any(active):
                    break
                logits = self.window_logits.replay() if any(replaying) else None
                computed = no_rows
                if any(full):
                    hidden, _ = self.forward(blk, ForwardKind.FULL_BLOCK, 0, full, full_d)
                    logits = self.select(full_d, self.logits_at(hidden, full_shift), logits)
                    computed = full_d
                    if cfg.use_block_cache:
                        has_block_cache = has_block_cache | full_d
                if any(small):
                    hidden, reused = self.forward(blk[:, start:end], ForwardKind.SMALL_BLOCK, start, small, small_d)
                    small_logits = self.logits_at(hidden, small_shift)
                    if reuses:
                        self.window_logits.count_unchanged(small_logits, small_d & reused, self.samples)
                    logits = self.select(small_d, small_logits, logits)
                    computed = computed | (small_d & ~reused)
                if any(replaying):
                    self.replay(replaying, replay_d, start)
                if reuses:
                    self.window_logits.store(logits, computed)
                self.unmask(blk, logits, start, end, active)

    def finalize_block(self, block: int) -> bool:
        """Commit the block; return False when every sample has finished."""
        cfg, bs = self.cfg, self.cfg.block_size
        lo, hi = block * bs, (block + 1) * bs
        finished = self._flags(self.finished)[0]
        if any(finished):
            for b in torch.nonzero(self.finished & (self.seq_len < hi)).flatten().tolist():
                gen = self.x[b, int(self.seq_len[b]):hi]
                stops = torch.nonzero(gen == cfg.stop_id).flatten()
                if len(stops):
                    gen[int(stops[0]) + 1:] = cfg.pad_id
            if all(finished):
                return False
        hidden, _ = self.forward(self.x[:, lo:hi], ForwardKind.FINALIZE)
        nxt = self.logits_at(hidden, [bs - 1]).argmax(-1)[:, 0]
        nxt = torch.where(self.finished, cfg.pad_id, nxt)
        # Samples whose prompt has ended take the predicted token. A prompt ending exactly at
        # `hi` takes it too: alone, its prefill's AR step would give this same token (the
        # public batch code leaves it masked, so such a sample decoded differently in a batch).
        ended = self.seq_len <= hi
        self.x[:, hi] = torch.where(ended, nxt, self.x[:, hi])
        if not cfg.ignore_stop:
            # A stop predicted here ends the sample too (the public code decodes on past it).
            self.finished |= ended & (nxt == cfg.stop_id)
        return True

    def collect(self, b: int) -> None:
        sample = self.sample_ids[b]
        gen = self.x[b, int(self.seq_len[b]):].tolist()
        out = []
        for t in gen:
            if t == self.cfg.mask_id:
                break
            out.append(t)
            if t == self.cfg.stop_id and not self.cfg.ignore_stop:
                self.report.samples[sample].finished = True
                break
        self.outputs[sample] = out
        self.report.samples[sample].generated_tokens = len(out)

    def trim_finished(self) -> None:
        finished = self._flags(self.finished)[0]
        if not any(finished):
            return
        keep = ~self.finished
        for b in [b for b, f in enumerate(finished) if f]:
            self.collect(b)
        self.sample_ids = [r for r, f in zip(self.sample_ids, finished) if not f]
        self.x, self.seq_len, self.finished = self.x[keep], self.seq_len[keep], self.finished[keep]
        self.samples = self.samples[keep]
        self.cache.trim(keep)
        self.schedule.trim(keep)
        self.window_logits.trim(keep)

    def run(self) -> None:
        self.prefill()
        for block in range(int(self.seq_len.min()) // self.cfg.block_size, self.num_blocks):
            if not self.sample_ids:
                break
            self.denoise_block(block)
            if not self.finalize_block(block):
                self.trim_finished()
                break
            self.trim_finished()
        for b in range(len(self.sample_ids)):
            self.collect(b)


@torch.no_grad()
def generate(model: FastDLLM, prompts: list[list[int]], cfg: DecodeConfig = DecodeConfig(),
             policy: ReusePolicy | None = None, trace_sample: int | None = 0,
             shadow: bool = False, runner=None) -> DecodeResult:
    """Decode a batch of prompts (token id lists, any lengths).

    `policy` None (or k=1) computes every layer. `shadow` also computes every skipped
    layer to report how far the stand-in is from the fresh result (costs the full compute).
    `runner` runs the forwards: None is plain PyTorch; fast.FastRunner(model) is the
    static-shape path, CUDA graphs on a GPU.
    """
    cfg.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    if policy is not None and max(policy.layers) >= model.num_layers:
        raise ConfigError(f"reuse policy names layer {max(policy.layers)}, the model has {model.num_layers}")
    runner = EagerRunner(model) if runner is None else runner
    if shadow and runner.name != "eager":
        raise ConfigError("shadow mode runs on the eager path: leave the runner out")
    run = _Run(model, prompts, cfg, policy, trace_sample, shadow, runner)
    run.report.path = runner.name
    _sync(model.device)
    t0 = time.perf_counter()
    run.run()
    _sync(model.device)
    run.report.wall_seconds = time.perf_counter() - t0
    run.recorder.resolve()   # the one host read of every forward's reuse decisions
    run.report.unmasking = run.unmasking.resolve()   # the one host read of the per-step counts
    for sample, n in enumerate(run.window_logits.unchanged.tolist()):
        run.report.samples[sample].unchanged_reuse_steps = n
    if run.schedule.shadow is not None:
        run.report.shadow = run.schedule.shadow.records
    return DecodeResult([run.outputs[i] for i in range(len(prompts))], run.report)

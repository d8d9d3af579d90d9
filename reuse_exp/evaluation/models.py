"""Where a model comes from: the bundled tiny one, a checkpoint directory, a hub id or random
weights of a named shape; and which decoding path runs it (device and dtype: placement.py)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


from ..engine.config import ModelConfig, shape as named_shape
from ..engine.decoding import EagerRunner
from ..engine.fast import AUTO, FAST, FastRunner
from ..engine.loading import BUNDLED_MODEL_DIR, checkpoint_hash, load_model, load_tokenizer, parse_dtype, random_model, resolve_checkpoint
from ..engine.model import FastDLLM
from ..errors import ConfigError

BUNDLED = "bundled"
RANDOM_PREFIX = "random:"


def bundled_model_dir() -> Path | None:
    """The bundled tiny model's directory, or None where this checkout has none."""
    return BUNDLED_MODEL_DIR if (BUNDLED_MODEL_DIR / "config.json").is_file() else None


def _bundled() -> Path:
    path = bundled_model_dir()
    if path is None:
        raise ConfigError("this checkout has no bundled tiny model (reuse_exp/tiny/model): "
                          "give --model a checkpoint directory, a hub id or random:<shape>")
    return path


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


ANY_DEPTH = 1024   # a depth no model here reaches: where a model's own is not known yet, every index fits


def model_depth(source: str, revision: str | None = None) -> int | None:
    """The number of layers of `source` without loading it: from a named shape, or the config.json
    of the bundled model, a directory or a hub snapshot already cached; None where that is not at
    hand (a hub model not downloaded). ConfigError for a local path that is not a checkpoint."""
    if source.startswith(RANDOM_PREFIX):
        return named_shape(source[len(RANDOM_PREFIX):]).num_hidden_layers
    if source == BUNDLED or Path(source).expanduser().exists() or source.startswith((".", "/", "~")) \
            or source.count("/") != 1:   # a local path (resolve_checkpoint's rule): it must be there
        config = resolve_checkpoint(_bundled() if source == BUNDLED else source) / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(source, "config.json", revision=revision)
        if not isinstance(cached, str):
            return None
        config = Path(cached)
    return ModelConfig.from_json_file(config).num_hidden_layers


def make_runner(model: FastDLLM, decode_path: str = AUTO):
    """The runner of `decode_path` (engine/fast.py's DECODE_PATHS): auto is the fast path
    (CUDA graphs of batch-invariant kernels) on a GPU, plain PyTorch on CPU."""
    if decode_path == FAST or (decode_path == AUTO and model.device.type == "cuda"):
        return FastRunner(model)
    return EagerRunner(model)

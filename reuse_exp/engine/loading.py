"""Checkpoints in, models out: config.json + safetensors by parameter name, no remote code.

`load_model` accepts a local directory or a hub id (downloaded with huggingface_hub;
needs network). The model is built on the meta device and each tensor read once from
its shard straight into its parameter, so host memory never holds two copies; the
q/k/v and gate/up projections are stacked as they load (one matrix product each), and
`state_dict()` still gives the checkpoint's names. Loaded models are for inference:
their weights need no grad.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from .config import ModelConfig, shape
from .decoding import DecodeConfig
from .model import FastDLLM

# The checkpoint the package ships (tiny/ makes it); `--model bundled` loads it.
BUNDLED_MODEL_DIR = Path(__file__).resolve().parents[1] / "tiny" / "model"
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
WEIGHT_INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"
HUB_FILES = ["config.json", "*.safetensors", WEIGHT_INDEX, "tokenizer*", "vocab.json", "merges.txt",
             "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "generation_config.json"]


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use bfloat16, float16 or float32")
    return DTYPES[name]


def resolve_checkpoint(source: str | Path, revision: str | None = None) -> Path:
    """A local directory as is; anything else is taken for a hub id and downloaded (network)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} has no config.json: point --model at a checkpoint directory")
        return path
    if path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise ConfigError(f"model {source!r} not found: give a checkpoint directory or a hub id like org/name")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(source), revision=revision, allow_patterns=HUB_FILES))
    except Exception as e:  # the hub's errors are long; keep the cause, say the fix
        raise ConfigError(f"could not fetch {source!r} from the hub ({type(e).__name__}): check the id, "
                          "the network, and HF_TOKEN for gated models") from e


def weight_files(ckpt: Path) -> dict[str, Path]:
    """Parameter name -> the safetensors file holding it."""
    index = ckpt / WEIGHT_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: ckpt / f for name, f in weight_map.items()}
    single = ckpt / SINGLE_WEIGHTS
    if single.is_file():
        from safetensors import safe_open
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    raise CheckpointError(f"{ckpt} has neither {SINGLE_WEIGHTS} nor {WEIGHT_INDEX}")


def expected_parameters(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = FastDLLM(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_names(cfg: ModelConfig, names: set[str]) -> None:
    expected = set(expected_parameters(cfg))
    if cfg.tie_word_embeddings:
        names = names - {"lm_head.weight"}
        expected = expected - {"lm_head.weight"}
    missing, extra = sorted(expected - names), sorted(names - expected)
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s), first: {missing[0]}")
    if extra:
        raise CheckpointError(f"checkpoint has {len(extra)} unexpected tensor(s), first: {extra[0]}")


def load_model(source: str | Path, dtype: str | torch.dtype = "bfloat16", device: str = "cpu",
               revision: str | None = None) -> tuple[FastDLLM, Path]:
    from safetensors import safe_open
    ckpt = resolve_checkpoint(source, revision)
    cfg = ModelConfig.from_json_file(ckpt / "config.json")
    dtype = parse_dtype(dtype)
    files = weight_files(ckpt)
    check_names(cfg, set(files))
    with torch.device("meta"):
        model = FastDLLM(cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        if name in shapes:
            by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        if not f.is_file():
            raise CheckpointError(f"weight file {f.name} named by the index is missing")
        with safe_open(f, framework="pt", device=str(device)) as sf:
            for name in names:
                got = tuple(sf.get_slice(name).get_shape())
                if got != shapes[name]:
                    raise CheckpointError(f"tensor {name} has shape {got}, the config implies {shapes[name]}")
                state[name] = sf.get_tensor(name).to(dtype)
    model.stack_checkpoint(state)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if missing != ["lm_head.weight"] or unexpected:  # the tie is restored below
            raise CheckpointError(f"tied checkpoint mismatch: missing {missing}, unexpected {unexpected}")
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        model.load_state_dict(state, strict=True, assign=True)
    model.reset_buffers()
    return model.eval().requires_grad_(False), ckpt


def random_model(cfg: ModelConfig | str, dtype: str | torch.dtype = "float32", device: str = "cpu",
                 seed: int = 0, std: float = 0.02) -> FastDLLM:
    """A model of a named or given shape with random weights (benchmarks and tests).

    Built on the meta device and each tensor made in its final dtype and place, so a
    7B model in bf16 never passes through a float32 copy."""
    cfg = shape(cfg) if isinstance(cfg, str) else cfg
    dtype = parse_dtype(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = FastDLLM(cfg)
    state = {}
    for name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        p = torch.empty(t.shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=gen)
        state[name] = p
    model.load_state_dict(model.stack_checkpoint(state), strict=not cfg.tie_word_embeddings, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_buffers()
    return model.eval().requires_grad_(False)


def save_model(model: FastDLLM, directory: str | Path, extra_config: dict | None = None) -> Path:
    """Write config.json and model.safetensors (used by the tiny model's training script)."""
    from safetensors.torch import save_file
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict() | {"architectures": ["Fast_dLLM_QwenForCausalLM"]} | (extra_config or {})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    # The state dict's projections are views of the stacked tensors: one file tensor each.
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, out / SINGLE_WEIGHTS)
    return out


def checkpoint_hash(ckpt: Path) -> str:
    """A short content hash of a local checkpoint's config and weight files (provenance)."""
    h = hashlib.sha256()
    for f in sorted(ckpt.iterdir()):
        if f.suffix in (".json", ".safetensors") and f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


# -- tokenizer ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenIds:
    mask: int
    stop: int
    pad: int


MASK_TOKEN = "|<MASK>|"


def load_tokenizer(ckpt: str | Path):
    """The checkpoint's tokenizer through transformers, offline-safe and without remote code.

    The class its tokenizer_config.json names is loaded directly: AutoTokenizer would first
    read the model's config.json, whose model_type (Fast_dLLM_Qwen) transformers does not
    know, and warn on every run about instantiating "a model of type ``"."""
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name
    ckpt = Path(ckpt)
    try:
        config = ckpt / "tokenizer_config.json"
        name = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
        cls = tokenizer_class_from_name(name) if name else None
        if cls is None:
            return AutoTokenizer.from_pretrained(str(ckpt), trust_remote_code=False)
        return cls.from_pretrained(str(ckpt))
    except Exception as e:
        raise ConfigError(f"could not load the tokenizer in {ckpt}: {e}") from e


def token_ids(tokenizer) -> TokenIds:
    mask = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    if mask is None or mask == tokenizer.unk_token_id:
        raise ConfigError(f"tokenizer has no {MASK_TOKEN} token; this is not a Fast-dLLM v2 tokenizer")
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if stop is None or stop == tokenizer.unk_token_id:
        stop = tokenizer.eos_token_id
    return TokenIds(mask=mask, stop=stop, pad=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop)


def decode_config_for(tokenizer, **settings) -> DecodeConfig:
    ids = token_ids(tokenizer)
    return DecodeConfig(mask_id=ids.mask, stop_id=ids.stop, pad_id=ids.pad, **settings)


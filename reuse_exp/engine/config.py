"""Model shape, read from a checkpoint's config.json or named for benchmarks."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConfigError

SUPPORTED_MODEL_TYPES = ("Fast_dLLM_Qwen", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    bd_size: int = 32
    tie_word_embeddings: bool = False
    model_type: str = "Fast_dLLM_Qwen"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        model_type = d.get("model_type", "Fast_dLLM_Qwen")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        if d.get("rope_scaling"):
            raise ConfigError("rope_scaling is not supported; use a checkpoint without it")
        if d.get("use_sliding_window"):
            raise ConfigError("sliding-window attention is not supported")
        names = cls.__dataclass_fields__
        missing = [n for n in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_key_value_heads") if n not in d]
        if missing:
            raise ConfigError(f"config.json lacks {', '.join(missing)}")
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if cfg.hidden_size % cfg.num_attention_heads or cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ConfigError("hidden_size must divide into heads and heads into key/value heads")
        return cfg

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        return asdict(self)


# Named shapes for benchmarks and random-weight runs. `7b` is Fast_dLLM_v2_7B.
SHAPES = {
    "7b": ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                      num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4),
    "1.5b": ModelConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                        num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                        tie_word_embeddings=True),
    "tiny": ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=352,
                        num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2),
}


def shape(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise ConfigError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    return SHAPES[name]

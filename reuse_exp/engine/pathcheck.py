"""Check that the fast path decodes the eager path's tokens on the tiny shape (fp32).

    reuse-exp pathcheck [--device cuda]

Random tiny weights with peaked predictions (several tokens unmask per step), a batch
of three prompts of different lengths, no reuse and three reuse policies. Exits 1 on
any difference. (tests/test_fast_path.py does the same on CPU, and on CUDA when present.)
"""
from typing import Callable

import torch

from .config import ModelConfig
from .decoding import DecodeConfig, generate
from .fast import FastRunner
from .loading import random_model
from .policies.fixed import FixedPolicy

CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2)
DEC = DecodeConfig(mask_id=63, stop_id=62, pad_id=61, max_new_tokens=64, threshold=0.9)
PROMPTS = [[5, 6, 7, 8] * 10, [9, 10, 11, 12, 13] * 3 + [14] * 4, list(range(1, 26)) * 3]


def check_paths(device: str | None = None, echo: Callable[[str], None] = print) -> bool:
    """Eager against fast for no reuse and three policies, a line each; True when all agree."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = random_model(CFG, "float32", device=device, seed=0, std=0.2)
    runner = FastRunner(model)
    ok = True
    for spec in [None, (2, "middle", "output"), (3, "last", "delta"), (2, "first", "delta")]:
        policy = FixedPolicy.create(8, k=spec[0], subset=spec[1], mode=spec[2]) if spec else None
        eager = generate(model, PROMPTS, DEC, policy)
        fast = generate(model, PROMPTS, DEC, policy, runner=runner)
        same = eager.tokens == fast.tokens
        ok &= same
        echo(f"{device} {fast.report.path:20s} policy={spec}: {'identical' if same else 'DIFFERENT'} "
             f"({sum(map(len, eager.tokens))} tokens)")
    return ok

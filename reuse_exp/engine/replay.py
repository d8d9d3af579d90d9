"""Each row's logits of the current small block from its last forward that computed every layer.

A `replay` step skips the whole forward and unmasks from them. A layer-reuse step is compared
with them bit for bit: in `output` mode every layer after the reused ones recomputes from the
same cached input against the same K/V, so the step's logits come out unchanged, whatever the
subset (docs/engine.md). The window's first position is left out of the comparison: a
small-block forward predicts it from its own logit, a full-block forward from the one before
(the public code's approximation), and it is never masked when a small-block forward runs.
"""
from __future__ import annotations

import torch


class WindowLogits:
    def __init__(self, n_samples: int, device):
        self.values: torch.Tensor | None = None              # [rows, window, vocab], allocated on first use
        self.unchanged = torch.zeros(n_samples, dtype=torch.long, device=device)  # per sample

    def store(self, logits: torch.Tensor, rows: list[bool]) -> None:
        """Keep the logits of the rows that computed every layer on this step."""
        if self.values is None or self.values.shape != logits.shape:
            self.values = torch.zeros_like(logits)
        mask = torch.tensor(rows, device=logits.device)[:, None, None]
        self.values = torch.where(mask, logits, self.values)

    def replay(self) -> torch.Tensor:
        return self.values

    def count_unchanged(self, logits: torch.Tensor, rows: list[bool], sample_ids: list[int]) -> None:
        """For each of `rows` (a layer-reuse step), whether its logits equal the stored ones bit for bit."""
        if self.values is None or not any(rows):
            return
        same = (logits[:, 1:] == self.values[:, 1:]).flatten(1).all(dim=1)
        picked = torch.tensor(rows, device=logits.device)
        samples = torch.tensor(sample_ids, device=logits.device)
        self.unchanged.index_add_(0, samples[picked], same[picked].long())

    def trim(self, keep: torch.Tensor) -> None:
        if self.values is not None:
            self.values = self.values[keep]

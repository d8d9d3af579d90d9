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

    def store(self, logits: torch.Tensor, rows: torch.Tensor) -> None:
        """Keep the logits of the rows (bool [rows], device) that computed every layer on this step."""
        if self.values is None or self.values.shape != logits.shape:
            self.values = torch.zeros_like(logits)
        self.values = torch.where(rows[:, None, None], logits, self.values)

    def replay(self) -> torch.Tensor:
        return self.values

    def count_unchanged(self, logits: torch.Tensor, rows: torch.Tensor, samples: torch.Tensor) -> None:
        """For each of `rows` (bool [rows], device: a layer-reuse step), whether its logits equal the
        stored ones bit for bit; `samples` (long [rows], device) are the rows' sample indices."""
        if self.values is None:
            return
        same = (logits[:, 1:] == self.values[:, 1:]).flatten(1).all(dim=1)
        self.unchanged.index_add_(0, samples, (same & rows).long())

    def trim(self, keep: torch.Tensor) -> None:
        if self.values is not None:
            self.values = self.values[keep]

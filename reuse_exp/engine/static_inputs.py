"""The device-side inputs of a static forward: which batch rows go through its layers (padded so
that few graphs serve every count), the rows it is for, and the addresses a captured graph reads."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def padded_size(n: int, limit: int) -> int:
    """n rounded up to a power of two, at most `limit`."""
    return min(1 << max(n - 1, 0).bit_length(), limit)


def entries(active: list[bool]) -> list[int]:
    """The batch rows a forward runs: its active rows, then as many inactive rows as round their
    count up to a power of two. All distinct, so every cache write of a forward has its own row;
    an inactive row goes through the layers but writes nothing (its outputs are not read)."""
    on = [b for b, a in enumerate(active) if a]
    off = [b for b, a in enumerate(active) if not a]
    return on + off[:padded_size(len(on), len(active)) - len(on)]


@dataclass
class StaticInputs:
    """Device buffers a captured graph reads; refreshed in place before each replay. Every
    integer input is a view of `ints`, so one host-to-device copy refreshes them all."""
    tokens: torch.Tensor     # [B, T] long
    ints: torch.Tensor       # start, kv_len, offset, then the rows (entries) the forward runs
    active: torch.Tensor     # [B] bool: the rows the forward is for

    @property
    def start(self) -> torch.Tensor:   # [1]: absolute position of the first token
        return self.ints[0:1]

    @property
    def kv_len(self) -> torch.Tensor:  # [1]: keys [0, kv_len) are valid
        return self.ints[1:2]

    @property
    def offset(self) -> torch.Tensor:  # [1]: position of the tokens inside the block (replace_position)
        return self.ints[2:3]

    @property
    def rows(self) -> torch.Tensor:    # [E]: the batch rows that go through the layers
        return self.ints[3:]

    @classmethod
    def allocate(cls, B: int, T: int, n_rows: int, device) -> "StaticInputs":
        ints = torch.zeros(3 + n_rows, dtype=torch.long, device=device)
        ints[1] = T
        ints[3:] = torch.arange(n_rows)
        return cls(torch.zeros(B, T, dtype=torch.long, device=device), ints,
                   torch.zeros(B, dtype=torch.bool, device=device))


def addresses(buffers: list[torch.Tensor]) -> tuple:
    """A graph bakes in the addresses of every buffer it touches; a buffer freed by a trim
    can come back at the same address with another shape, so both go in its key."""
    return tuple((b.data_ptr(), tuple(b.shape)) for b in buffers)

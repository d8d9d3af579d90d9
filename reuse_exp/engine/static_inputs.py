"""The device-side inputs of a static forward: which batch rows go through a layer, padded
so that few graphs serve every count, and the buffers a captured graph reads."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rows:
    """Batch rows that go through a layer, padded to a power of two by repeating the last.

    index: [n] long, the rows (of the tensor the layer reads); canon: [n] long, for each
    entry the first entry holding the same row. Outputs are taken through `canon` before
    anything is written, so a repeated row writes exactly its original's values."""
    index: torch.Tensor
    canon: torch.Tensor


def pick(t: torch.Tensor, rows: Rows | None) -> torch.Tensor:
    return t if rows is None else t.index_select(0, rows.index)


def canonical(t: torch.Tensor, rows: Rows | None) -> torch.Tensor:
    return t if rows is None else t.index_select(0, rows.canon)


def padded_size(n: int, limit: int) -> int:
    """n rounded up to a power of two, at most `limit`."""
    return min(1 << max(n - 1, 0).bit_length(), limit)


def padded_rows(entries: list[int], limit: int) -> tuple[list[int], list[int]]:
    """`entries` padded to `padded_size` by repeating the last; and each entry's first occurrence."""
    size = padded_size(len(entries), limit)
    n = len(entries)
    return entries + [entries[-1]] * (size - n), list(range(n)) + [n - 1] * (size - n)


@dataclass
class StaticInputs:
    """Device buffers a captured graph reads; refreshed in place before each replay. Every
    integer input is a view of `ints`, so one host-to-device copy refreshes them all."""
    tokens: torch.Tensor     # [B, T] long
    ints: torch.Tensor       # start, kv_len, offset, then each Rows' index and canon
    rows: Rows | None        # batch rows this forward computes (None: all)
    sub: Rows | None         # mixed reuse: of `rows`, the entries that compute the reused layers
    sub_rows: Rows | None    # the same as batch rows (for the caches)

    @property
    def start(self) -> torch.Tensor:   # [1]: absolute position of the first token
        return self.ints[0:1]

    @property
    def kv_len(self) -> torch.Tensor:  # [1]: keys [0, kv_len) are valid
        return self.ints[1:2]

    @property
    def offset(self) -> torch.Tensor:  # [1]: position of the tokens inside the block (replace_position)
        return self.ints[2:3]

    @classmethod
    def allocate(cls, B: int, T: int, n_rows: int | None, n_sub: int | None, device) -> "StaticInputs":
        sizes = [3] + [n for n in (n_rows, n_rows, n_sub, n_sub, n_sub, n_sub) if n is not None]
        ints = torch.zeros(sum(sizes), dtype=torch.long, device=device)
        parts = iter(ints.split(sizes)[1:])
        rows = Rows(next(parts), next(parts)) if n_rows is not None else None
        sub = Rows(next(parts), next(parts)) if n_sub is not None else None
        sub_rows = Rows(next(parts), next(parts)) if n_sub is not None else None
        return cls(torch.zeros(B, T, dtype=torch.long, device=device), ints, rows, sub, sub_rows)


def addresses(buffers: list[torch.Tensor]) -> tuple:
    """A graph bakes in the addresses of every buffer it touches; a buffer freed by a trim
    can come back at the same address with another shape, so both go in its key."""
    return tuple((b.data_ptr(), tuple(b.shape)) for b in buffers)

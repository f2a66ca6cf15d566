"""The one row-block reader of a tensor over a base and some steps, through the reader interface alone (`get_rows`,
`is_factored`/`delta_rows` for an adapter's factors): every extrapolator, EffOPD's offline jump and the analysis'
trajectory metrics read W_0's rows and the rows of W_t − W_0 in float64 through `row_blocks`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

#: memory a block of rows may take by default: (steps + 1) × rows × row size float64 values
ROW_BLOCK_BYTES = 64 << 20


def _rows_delta(m, name: str, lo: int, hi: int, w0: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """Rows lo:hi (stored first dimension) of W_t − W_0 in float64, as stored (no transpose); ``m`` is a step's
    reader (a LoRA adapter forms its rows from the factors)."""
    if m.is_factored(name):
        return m.delta_rows(name, lo, hi, torch.float64, transposed)
    if not m.shape(name):  # a 0-d tensor is one row of one entry
        return m.get(name).reshape(1).to(torch.float64) - w0
    rows = m.get_rows(name, lo, hi)
    return rows.to(torch.float64) - w0


def row_ranges(n_rows: int, row_numel: int, n_steps: int, budget: int | None = None) -> list[tuple[int, int]]:
    """Ranges of the stored first dimension whose (n_steps + 1) float64 row blocks fit ``budget`` bytes (default
    ROW_BLOCK_BYTES; None-like 0 or less: the whole tensor in one block)."""
    budget = ROW_BLOCK_BYTES if budget is None else budget
    if budget <= 0 or n_rows <= 0:
        return [(0, max(n_rows, 0))]
    step = max(1, budget // max(1, (n_steps + 1) * row_numel * 8))
    return [(lo, min(lo + step, n_rows)) for lo in range(0, n_rows, step)]


def row_blocks(base, steps: Sequence, name: str, *, ranges: Sequence[tuple[int, int]] | None = None,
               budget: int | None = None, n_rows: int | None = None, transposed: bool = False
               ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """The one row-block reader of a tensor over a base and some steps (every extrapolator, EffOPD's offline jump,
    the trajectory metrics): (lo, hi, W_0 rows, D) for row ranges of the stored first dimension, W_0's rows in
    float64 and D (n_steps, hi − lo, …) the rows of W_t − W_0 of each step in ``steps`` (readers, in order),
    subtracted in float64. ``ranges`` are the row ranges (default: blocks of ``budget`` bytes, see `row_ranges`;
    ``budget`` 0: the whole tensor at once); ``n_rows`` the rows to cover (default: all the base has). A 0-d tensor
    is one block of one row. Each step's bytes are read once in all, a block at a time."""
    shape = tuple(base.shape(name))
    if not shape:
        w0 = base.get(name).reshape(1).to(torch.float64)
        yield 0, 1, w0, torch.stack([_rows_delta(m, name, 0, 1, w0) for m in steps]) if steps else w0[None][:0]
        return
    n = shape[0] if n_rows is None else n_rows
    for lo, hi in (ranges if ranges is not None else row_ranges(n, math.prod(shape[1:]), len(steps), budget)):
        w0 = base.get_rows(name, lo, hi).to(torch.float64)
        d = torch.stack([_rows_delta(m, name, lo, hi, w0, transposed) for m in steps]) if steps else w0[None][:0]
        yield lo, hi, w0, d

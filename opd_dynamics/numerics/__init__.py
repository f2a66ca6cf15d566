"""The numerical rules every layer follows, in one place.

- **Precision** (`update_dtype`): an update W_t − W_0 (or W_t + c·Δ) is formed in float32 at least, in
  float64 for float64 weights or when float64 is asked for; never in bf16/fp16, where small updates vanish.
- **Frobenius norm and inner product** (`fro2`, `dot`): accumulated in float64, by the fused CPU kernel
  where it applies, else in row blocks, so a 7B-sized matrix never gets a whole float64 copy.
- **The unchanged threshold** (`CHANGE_THRESHOLD`, applied by `changed_count` and `update_stats`): an entry counts
  as changed when |w_t − w_0| > 1e-3 · max(|w_0|, |w_t|), a change bf16 can show.
- **Lock-in** (`locked_in`, `LOCKIN_THRESHOLD`, `LOCKIN_MARGIN`): an alignment to the final update counts as locked
  in when it is at least 0.5 and beats its random-walk null by 0.2 (the analysis' lockin_step, the recorder's
  estimate, and the defaults of `AnalysisOptions`).
- **Large CPU tensors in huge pages** (`upcast`, `subtract`): torch's CPU allocator maps every block above
  glibc's mmap threshold (at most 32 MB) afresh and returns it on free, so each float64 copy of a 4864x896
  update (35 MB) pays about 8,500 page faults: 16-19 ms on the project's 2-core machine, against 5-6 ms when
  the memory comes from numpy, which asks for huge pages (madvise) on Linux. The values are the same; only
  where the memory comes from changes. Small tensors, CUDA tensors and tensors that need grad go through
  torch as usual.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from opd_dynamics.numerics.fused import fused_dot, fused_sum_squares, fused_update_stats

__all__ = ["CHANGE_THRESHOLD", "HUGE_BYTES", "LOCKIN_MARGIN", "LOCKIN_THRESHOLD", "changed_count", "dot", "fro2",
           "locked_in", "subtract", "update_stats", "upcast", "update_dtype"]

WIDE_DTYPES = (torch.float32, torch.float64)
#: |w_t − w_0| > CHANGE_THRESHOLD · max(|w_0|, |w_t|): a change bf16 can show (`changed_fraction`)
CHANGE_THRESHOLD = 1e-3


def update_dtype(x: Tensor | torch.dtype, asked: torch.dtype = torch.float32) -> torch.dtype:
    """The precision an update of ``x`` (a tensor or its dtype) is formed in: float64 when ``x`` is float64 or
    float64 is ``asked`` for, else float32 (16-bit weights are upcast before any subtraction)."""
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    return torch.float64 if torch.float64 in (dtype, asked) else torch.float32


BLOCK_ELEMS = 1 << 22  # about 32 MB of float64 per block


def row_blocks(t: Tensor):
    """Yield row slices of a (flattened to 2-D) tensor of at most ~BLOCK_ELEMS elements each."""
    t2 = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    step = max(1, BLOCK_ELEMS // max(1, t2.shape[1]))
    for i in range(0, t2.shape[0], step):
        yield i, t2[i : i + step]


def fro2(t: Tensor) -> float:
    """‖t‖F², accumulated in float64 (NaN/Inf propagate, never raise: that is how `finite` is found)."""
    fused = fused_sum_squares(t)
    if fused is not None:
        return fused
    total = 0.0
    for _, blk in row_blocks(t):
        total += float(torch.sum(blk.to(torch.float64).square()))
    return total


def dot(a: Tensor, b: Tensor) -> float:
    """Frobenius inner product ⟨a, b⟩ accumulated in float64, block by block."""
    if a.shape != b.shape:
        raise ValueError(f"dot: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    fused = fused_dot(a, b)
    if fused is not None:
        return fused
    b2 = b.reshape(b.shape[0], -1) if b.dim() > 1 else b.reshape(1, -1)
    total = 0.0
    for i, blk in row_blocks(a):
        other = b2[i : i + blk.shape[0]]
        total += float(torch.sum(blk.to(torch.float64) * other.to(torch.float64)))
    return total


#: from here up (2 MiB, one huge page) numpy's memory is faster to fill than torch's
HUGE_BYTES = 1 << 21
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


def _huge(t: Tensor, dtype: torch.dtype) -> bool:
    return (t.device.type == "cpu" and dtype in _NUMPY and not t.requires_grad
            and t.numel() * dtype.itemsize >= HUGE_BYTES)


def _numpy_empty(t: Tensor, dtype: torch.dtype) -> Tensor:
    """An uninitialised contiguous CPU tensor of t's shape in ``dtype``, in numpy's memory."""
    return torch.from_numpy(np.empty(tuple(t.shape), dtype=_NUMPY[dtype]))


def upcast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """The values of ``t.to(dtype)``; ``t`` itself when it already has that dtype."""
    if t.dtype == dtype:
        return t
    return _numpy_empty(t, dtype).copy_(t) if _huge(t, dtype) else t.to(dtype)


def subtract(a: Tensor, b: Tensor) -> Tensor:
    """a - b (same shape and dtype) into a fresh tensor."""
    return torch.sub(a, b, out=_numpy_empty(a, a.dtype)) if _huge(a, a.dtype) else a - b


def changed_count(w0: Tensor, wt: Tensor, delta: Tensor | None = None) -> int:
    """Entries with |w_t - w_0| > CHANGE_THRESHOLD * max(|w_0|, |w_t|) (a change bf16 can show).

    Computed in the delta's precision (float32 at least): the difference of two bf16/fp16 values is exact
    there, and the threshold is far above float32 rounding.
    """
    if w0.shape != wt.shape:
        raise ValueError(f"changed_count: shapes differ {tuple(w0.shape)} vs {tuple(wt.shape)}")
    d = delta if delta is not None else wt.to(torch.float64) - w0.to(torch.float64)
    m = w0.abs()
    torch.maximum(m, wt.abs(), out=m)
    m.mul_(CHANGE_THRESHOLD)
    return int(torch.count_nonzero(d.abs().gt_(m)))


def update_stats(w0: Tensor, wt: Tensor, delta: Tensor | None = None) -> tuple[float, int]:
    """(‖W_t − W_0‖F² at float64 accuracy, count of bf16-visible changes) for one tensor and step.

    A given ``delta`` is taken as the update (a LoRA step's comes from its factors, not from W_t − W_0).
    Without one: a single fused pass over the float32 base and the step in its stored dtype where the CPU
    kernel applies, else the torch route on the delta formed here in the base's precision.
    """
    if delta is None:
        fused = fused_update_stats(w0, wt, CHANGE_THRESHOLD)
        if fused is not None:
            return fused
    dt = delta.dtype if delta is not None else update_dtype(w0)
    w0, wt = w0.to(dt), wt.to(dt)
    if delta is None:
        delta = wt - w0
    return fro2(delta), changed_count(w0, wt, delta)


#: lockin_step: the first step whose direction_cosine to the final update is at least LOCKIN_THRESHOLD and above
#: its random-walk null by LOCKIN_MARGIN (the rule: `locked_in`)
LOCKIN_THRESHOLD = 0.5
LOCKIN_MARGIN = 0.2


def locked_in(cosine: float, null: float, threshold: float = LOCKIN_THRESHOLD, margin: float = LOCKIN_MARGIN) -> bool:
    """The lock-in rule, in one place: an alignment ``cosine`` to the final update counts as locked in when it is
    at least ``threshold`` and exceeds its random-walk ``null`` by at least ``margin`` (NaN never does)."""
    return bool(cosine >= threshold and cosine - null >= margin)

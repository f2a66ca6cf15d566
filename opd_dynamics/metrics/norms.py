"""Elementwise size of an update: Frobenius norms, RMS and the fraction of bf16-visible changes.

Pure functions on tensors (no I/O). Accumulation is in float64 and done in row blocks, so a 7B-sized
matrix never gets a whole float64 copy; NaN/Inf never raise (they show up as ``finite=False``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_BLOCK_ELEMS = 1 << 22  # about 32 MB of float64 per block


def _row_blocks(t: Tensor):
    """Yield row slices of a (flattened to 2-D) tensor of at most ~_BLOCK_ELEMS elements each."""
    t2 = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    step = max(1, _BLOCK_ELEMS // max(1, t2.shape[1]))
    for i in range(0, t2.shape[0], step):
        yield i, t2[i : i + step]


def sum_squares64(t: Tensor) -> float:
    """Sum of squares of all entries accumulated in float64 (NaN propagates, never raises)."""
    total = 0.0
    for _, blk in _row_blocks(t):
        total += float(torch.sum(blk.to(torch.float64).square()))
    return total


def dot64(a: Tensor, b: Tensor) -> float:
    """Frobenius inner product <a, b> accumulated in float64, block by block."""
    if a.shape != b.shape:
        raise ValueError(f"dot64: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    b2 = b.reshape(b.shape[0], -1) if b.dim() > 1 else b.reshape(1, -1)
    total = 0.0
    for i, blk in _row_blocks(a):
        other = b2[i : i + blk.shape[0]]
        total += float(torch.sum(blk.to(torch.float64) * other.to(torch.float64)))
    return total


def all_finite(*ts: Tensor) -> bool:
    """True when every entry of every tensor is finite."""
    return all(bool(torch.isfinite(t).all()) for t in ts)


def changed_count(w0: Tensor, wt: Tensor) -> int:
    """Entries with |w_t - w_0| > 1e-3 * max(|w_0|, |w_t|) (a change bf16 can show), in float64."""
    if w0.shape != wt.shape:
        raise ValueError(f"changed_count: shapes differ {tuple(w0.shape)} vs {tuple(wt.shape)}")
    wt2 = wt.reshape(wt.shape[0], -1) if wt.dim() > 1 else wt.reshape(1, -1)
    n = 0
    for i, blk in _row_blocks(w0):
        a = blk.to(torch.float64)
        b = wt2[i : i + blk.shape[0]].to(torch.float64)
        n += int(((b - a).abs() > 1e-3 * torch.maximum(a.abs(), b.abs())).sum())
    return n


def norm_metrics(w0: Tensor, wt: Tensor, delta: Tensor) -> dict:
    """Norm columns of module_allocation.csv for one tensor (energy_share needs totals: not here).

    ``delta`` is W_t - W_0 already formed in float32/float64 by the caller. Returns update_norm,
    base_norm, relative_update (NaN when the base is zero), rms_update, changed_fraction, finite.
    """
    if delta.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"norm_metrics: delta must be float32 or float64 (got {delta.dtype}); "
                         "upcast before subtracting")
    numel = delta.numel()
    f = math.sqrt(sum_squares64(delta)) if numel else 0.0
    base = math.sqrt(sum_squares64(w0)) if numel else 0.0
    rel = math.nan if base == 0 else f / base  # NaN/Inf propagate; no ZeroDivisionError
    return {
        "update_norm": f,
        "base_norm": base,
        "relative_update": rel,
        "rms_update": f / math.sqrt(numel) if numel else math.nan,
        "changed_fraction": changed_count(w0, wt) / numel if numel else math.nan,
        "finite": all_finite(w0, wt),
    }

"""Elementwise size of an update: Frobenius norms, RMS and the fraction of bf16-visible changes.

Pure functions on tensors (no I/O). Accumulation is in float64 and done in row blocks, so a 7B-sized
matrix never gets a whole float64 copy; NaN/Inf never raise (they show up as ``finite=False``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from opd_dynamics.metrics.fused import fused_dot, fused_sum_squares, fused_update_stats

_BLOCK_ELEMS = 1 << 22  # about 32 MB of float64 per block


def _row_blocks(t: Tensor):
    """Yield row slices of a (flattened to 2-D) tensor of at most ~_BLOCK_ELEMS elements each."""
    t2 = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    step = max(1, _BLOCK_ELEMS // max(1, t2.shape[1]))
    for i in range(0, t2.shape[0], step):
        yield i, t2[i : i + step]


def sum_squares64(t: Tensor) -> float:
    """Sum of squares of all entries accumulated in float64 (NaN propagates, never raises)."""
    fused = fused_sum_squares(t)
    if fused is not None:
        return fused
    total = 0.0
    for _, blk in _row_blocks(t):
        total += float(torch.sum(blk.to(torch.float64).square()))
    return total


def dot64(a: Tensor, b: Tensor) -> float:
    """Frobenius inner product <a, b> accumulated in float64, block by block."""
    if a.shape != b.shape:
        raise ValueError(f"dot64: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    fused = fused_dot(a, b)
    if fused is not None:
        return fused
    b2 = b.reshape(b.shape[0], -1) if b.dim() > 1 else b.reshape(1, -1)
    total = 0.0
    for i, blk in _row_blocks(a):
        other = b2[i : i + blk.shape[0]]
        total += float(torch.sum(blk.to(torch.float64) * other.to(torch.float64)))
    return total


_ROW = 1024
_WIDE = (torch.float32, torch.float64)


def fro2(t: Tensor) -> float:
    """‖t‖F² at float64 accuracy without a float64 copy: the fused CPU kernel, else float32 norms of
    1024-element rows (error ~1e-7 relative each) squared and summed in float64. NaN/Inf propagate (that
    is how `finite` is found)."""
    fused = fused_sum_squares(t)
    if fused is not None:
        return fused
    flat = t.reshape(-1) if t.dtype in _WIDE else t.reshape(-1).float()
    n = flat.numel()
    k = n // _ROW * _ROW
    total = 0.0
    if k:
        rows = torch.linalg.vector_norm(flat[:k].view(-1, _ROW), dim=1)
        total += float(rows.to(torch.float64).square().sum())
    if k < n:
        total += float(flat[k:].to(torch.float64).square().sum())
    return total


def changed_count(w0: Tensor, wt: Tensor, delta: Tensor | None = None) -> int:
    """Entries with |w_t - w_0| > 1e-3 * max(|w_0|, |w_t|) (a change bf16 can show).

    Computed in the delta's precision (float32 at least): the difference of two bf16/fp16 values is exact
    there, and the 1e-3 threshold is far above float32 rounding.
    """
    if w0.shape != wt.shape:
        raise ValueError(f"changed_count: shapes differ {tuple(w0.shape)} vs {tuple(wt.shape)}")
    d = delta if delta is not None else wt.to(torch.float64) - w0.to(torch.float64)
    m = w0.abs()
    torch.maximum(m, wt.abs(), out=m)
    m.mul_(1e-3)
    return int(torch.count_nonzero(d.abs().gt_(m)))


def update_stats(w0: Tensor, wt: Tensor, delta: Tensor | None = None) -> tuple[float, int]:
    """(‖W_t − W_0‖F² at float64 accuracy, count of bf16-visible changes) for one tensor and step.

    A given ``delta`` is taken as the update (a LoRA step's comes from its factors, not from W_t − W_0).
    Without one: a single fused pass over the float32 base and the step in its stored dtype where the CPU
    kernel applies, else the torch route on the delta formed here in the base's precision.
    """
    if delta is None:
        fused = fused_update_stats(w0, wt)
        if fused is not None:
            return fused
    dt = delta.dtype if delta is not None else (w0.dtype if w0.dtype in _WIDE else torch.float32)
    w0, wt = w0.to(dt), wt.to(dt)
    if delta is None:
        delta = wt - w0
    return fro2(delta), changed_count(w0, wt, delta)


def norm_metrics(w0: Tensor, wt: Tensor, delta: Tensor | None = None, base_fro2: float | None = None) -> dict:
    """Norm columns of module_allocation.csv for one tensor (energy_share needs totals: not here).

    ``w0`` and ``wt`` in any float dtype (the fast path wants a float32 base); ``delta`` (W_t − W_0 in
    float32/float64) may be passed when the caller already has it. ``base_fro2`` (‖W_0‖F²) may be
    passed when the caller computes it once per tensor. Returns update_norm, base_norm, relative_update
    (NaN when the base is zero), rms_update, changed_fraction, finite (W_0 and W_t free of NaN/Inf).
    """
    if delta is not None and delta.dtype not in _WIDE:
        raise ValueError(f"norm_metrics: delta must be float32 or float64 (got {delta.dtype}); "
                         "upcast before subtracting")
    numel = w0.numel()
    f2, changed = update_stats(w0, wt, delta) if numel else (0.0, 0)
    b2 = (fro2(w0) if base_fro2 is None else base_fro2) if numel else 0.0
    # NaN/Inf in W_0 or W_t make ‖W_0‖² or ‖ΔW‖² non-finite (so would |w| > ~1e18, far beyond trained weights)
    finite = math.isfinite(f2) and math.isfinite(b2)
    f, base = math.sqrt(f2), math.sqrt(b2)
    return {
        "update_norm": f,
        "base_norm": base,
        "relative_update": math.nan if base == 0 else f / base,
        "rms_update": f / math.sqrt(numel) if numel else math.nan,
        "changed_fraction": changed / numel if numel else math.nan,
        "finite": finite,
    }

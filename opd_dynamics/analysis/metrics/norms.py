"""Elementwise size of an update: Frobenius norms, RMS and the fraction of bf16-visible changes.

Pure functions on tensors (no I/O); sums in float64 (`opd_dynamics.numerics`); NaN/Inf never raise (they
show up as ``finite=False``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from opd_dynamics.numerics import CHANGE_THRESHOLD, WIDE_DTYPES, fro2, update_dtype
from opd_dynamics.numerics.fused import fused_update_stats


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


def norm_metrics(w0: Tensor, wt: Tensor, delta: Tensor | None = None, base_fro2: float | None = None) -> dict:
    """Norm columns of module_allocation.csv for one tensor (energy_share needs totals: not here).

    ``w0`` and ``wt`` in any float dtype (the fast path wants a float32 base); ``delta`` (W_t − W_0 in
    float32/float64) may be passed when the caller already has it. ``base_fro2`` (‖W_0‖F²) may be
    passed when the caller computes it once per tensor. Returns update_norm, base_norm, relative_update
    (NaN when the base is zero), rms_update, changed_fraction, finite (W_0 and W_t free of NaN/Inf).
    """
    if delta is not None and delta.dtype not in WIDE_DTYPES:
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

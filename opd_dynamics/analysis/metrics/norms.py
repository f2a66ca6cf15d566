"""Elementwise size of an update: Frobenius norms, RMS and the fraction of bf16-visible changes.

Pure functions on tensors (no I/O); sums in float64 (`opd_dynamics.numerics`); NaN/Inf never raise (they
show up as ``finite=False``).
"""

from __future__ import annotations

import math

from torch import Tensor

from opd_dynamics.numerics import WIDE_DTYPES, fro2, update_stats


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
    return {**allocation_columns(math.sqrt(f2), math.sqrt(b2), numel, changed / numel if numel else math.nan),
            "finite": finite}


def allocation_columns(update_norm: float, base_norm: float, numel: int, changed_fraction: float) -> dict:
    """module_allocation.csv's norm columns from ‖ΔW‖F, ‖W_0‖F and the tensor's size, derived here only (the
    analysis of checkpoints and of a recorder's sketch series both build them so): update_norm, base_norm,
    relative_update (NaN when the base is zero), rms_update (NaN for an empty tensor), changed_fraction."""
    return {
        "update_norm": update_norm,
        "base_norm": base_norm,
        "relative_update": math.nan if base_norm == 0 else update_norm / base_norm,
        "rms_update": update_norm / math.sqrt(numel) if numel else math.nan,
        "changed_fraction": changed_fraction,
    }

"""One-pass CPU kernels for the norm-only columns, on tensors in their stored dtype.

The eager torch route makes about ten memory passes per step (upcast, subtract, norm, abs, maximum,
compare, count) and allocates a float32 copy of every step; on a CPU that, not the read, bounded the
norm-only pass. These kernels (numba, `_kernels.py`, compiled on first use and cached on disk) read the
base and the step once each, float32 or bf16 (decoded from its bits), and accumulate in float64. Each
function returns None where a kernel does not apply (not CPU, other dtypes, not contiguous, numba
missing); callers then use the torch route.
"""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


@lru_cache(maxsize=1)
def _kernels() -> ModuleType | None:
    try:
        from opd_dynamics.numerics import _kernels
    except ImportError:  # pragma: no cover - numba is a dependency; a broken install falls back to torch
        return None
    return _kernels


def _array(t: Tensor) -> np.ndarray:
    """A zero-copy numpy view: float32 as is, bf16 as its uint16 bits."""
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()


def _fits(*ts: Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype in _KERNEL_DTYPES and t.is_contiguous() and t.numel() > 0
               for t in ts) and _kernels() is not None


def fused_update_stats(w0: Tensor, wt: Tensor, threshold: float) -> tuple[float, int] | None:
    """(‖W_t − W_0‖F² in float64, count of changes |Δ| > threshold·max(|w0|, |wt|)), or None."""
    if w0.shape != wt.shape or not _fits(w0, wt):
        return None
    s, k = _kernels().update_stats(_array(w0).reshape(-1), _array(wt).reshape(-1), np.float32(threshold))
    return float(s), int(k)


def fused_sum_squares(x: Tensor) -> float | None:
    """‖x‖F² in float64, or None."""
    return float(_kernels().sum_squares(_array(x).reshape(-1))) if _fits(x) else None


def fused_dot(a: Tensor, b: Tensor) -> float | None:
    """Frobenius inner product <a, b> in float64, or None."""
    if a.shape != b.shape or not _fits(a, b):
        return None
    return float(_kernels().dot(_array(a).reshape(-1), _array(b).reshape(-1)))


def fused_row_stats(e0: Tensor, et: Tensor) -> np.ndarray | None:
    """(3, rows) float64: per-row dot product of e0 and et, ‖e0_row‖², ‖et_row‖²; or None."""
    if e0.dim() != 2 or e0.shape != et.shape or not _fits(e0, et):
        return None
    return _kernels().row_stats(_array(e0), _array(et))

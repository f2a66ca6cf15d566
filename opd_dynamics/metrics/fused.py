"""One-pass CPU kernel for the per-step norm columns: ‖W_t − W_0‖F² and the bf16-visible change count.

The eager torch route makes about ten memory passes per step (upcast, subtract, norm, abs, maximum,
compare, count); on a CPU that, not the read, bounded the norm-only pass. This kernel reads the float32
base and the step in its stored dtype (bf16 decoded from its bits, or float32) once, and accumulates
the squares in float64. It is compiled by numba on first use (cached on disk); where numba or the
input layout does not fit, `fused_update_stats` returns None and the caller uses the torch route.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

CHANGE_THRESHOLD = 1e-3  # |Δ| > 1e-3 · max(|w0|, |wt|): a change bf16 can show
_BLOCK = 4096  # elements decoded at a time: stays in L1/L2


@lru_cache(maxsize=1)
def _kernels():
    """Compile (or load from numba's cache) the two kernels; None when numba is not importable."""
    try:
        from numba import njit
    except ImportError:  # pragma: no cover - numba is a dependency; a broken install falls back to torch
        return None
    # Reassociation lets the float64 sum vectorize; NaN/Inf semantics are kept (no nnan/ninf flags).
    fm = {"reassoc", "nsz", "contract"}

    @njit(cache=True, nogil=True, fastmath=fm)
    def stats_f32(w0, wt, c):  # pragma: no cover - compiled
        s = 0.0
        k = 0
        for i in range(w0.size):
            a = w0[i]
            t = wt[i]
            d = t - a
            s += np.float64(d) * np.float64(d)
            k += abs(d) > max(abs(a), abs(t)) * c
        return s, k

    @njit(cache=True, nogil=True, fastmath=fm)
    def stats_bf16(w0, bits, c):  # pragma: no cover - compiled
        n = w0.size
        buf = np.empty(_BLOCK, np.uint32)
        f = buf.view(np.float32)
        s = 0.0
        k = 0
        for lo in range(0, n, _BLOCK):
            m = min(_BLOCK, n - lo)
            for j in range(m):  # bf16 is the top half of a float32: decoding is exact
                buf[j] = np.uint32(bits[lo + j]) << 16
            for j in range(m):
                a = w0[lo + j]
                t = f[j]
                d = t - a
                s += np.float64(d) * np.float64(d)
                k += abs(d) > max(abs(a), abs(t)) * c
        return s, k

    return stats_f32, stats_bf16


def fused_update_stats(w0: Tensor, wt: Tensor) -> tuple[float, int] | None:
    """(‖W_t − W_0‖F² in float64, count of bf16-visible changes), or None when the kernel does not apply
    (not CPU, base not float32, step not float32/bf16, shapes differ, not contiguous, numba missing)."""
    if (w0.device.type != "cpu" or wt.device.type != "cpu" or w0.dtype != torch.float32
            or wt.dtype not in (torch.float32, torch.bfloat16) or w0.shape != wt.shape
            or not w0.is_contiguous() or not wt.is_contiguous() or w0.numel() == 0):
        return None
    kernels = _kernels()
    if kernels is None:
        return None
    stats_f32, stats_bf16 = kernels
    a = w0.reshape(-1).numpy()
    c = np.float32(CHANGE_THRESHOLD)
    if wt.dtype == torch.bfloat16:
        s, k = stats_bf16(a, wt.reshape(-1).view(torch.uint16).numpy(), c)
    else:
        s, k = stats_f32(a, wt.reshape(-1).numpy(), c)
    return float(s), int(k)

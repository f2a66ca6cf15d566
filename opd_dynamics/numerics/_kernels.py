"""numba kernels behind `opd_dynamics.numerics.fused` (imported only there, lazily).

Inputs are float32 arrays or bf16 given as their uint16 bits; `as_f32` decodes either inside the loop,
so a bf16 tensor is never copied to float32. Sums are float64. Reassociation lets the float64 sums
vectorize; NaN/Inf semantics are kept (no nnan/ninf flags).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic, overload

_FM = {"reassoc", "nsz", "contract"}


@intrinsic
def _f32_from_bits(typingctx, x):  # pragma: no cover - compiled; reinterpret a uint32 as a float32
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))
    return types.float32(types.uint32), codegen


def as_f32(v):  # pragma: no cover - replaced by the overload below inside compiled code
    raise NotImplementedError


@overload(as_f32, inline="always")
def _as_f32(v):
    if v == types.uint16:  # bf16 is the top half of a float32: decoding is exact
        return lambda v: _f32_from_bits(np.uint32(v) << np.uint32(16))
    if v == types.float32:
        return lambda v: v
    return None


@njit(cache=True, nogil=True, fastmath=_FM)
def update_stats(w0, wt, c):  # pragma: no cover - compiled
    """(Σ (wt − w0)² in float64, #{|wt − w0| > c·max(|w0|, |wt|)}) over flat arrays.

    The threshold is written as two comparisons (equal in float32: rounding is monotonic), so the loop
    is branch-free."""
    s = 0.0
    k = 0
    for i in range(w0.size):
        a = as_f32(w0[i])
        t = as_f32(wt[i])
        d = abs(t - a)
        s += np.float64(d) * np.float64(d)
        k += (d > c * abs(a)) & (d > c * abs(t))
    return s, k


@njit(cache=True, nogil=True, fastmath=_FM)
def sum_squares(x):  # pragma: no cover - compiled
    s = 0.0
    for i in range(x.size):
        v = np.float64(as_f32(x[i]))
        s += v * v
    return s


@njit(cache=True, nogil=True, fastmath=_FM)
def dot(a, b):  # pragma: no cover - compiled
    s = 0.0
    for i in range(a.size):
        s += np.float64(as_f32(a[i])) * np.float64(as_f32(b[i]))
    return s


@njit(cache=True, nogil=True, fastmath=_FM)
def row_stats(e0, et):  # pragma: no cover - compiled
    """Per row of two (rows, cols) arrays: float64 dot product and both squared norms."""
    n, h = e0.shape
    out = np.empty((3, n))
    for r in range(n):
        dot = 0.0
        n0 = 0.0
        nt = 0.0
        for j in range(h):
            a = np.float64(as_f32(e0[r, j]))
            b = np.float64(as_f32(et[r, j]))
            dot += a * b
            n0 += a * a
            nt += b * b
        out[0, r] = dot
        out[1, r] = n0
        out[2, r] = nt
    return out

"""Geometry of an update against the base weights: how much of it lies in W_0's principal subspaces,
how far W_t's top left subspace turned, how far the spectrum drifted.

The base's decomposition (full spectrum, top 20% singular vectors) is computed once per base tensor;
the engine caches it on disk through ``to_tensors`` / ``from_tensors``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.linalg import blas
from torch import Tensor

from opd_dynamics.analysis.metrics.subspace import principal_angles
from opd_dynamics.numerics import fro2, upcast
from opd_dynamics.numerics.decomposition import decompose
from opd_dynamics.schema import DEFAULT_PCTS


def top_k_for(pct: float, r: int) -> int:
    """k = ceil(pct% * r), at least 1 (exact integer arithmetic for integer percentages)."""
    num = pct * r
    return max(1, -(-int(num) // 100) if float(num).is_integer() else math.ceil(num / 100))


@dataclass
class BaseDecomposition:
    """Decomposition of W_0 (out, in): full spectrum and the top k_max singular vectors, float64."""

    singular_values: Tensor  # (r,) descending
    U: Tensor  # (m, k_max)
    V: Tensor  # (n, k_max)
    pcts: tuple[int, ...]
    shape: tuple[int, int]
    method: str

    @property
    def r(self) -> int:
        return min(self.shape)

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.singular_values).all()) and self.U.shape[1] > 0

    def to_tensors(self) -> dict[str, Tensor]:
        """Flat dict of tensors for safetensors (the method label is stored as UTF-8 bytes)."""
        return {"singular_values": self.singular_values, "U": self.U, "V": self.V,
                "pcts": torch.tensor(self.pcts, dtype=torch.int64),
                "shape": torch.tensor(self.shape, dtype=torch.int64),
                "method": torch.tensor(list(self.method.encode()), dtype=torch.uint8)}

    @classmethod
    def from_tensors(cls, d: dict[str, Tensor]) -> BaseDecomposition:
        """Inverse of to_tensors; raises KeyError/ValueError on a damaged entry."""
        shape = tuple(int(x) for x in d["shape"].tolist())
        dec = cls(d["singular_values"].to(torch.float64), d["U"].to(torch.float64), d["V"].to(torch.float64),
                  tuple(int(x) for x in d["pcts"].tolist()), shape,
                  bytes(d["method"].to(torch.uint8).tolist()).decode())
        if len(shape) != 2 or dec.singular_values.numel() != min(shape) or dec.U.shape[0] != shape[0] \
                or dec.V.shape[0] != shape[1] or dec.U.shape[1] != dec.V.shape[1]:
            raise ValueError(f"inconsistent base decomposition for shape {shape}")
        return dec


def decompose_base(w0: Tensor, pcts=DEFAULT_PCTS) -> BaseDecomposition:
    """Exact float64 decomposition of W_0 (Gram route) keeping the vectors the geometry metrics need."""
    if w0.dim() != 2:
        raise ValueError(f"decompose_base expects a 2-D (out, in) matrix, got shape {tuple(w0.shape)}")
    r = min(w0.shape)
    k_max = max(top_k_for(p, r) for p in (*pcts, 1))
    dec = decompose(w0, k_vectors=k_max, mode="exact")
    m, n = dec.shape
    if dec.U is None:  # zero or non-finite base: no principal directions
        U = torch.zeros(m, 0, dtype=torch.float64, device=w0.device)
        V = torch.zeros(n, 0, dtype=torch.float64, device=w0.device)
    else:
        U, V = dec.U, dec.V
    return BaseDecomposition(dec.singular_values, U, V, tuple(int(p) for p in pcts), (m, n), dec.method)


def _principal_block(base: BaseDecomposition, delta: Tensor) -> Tensor:
    """U0^T dW V0 (k_max x k_max) in float64; on the CPU through scipy's BLAS, like the decompositions
    around it (see engine: torch keeps one thread there)."""
    D = upcast(delta.detach().to(base.U.device), torch.float64).contiguous()
    if D.device.type != "cpu":
        return base.U.T @ (D @ base.V)
    DV = blas.dgemm(1.0, D.numpy().T, base.V.numpy().T, trans_a=1, trans_b=1)  # Fortran views: no copies
    return torch.from_numpy(blas.dgemm(1.0, base.U.numpy().T, DV))


def geometry_metrics(base: BaseDecomposition, wt: Tensor, delta: Tensor,
                     delta_fro2: float | None = None) -> dict:
    """geometry.csv columns for one step (definitions in docs/METRICS.md).

    principal_energy_{p}pct = ||U0_k^T dW V0_k||_F^2 / ||dW||_F^2 (NaN for a zero update);
    principal_rotation_deg = mean principal angle between the top ceil(1% r) left subspaces of W_0
    and W_t; spectral_drift = ||s(W_t) - s(W_0)|| / ||s(W_0)||. W_t is decomposed exactly (Gram route).
    ``delta_fro2`` is ||dW||_F^2 when the caller already has it (the engine's decomposition of dW holds it).
    """
    keys = [*[f"principal_energy_{p}pct" for p in base.pcts], "principal_rotation_deg", "spectral_drift"]
    out: dict = dict.fromkeys(keys, math.nan)
    if tuple(wt.shape) != base.shape or tuple(delta.shape) != base.shape:
        raise ValueError(f"geometry_metrics: shapes {tuple(wt.shape)}/{tuple(delta.shape)} do not match the base "
                         f"{base.shape}")
    if not base.finite:
        return out
    dev = base.U.device
    k_max = base.U.shape[1]
    f2 = fro2(delta) if delta_fro2 is None else delta_fro2
    if f2 > 0 and math.isfinite(f2):
        A = _principal_block(base, delta)
        for p in base.pcts:
            k = min(top_k_for(p, base.r), k_max)
            out[f"principal_energy_{p}pct"] = float(A[:k, :k].square().sum()) / f2
    k1 = min(top_k_for(1, base.r), k_max)
    dec_t = decompose(wt.to(dev), k_vectors=k1, mode="exact")
    s0 = base.singular_values.to(dev)  # a zero W_t drifts by 1; a non-finite one gives NaN
    out["spectral_drift"] = float(torch.linalg.vector_norm(dec_t.singular_values - s0) / torch.linalg.vector_norm(s0))
    if dec_t.U is not None and dec_t.rank >= k1 and int((base.singular_values > 0).sum()) >= k1:
        ang = principal_angles(base.U[:, :k1], dec_t.U[:, :k1])
        out["principal_rotation_deg"] = math.degrees(float(ang.mean()))
    return out

"""Alignment of an update's dominant directions at step t with those at a reference step T.

The reference decomposition is computed once by the caller and passed in for every step.
Principal angles use both cosines and sines (atan2), so small angles stay accurate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from opd_dynamics.numerics import dot
from opd_dynamics.numerics.decomposition import Decomposition

ALIGNMENT_KEYS = ("k", "paired_k", "subspace_overlap_u", "subspace_overlap_v", "max_principal_angle_deg",
                  "paired_cosine", "rank1_cosine", "direction_cosine")


def principal_angles(A: Tensor, B: Tensor) -> Tensor:
    """Principal angles (radians, ascending) between span(A) and span(B), both with k orthonormal columns."""
    if A.shape != B.shape:
        raise ValueError(f"principal_angles: bases must have the same shape, got {tuple(A.shape)} and {tuple(B.shape)}")
    cos = torch.linalg.svdvals(A.T @ B).clamp(0.0, 1.0)  # descending
    sin = torch.linalg.svdvals(A - B @ (B.T @ A)).clamp(0.0, 1.0).flip(0)  # ascending
    return torch.atan2(sin, cos)


def _usable(dec: Decomposition) -> bool:
    return dec.U is not None and dec.V is not None and dec.rank > 0 and math.isfinite(dec.fro2)


def alignment_metrics(dec_t: Decomposition, dec_T: Decomposition, delta_t: Tensor | None, delta_T: Tensor | None,
                      k: int = 16, K: int = 20) -> dict:
    """alignment.csv columns of step t against reference T (definitions in docs/METRICS.md).

    k used = min(k, numerical rank at t and at T, vectors held), recorded as `k`; K likewise for
    paired_cosine and rank1_cosine, recorded as `paired_k`.
    Overlaps and angles are NaN when either update has no defined directions (zero, non-finite);
    direction_cosine is NaN when either update is zero, or not given (a sketch holds only the top triplets).
    """
    out: dict = {key: math.nan for key in ALIGNMENT_KEYS}
    out["k"] = out["paired_k"] = 0
    f2t, f2T = dec_t.fro2, dec_T.fro2
    if delta_t is not None and delta_T is not None and delta_t.shape != delta_T.shape:
        raise ValueError(f"alignment_metrics: update shapes differ {tuple(delta_t.shape)} vs {tuple(delta_T.shape)}")
    if delta_t is not None and delta_T is not None and f2t > 0 and f2T > 0:  # False for NaN too
        out["direction_cosine"] = dot(delta_t, delta_T.to(delta_t.device)) / math.sqrt(f2t * f2T)
    if not (_usable(dec_t) and _usable(dec_T)):
        return out
    dev = dec_t.U.device
    Ut, Vt = dec_t.U, dec_t.V
    UT, VT = dec_T.U.to(dev), dec_T.V.to(dev)
    held = min(Ut.shape[1], UT.shape[1])
    rank = min(dec_t.rank, dec_T.rank)
    kk = min(k, rank, held)
    KK = min(K, rank, held)
    Mu = Ut[:, :kk].T @ UT[:, :kk]
    Mv = Vt[:, :kk].T @ VT[:, :kk]
    out["k"], out["paired_k"] = kk, KK
    out["subspace_overlap_u"] = float(Mu.square().sum()) / kk
    out["subspace_overlap_v"] = float(Mv.square().sum()) / kk
    out["max_principal_angle_deg"] = math.degrees(float(principal_angles(Ut[:, :kk], UT[:, :kk]).max()))
    cos = (Ut[:, :KK] * UT[:, :KK]).sum(dim=0).abs()
    out["paired_cosine"] = float(cos.mean())
    out["rank1_cosine"] = float(cos[0])
    return out

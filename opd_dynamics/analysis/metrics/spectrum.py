"""The spectrum.csv columns of one decomposition (`numerics.decomposition.decompose`, the engine the recorder
and the extrapolators use too).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from opd_dynamics.numerics.decomposition import Decomposition
from opd_dynamics.schema import DEFAULT_KS


def _energy_cum(s: np.ndarray, fro2: float) -> np.ndarray:
    return np.minimum(np.cumsum(s * s) / fro2, 1.0)


def spectrum_metrics(dec: Decomposition, ks=DEFAULT_KS) -> dict:
    """spectrum.csv columns for one decomposition (definitions in docs/METRICS.md).

    Energies divide by the exact ||M||_F^2 and are capped at 1; energy_top{k} is 1 when k >= r and NaN
    when k exceeds the values a fast decomposition holds. effective_rank needs the full spectrum (NaN
    otherwise); rank90 is NaN only when a top-q spectrum never reaches 0.9. A zero matrix gives
    spectral_norm 0, ranks 0 and NaN ratios/energies; a non-finite one gives NaN everywhere.
    """
    nan = math.nan
    keys = ["spectral_norm", "spectral_ratio", "stable_rank", "effective_rank", "top1pct_norm_ratio",
            *[f"energy_top{k}" for k in ks], "rank90"]
    out: dict = dict.fromkeys(keys, nan)
    out["svd_method"] = dec.method
    fro2, r = dec.fro2, dec.r
    if not math.isfinite(fro2):
        return out
    if fro2 == 0.0:
        out.update(spectral_norm=0.0, stable_rank=0.0, effective_rank=0.0, rank90=0)
        return out
    s = dec.singular_values.detach().to("cpu", torch.float64).numpy()
    s1 = float(s[0])
    out["spectral_norm"] = s1
    out["spectral_ratio"] = s1 / math.sqrt(fro2)
    out["stable_rank"] = fro2 / (s1 * s1)
    if dec.full:
        p = s[s > 0] / s.sum()
        out["effective_rank"] = float(math.exp(-np.sum(p * np.log(p))))
    cum = _energy_cum(s, fro2)
    k1 = -(-r // 100)
    if k1 <= s.size:
        out["top1pct_norm_ratio"] = math.sqrt(float(cum[k1 - 1]))
    for k in ks:
        if k >= r:
            out[f"energy_top{k}"] = 1.0
        elif k <= s.size:
            out[f"energy_top{k}"] = float(cum[k - 1])
    hit = np.nonzero(cum >= 0.9 * (1 - 1e-12))[0]
    if hit.size:
        out["rank90"] = int(hit[0]) + 1
    elif dec.full:  # rounding kept the total just under 0.9 of fro2: all r values are needed
        out["rank90"] = r
    return out


def top_singular_values(dec: Decomposition, n: int = 64) -> Tensor:
    """The n largest singular values (fewer if the decomposition holds fewer), float64 on CPU."""
    return dec.singular_values[:n].detach().to("cpu", torch.float64)

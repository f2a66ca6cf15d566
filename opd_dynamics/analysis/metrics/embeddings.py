"""Per-row cosine similarity between base and trained embedding (or lm_head) rows.

Rows are compared over the common rows (resized vocabularies are flagged), in float64: one fused pass
on CPU (tables as stored, float32 or bf16), else in row blocks so a 150k x 3584 table never gets a whole
float64 copy.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from opd_dynamics.errors import InputError
from opd_dynamics.numerics.fused import fused_row_stats

BLOCK_ROWS = 8192


def _row_stats(e0: Tensor, et: Tensor) -> np.ndarray:
    """(3, rows) float64: per-row dot product and both squared norms (fused CPU kernel, else torch blocks)."""
    fused = fused_row_stats(e0, et)
    if fused is not None:
        return fused
    out = np.empty((3, e0.shape[0]), dtype=np.float64)
    for i in range(0, e0.shape[0], BLOCK_ROWS):
        a = e0[i : i + BLOCK_ROWS].to(torch.float64)
        b = et[i : i + BLOCK_ROWS].to(a.device, torch.float64)
        out[:, i : i + a.shape[0]] = torch.stack([(a * b).sum(1), (a * a).sum(1), (b * b).sum(1)]).cpu().numpy()
    return out


def row_cosines(e0: Tensor, et: Tensor) -> np.ndarray:
    """Cosine of each row pair (float64). Both rows zero: 1 (unchanged); one zero: 0; non-finite: NaN."""
    dot, n0, nt = _row_stats(e0, et)
    denom = np.sqrt(n0) * np.sqrt(nt)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), np.where((n0 == 0) & (nt == 0), 1.0, 0.0))
    cos = np.where(np.isfinite(denom), cos, np.nan)
    return np.clip(cos, -1.0, 1.0)


def embedding_metrics(e0: Tensor, et: Tensor, token_ids=None) -> dict:
    """embedding.csv columns: n_rows, resized, cosine_mean, cosine_p5, cosine_min, cosine_tokens_mean.

    token_ids: optional token ids whose mean cosine is reported (NaN when not given). Ids beyond the
    common rows of a resized table are left out; an id outside both tables is an InputError.
    Non-finite rows make the statistics NaN (never raise).
    """
    if e0.dim() != 2 or et.dim() != 2 or e0.shape[1] != et.shape[1]:
        raise ValueError(f"embedding_metrics: need two (vocab, hidden) tables with the same hidden size, "
                         f"got {tuple(e0.shape)} and {tuple(et.shape)}")
    n = min(e0.shape[0], et.shape[0])
    cos = row_cosines(e0[:n], et[:n])
    out = {"n_rows": n, "resized": e0.shape[0] != et.shape[0],
           "cosine_mean": float(cos.mean()) if n else math.nan,
           "cosine_p5": float(np.percentile(cos, 5)) if n else math.nan,
           "cosine_min": float(cos.min()) if n else math.nan,
           "cosine_tokens_mean": math.nan}
    if token_ids is not None:
        ids = np.asarray(list(token_ids), dtype=np.int64)
        vocab = max(e0.shape[0], et.shape[0])
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise InputError(None, f"token ids must lie in [0, {vocab}) for this embedding table; "
                                   f"got ids from {ids.min()} to {ids.max()}")
        ids = ids[ids < n]
        if ids.size:
            out["cosine_tokens_mean"] = float(cos[ids].mean())
    return out

"""Per-row cosine similarity between base and trained embedding (or lm_head) rows.

Rows are compared over the common rows (resized vocabularies are flagged), in float64, in row blocks
so a 150k x 3584 table never gets a whole float64 copy.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError

_BLOCK_ROWS = 8192


def row_cosines(e0: Tensor, et: Tensor) -> np.ndarray:
    """Cosine of each row pair (float64). Both rows zero: 1 (unchanged); one zero: 0."""
    n = e0.shape[0]
    out = np.empty(n, dtype=np.float64)
    for i in range(0, n, _BLOCK_ROWS):
        a = e0[i : i + _BLOCK_ROWS].to(torch.float64)
        b = et[i : i + _BLOCK_ROWS].to(a.device, torch.float64)
        na, nb = torch.linalg.vector_norm(a, dim=1), torch.linalg.vector_norm(b, dim=1)
        dot = (a * b).sum(dim=1)
        denom = na * nb
        cos = torch.where(denom > 0, dot / torch.where(denom > 0, denom, torch.ones_like(denom)),
                          torch.where((na == 0) & (nb == 0), 1.0, 0.0).to(dot.dtype))
        cos = torch.where(torch.isfinite(denom), cos, torch.full_like(cos, math.nan))
        out[i : i + a.shape[0]] = cos.clamp(-1.0, 1.0).cpu().numpy()
    return out


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

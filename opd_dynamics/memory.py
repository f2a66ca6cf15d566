"""Large CPU tensors in memory the kernel backs with transparent huge pages.

torch's CPU allocator maps every block above glibc's mmap threshold (at most 32 MB) afresh and returns it
on free, so each float64 copy of a 4864x896 update (35 MB) pays about 8,500 page faults: 16-19 ms on the
project's 2-core machine, against 5-6 ms when the memory comes from numpy, which asks for huge pages
(madvise) on Linux. The values are the same; only where the memory comes from changes. Small tensors,
CUDA tensors and tensors that need grad go through torch as usual.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

#: from here up (2 MiB, one huge page) numpy's memory is faster to fill than torch's
HUGE_BYTES = 1 << 21
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


def _huge(t: Tensor, dtype: torch.dtype) -> bool:
    return (t.device.type == "cpu" and dtype in _NUMPY and not t.requires_grad
            and t.numel() * dtype.itemsize >= HUGE_BYTES)


def _numpy_empty(t: Tensor, dtype: torch.dtype) -> Tensor:
    """An uninitialised contiguous CPU tensor of t's shape in ``dtype``, in numpy's memory."""
    return torch.from_numpy(np.empty(tuple(t.shape), dtype=_NUMPY[dtype]))


def upcast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """The values of ``t.to(dtype)``; ``t`` itself when it already has that dtype."""
    if t.dtype == dtype:
        return t
    return _numpy_empty(t, dtype).copy_(t) if _huge(t, dtype) else t.to(dtype)


def subtract(a: Tensor, b: Tensor) -> Tensor:
    """a - b (same shape and dtype) into a fresh tensor."""
    return torch.sub(a, b, out=_numpy_empty(a, a.dtype)) if _huge(a, a.dtype) else a - b

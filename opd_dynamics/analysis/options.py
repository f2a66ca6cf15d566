"""What an analysis computes (`AnalysisOptions`, part of the resume-cache key) and the choices its fields take."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from opd_dynamics.errors import InputError
from opd_dynamics.io.naming import MATRIX_GROUPS

SVD_MODES = ("exact", "fast", "none")
EXECUTORS = ("serial", "process", "ray")


@dataclass(frozen=True)
class AnalysisOptions:
    """Everything that changes what a pass computes (part of the resume-cache key)."""

    svd: str = "exact"  # exact | fast (randomized top-k, labelled) | none (norms only)
    ks: tuple[int, ...] = (1, 4, 16, 64)
    k_subspace: int = 16
    k_paired: int = 20
    ref_step: int | None = None  # alignment reference; None = last step
    alignment: bool = True
    geometry: bool = False  # geometry.csv; exact in every svd mode (needs W_t's whole spectrum)
    dtype: str = "float32"  # float32 | float64: precision of W_t − W_0
    device: str = "cpu"  # cpu | cuda | auto
    n_singular_values: int = 64
    spectra_groups: tuple[str, ...] = MATRIX_GROUPS
    token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.svd not in SVD_MODES:
            raise InputError(None, f"--svd must be one of {SVD_MODES}, not {self.svd!r}")
        if self.dtype not in ("float32", "float64"):
            raise InputError(None, f"--dtype must be float32 or float64 (never a 16-bit type), not {self.dtype!r}")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise InputError(None, f"--device must be cpu, cuda or auto, not {self.device!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            vis = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise InputError(None, "--device cuda was asked for but torch sees no CUDA device"
                                   + (f" (CUDA_VISIBLE_DEVICES={vis!r})" if vis is not None else ""))
        return self.device



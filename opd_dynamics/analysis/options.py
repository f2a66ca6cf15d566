"""What an analysis computes (`AnalysisOptions`, part of the resume-cache key) and the choices its fields take."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, replace

import torch

from opd_dynamics.errors import InputError
from opd_dynamics.fields import option
from opd_dynamics.io.naming import MATRIX_GROUPS
from opd_dynamics.numerics import LOCKIN_MARGIN, LOCKIN_THRESHOLD
from opd_dynamics.schema import DEFAULT_KS

#: --svd: exact float64 spectra; randomized top-k (labelled per row); norms only
SVD_MODES = ("exact", "fast", "none")
#: --dtype: the precision ΔW is formed in (never a 16-bit type)
DTYPES = ("float32", "float64")
#: --device (or cuda:N)
DEVICES = ("cpu", "cuda", "auto")
#: --executor
EXECUTORS = ("serial", "process", "ray")



@dataclass(frozen=True)
class AnalysisOptions:
    """Everything that changes what a pass computes (the resume-cache key). Each field is one CLI flag of
    `analyze` (generated: see `opd_dynamics.cli.kit.dataclass_options`)."""

    svd: str = option("exact", "exact: full float64 spectra; fast: randomized top-k (labelled); none: no spectra "
                      "(norms, and the trajectory unless --no-trajectory).", choices=SVD_MODES)
    geometry: bool = option(False, "Also measure the update against the base's own singular vectors. Exact in every "
                          "--svd mode (it needs W_t's whole spectrum), so it costs about as much as the exact "
                          "spectra and most of a fast run.", flag="--geometry")
    alignment: bool = option(True, "Alignment to the reference step (--no-alignment skips it).")
    ref_step: int | None = option(None, "Alignment reference step (default: last).")
    dtype: str = option("float32", "Precision of W_t − W_0 (float64 weights always stay float64).", choices=DTYPES)
    device: str = option("cpu", "cpu, cuda (or cuda:N) or auto. With --executor ray, resolved on the cluster: each "
                       "CUDA task asks Ray for one GPU.")
    ks: tuple[int, ...] = option(DEFAULT_KS, "The k of the energy_top{k} columns.", cli="ints", metavar="K,K,...")
    k_subspace: int = option(16, "k of the subspace overlaps and principal angles.", min=1)
    k_paired: int = option(20, "K of paired_cosine (the paper's Fig. 4b measure).", min=1)
    n_singular_values: int = option(64, "Singular values per matrix in singular_values.csv.", min=1)
    trajectory: bool = option(True, "Trajectory metrics (trajectory.csv, segments.csv): segment cosines, the linear "
                              "fit in time, rank-1…5 shares, lock-in. They read every step once more, a row "
                              "block at a time (--no-trajectory skips them).")
    lockin_threshold: float = option(LOCKIN_THRESHOLD, "Lock-in: the first step whose direction_cosine to the final "
                                     "update is at least this …")
    lockin_margin: float = option(LOCKIN_MARGIN, "… and exceeds the random-walk null √(t/T) by at least this.")
    spectra_groups: tuple[str, ...] = option(MATRIX_GROUPS, "Groups whose matrices get spectra and alignment.",
                                           cli="groups", metavar="GROUP,...")
    token_ids: tuple[int, ...] | None = option(None, "File of token ids (whitespace or comma separated) for the "
                                             "embedding cosine over a token set.", cli="token_file", metavar="FILE")
    force_base: bool = option(False, "Analyse even when a step's config.json declares another architecture than the "
                              "base's (model_type, hidden size, layers, vocabulary …).")

    def __post_init__(self) -> None:
        if self.svd not in SVD_MODES:
            raise InputError(None, f"svd must be one of {SVD_MODES}, not {self.svd!r}", ("svd",))
        if self.dtype not in DTYPES:
            raise InputError(None, f"dtype must be float32 or float64 (never a 16-bit type), not {self.dtype!r}",
                             ("dtype",))
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise InputError(None, f"device must be cpu, cuda or auto, not {self.device!r}", ("device",))

    def spectra_groups_include(self, group: str) -> bool:
        """Whether a matrix of this naming group gets spectra, alignment and trajectory (None: every group)."""
        return self.spectra_groups is None or group in self.spectra_groups

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            vis = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise InputError(None, "device cuda was asked for but torch sees no CUDA device"
                                   + (f" (CUDA_VISIBLE_DEVICES={vis!r})" if vis is not None else ""), ("device",))
        return self.device


@dataclass(frozen=True)
class ExecutionOptions:
    """How a pass runs; none of it changes a result (so none of it is in the resume-cache key)."""

    executor: str | None = option(None, "Default: process with --workers > 1, ray with --ray-address, else serial.",
                                choices=EXECUTORS)
    workers: int = option(1, "Tensors analysed at once (process or Ray executor).", min=1)
    ray_address: str | None = option(None, "Ray cluster address (default: start a local instance).")
    cache_dir: str | None = option(None, "Where base decompositions are cached (default: $OPD_DYNAMICS_CACHE or "
                                 "~/.cache/opd-dynamics).")
    progress: bool = option(True, "A progress bar (--quiet: none).", flag="--progress/--quiet")
    keep_going: bool = option(False, "When a tensor cannot be read at some step (a truncated file, a shard that "
                              "does not fit), finish and exit 0 with it listed under failed in run.json. Without "
                              "it the analysis still writes everything it could read, then exits with an error "
                              "naming the tensor and steps.", flag="--keep-going")


def resolve_options(options: AnalysisOptions | None, execution: ExecutionOptions | None,
                    fields: dict) -> tuple[AnalysisOptions, ExecutionOptions]:
    """Both option sets, with ``fields`` (keyword arguments naming fields of either) replacing theirs."""
    own = {f.name for f in dataclasses.fields(ExecutionOptions)}
    run = {k: v for k, v in fields.items() if k in own}
    what = {k: v for k, v in fields.items() if k not in own}
    return (replace(options or AnalysisOptions(), **what), replace(execution or ExecutionOptions(), **run))

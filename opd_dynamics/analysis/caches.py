"""Results kept on disk between runs: the per-tensor resume cache of an output, and the base decompositions
that geometry reuses across runs and series from one base (under `default_cache_root()`)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from opd_dynamics._version import __version__
from opd_dynamics.analysis.deltas import SeriesReader, TensorPlan
from opd_dynamics.analysis.metrics.geometry import BaseDecomposition, decompose_base
from opd_dynamics.io.writer import atomic_file, atomic_write_text


def default_cache_root() -> Path:
    return Path(os.environ.get("OPD_DYNAMICS_CACHE", Path.home() / ".cache" / "opd-dynamics"))


def _sha(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:24]



def base_decomposition(reader: SeriesReader, tp: TensorPlan, w0: torch.Tensor, cache_root: Path | None,
                        unit: int | None = None) -> BaseDecomposition:
    """The base's decomposition for geometry, from the disk cache when an earlier run made it."""
    if cache_root is None:
        return decompose_base(w0)

    key = _sha(tp.name, tp.shape, unit, w0.dtype, __version__)  # a new version may decompose differently
    path = cache_root / "base" / reader.base.identity / f"{key}.safetensors"
    if path.exists():
        try:
            return BaseDecomposition.from_tensors({k: v.to(w0.device) for k, v in load_file(str(path)).items()})
        except Exception:  # a damaged cache entry is recomputed, never trusted
            path.unlink(missing_ok=True)
    dec = decompose_base(w0)
    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in dec.to_tensors().items()}, str(tmp))
    return dec



class ResultCache:
    """Per-tensor results on disk, keyed by the inputs' identity and the options."""

    def __init__(self, root: Path | None):
        self.root = root

    def key(self, run: str, plan: TensorPlan, inputs: str | None, opts) -> str:
        """Everything a tensor's rows depend on: the package version, the run name, the tensor as planned (its
        parsed name under any naming overrides, orientation, shape, steps), the inputs and the options."""
        return _sha(__version__, run, repr(plan), inputs, json.dumps(asdict(opts), sort_keys=True))

    def get(self, key: str) -> dict | None:
        if self.root is None:
            return None
        p = self.root / f"{key}.json"
        if not p.exists():
            return None
        try:
            got = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a damaged entry is recomputed, never trusted
        return got if isinstance(got, dict) else None

    def put(self, key: str, tables: dict) -> None:
        if self.root is None:
            return
        atomic_write_text(self.root / f"{key}.json", json.dumps(tables))



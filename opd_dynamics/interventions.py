"""Marginal-utility interventions: weights = base + transform(ΔW), ΔW = W_t − W_0.

Every function reads the two models tensor by tensor (paths or open readers), forms ΔW in the update
precision (`numerics.update_dtype`: float32, float64 for float64 weights; never bf16/fp16), applies its
transform, adds it back to the base in that precision and casts to the stored dtype. Identity and zero
transforms return the checkpoint / base tensor itself, so α = 1 is the
checkpoint bit-exactly and α = 0 the base. Results come back as a state dict, or are written with
``write_model`` when ``write=out_dir`` is given (for external evaluation harnesses).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Union

import torch

from opd_dynamics.errors import InputError
from opd_dynamics.io.formats import open_model
from opd_dynamics.io.naming import MATRIX_GROUPS, TensorName, is_selected, parse_name
from opd_dynamics.numerics import fro2, update_dtype

__all__ = ["scale", "layer_window", "module_mask", "rank_truncate", "module_rescale", "embedding_swap",
           "transform_stream", "truncate_matrix", "update_norm", "BASE", "CKPT"]

ModelLike = Union[str, Path, Any]
StateDict = dict[str, torch.Tensor]
BASE, CKPT = "base", "ckpt"
# fn(name, parsed, delta) -> BASE | CKPT | a new delta (delta in the update precision)
Transform = Callable[[str, TensorName, torch.Tensor], Union[str, torch.Tensor]]


def _open(stack: ExitStack, m: ModelLike):
    if hasattr(m, "get") and hasattr(m, "names"):
        return m
    return stack.enter_context(open_model(m))


def _check_pair(base, ckpt, name: str) -> None:
    try:
        shape = tuple(base.shape(name))  # one lookup, no list of the base's names per tensor
    except KeyError:
        raise InputError(getattr(base, "path", None), f"has no tensor {name!r}, which the checkpoint has") from None
    if shape != tuple(ckpt.shape(name)):
        raise InputError(getattr(ckpt, "path", None), f"tensor {name!r} has shape {tuple(ckpt.shape(name))} "
                                                      f"but the base has {shape}")


def _delta(wt: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """W_t − W_0 in the update precision (`numerics.update_dtype`: float64 weights stay float64)."""
    work = update_dtype(wt)
    return wt.to(work) - w0.to(work)


def transform_stream(base: ModelLike, ckpt: ModelLike, fn: Transform) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, base + fn(ΔW)) for every checkpoint tensor, one tensor in memory at a time.

    Non-float tensors are passed through from the checkpoint.
    """
    with ExitStack() as stack:
        b, c = _open(stack, base), _open(stack, ckpt)
        for name in c.names():
            _check_pair(b, c, name)
            t = c.get(name)
            if not t.is_floating_point():
                yield name, t
                continue
            w0 = b.get(name)
            work = update_dtype(t)
            delta = _delta(t, w0)
            out = fn(name, parse_name(name), delta)
            if isinstance(out, str):
                yield name, (t if out == CKPT else w0)
            else:
                yield name, (w0.to(work) + out.to(work)).to(t.dtype)


def _finish(stream: Iterable[tuple[str, torch.Tensor]], write: str | Path | None, copy_from: ModelLike,
            overwrite: bool, metadata: dict[str, str] | None) -> StateDict | Path:
    if write is None:
        return dict(stream)
    from opd_dynamics.io.writer import write_model

    src = copy_from if isinstance(copy_from, (str, Path)) else getattr(copy_from, "path", None)
    write_model(stream, write, metadata=metadata, copy_files_from=src, overwrite=overwrite)
    return Path(write)


def _run(base, ckpt, fn, write, overwrite, what: str) -> StateDict | Path:
    return _finish(transform_stream(base, ckpt, fn), write, ckpt, overwrite, {"intervention": what})


def scale(base: ModelLike, ckpt: ModelLike, alpha: float, *, write: str | Path | None = None,
          overwrite: bool = False) -> StateDict | Path:
    """base + α·ΔW for every tensor (α = 0 → base exactly, α = 1 → checkpoint exactly)."""
    a = float(alpha)

    def fn(_n, _p, d):
        return BASE if a == 0.0 else CKPT if a == 1.0 else d * a

    return _run(base, ckpt, fn, write, overwrite, f"scale alpha={a}")


def layer_window(base: ModelLike, ckpt: ModelLike, center: int, half_width: int = 8,
                 groups: Sequence[str] = ("mlp",), *, write: str | Path | None = None,
                 overwrite: bool = False) -> StateDict | Path:
    """Only layers center−half_width … center+half_width of ``groups`` take the update; the rest stay at base."""
    lo, hi, gs = center - half_width, center + half_width, set(groups)

    def fn(_n, p, _d):
        return CKPT if p.layer is not None and lo <= p.layer <= hi and p.group in gs else BASE

    return _run(base, ckpt, fn, write, overwrite, f"layer_window center={center} hw={half_width} {sorted(gs)}")


def module_mask(base: ModelLike, ckpt: ModelLike, groups: Sequence[str] | None = MATRIX_GROUPS,
                modules: Sequence[str] | None = None, *, write: str | Path | None = None,
                overwrite: bool = False) -> StateDict | Path:
    """Only tensors whose group is in ``groups`` and module in ``modules`` (None = any) take the update."""
    gs = None if groups is None else set(groups)
    ms = None if modules is None else set(modules)

    def fn(_n, p, _d):
        ok = (gs is None or p.group in gs) and (ms is None or p.module in ms)
        return CKPT if ok else BASE

    return _run(base, ckpt, fn, write, overwrite, f"module_mask groups={groups} modules={modules}")


SVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def truncate_matrix(delta: torch.Tensor, pct: float, side: str = "top", rescale_to_norm: bool = False,
                    svd: SVD | None = None) -> torch.Tensor:
    """Top or bottom k = ceil(pct·r) singular components of one matrix (float64 SVD), r = min(shape).

    ``svd`` is the matrix's float64 (U, S, Vh) when the caller already has it."""
    if side not in ("top", "bottom"):
        raise InputError(None, f"rank side must be 'top' or 'bottom', not {side!r}")
    if not 0 < pct <= 1:
        raise InputError(None, f"rank fraction must be in (0, 1], not {pct}")
    d = delta.double()
    u, s, vh = svd if svd is not None else torch.linalg.svd(d, full_matrices=False)
    r = s.numel()
    k = min(r, math.ceil(pct * r - 1e-9))
    sl = slice(0, k) if side == "top" else slice(r - k, r)
    out = (u[:, sl] * s[sl]) @ vh[sl]
    if rescale_to_norm:
        n_out = torch.linalg.vector_norm(out)
        if n_out > 0:
            out = out * (torch.linalg.vector_norm(d) / n_out)
    return out.to(update_dtype(delta))


def rank_truncate(base: ModelLike, ckpt: ModelLike, pct: float, side: str = "top",
                  rescale_to_norm: bool = False, *, others: str = CKPT, svd_cache: dict[str, SVD] | None = None,
                  write: str | Path | None = None, overwrite: bool = False) -> StateDict | Path:
    """Per attention/MLP matrix keep the top or bottom ⌈pct·r⌉ singular components of ΔW.

    ``rescale_to_norm`` rescales each truncated ΔW to the full ‖ΔW‖F. Tensors that are not attention/MLP
    matrices (norms, embeddings) take ``others``: the full update (CKPT, default) or none (BASE). Pass the
    same ``svd_cache`` dict to every call on one (base, ckpt) pair so each ΔW is decomposed once.
    """
    pct = float(pct)

    def fn(n, p, d):
        if not is_selected(n, d.shape):  # attention and MLP matrices
            return others
        if svd_cache is not None and n not in svd_cache:
            svd_cache[n] = torch.linalg.svd(d.double(), full_matrices=False)
        return truncate_matrix(d, pct, side, rescale_to_norm, None if svd_cache is None else svd_cache[n])

    return _run(base, ckpt, fn, write, overwrite, f"rank_truncate {side} {pct} rescaled={rescale_to_norm}")


def module_rescale(base: ModelLike, mid: ModelLike, final: ModelLike, beta: float = 1.0, *,
                   write: str | Path | None = None, overwrite: bool = False) -> StateDict | Path:
    """Per tensor: ΔW_mid scaled to β·‖ΔW_final‖F (norms in float64); a zero ΔW_mid stays zero."""
    with ExitStack() as stack:
        b, f = _open(stack, base), _open(stack, final)
        target: dict[str, float] = {}
        for name in f.names():
            _check_pair(b, f, name)
            w = f.get(name)
            if w.is_floating_point():
                target[name] = math.sqrt(fro2(_delta(w, b.get(name))))

        def fn(n, _p, d):
            if n not in target:
                raise InputError(getattr(f, "path", None), f"has no tensor {n!r}, which the mid checkpoint has")
            nm = float(torch.linalg.vector_norm(d.double()))
            return BASE if nm == 0.0 else (d.double() * (beta * target[n] / nm)).to(d.dtype)

        return _finish(transform_stream(b, mid, fn), write, mid, overwrite,
                       {"intervention": f"module_rescale beta={beta}"})


def embedding_swap(base: ModelLike, ckpt: ModelLike, *, write: str | Path | None = None,
                   overwrite: bool = False) -> StateDict | Path:
    """The checkpoint with its embeddings and lm_head put back to base."""

    def fn(_n, p, _d):
        return BASE if p.group in ("embedding", "lm_head") else CKPT

    return _run(base, ckpt, fn, write, overwrite, "embedding_swap")


def update_norm(base: ModelLike, ckpt: ModelLike) -> float:
    """‖ΔW‖F over all float tensors (square root of the float64 sum of squares)."""
    total = 0.0
    with ExitStack() as stack:
        b, c = _open(stack, base), _open(stack, ckpt)
        for name in c.names():
            t = c.get(name)
            if t.is_floating_point():
                _check_pair(b, c, name)
                total += fro2(_delta(t, b.get(name)))
    return math.sqrt(total)

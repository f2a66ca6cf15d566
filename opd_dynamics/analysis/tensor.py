"""All metrics of one stored tensor over a whole series: W_0 read once; the reference step's update (default
the last step) read and decomposed once; then every step's W_t read once and every metric of that step computed
from the one decomposition of its ΔW_t."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from opd_dynamics.analysis.caches import base_decomposition
from opd_dynamics.analysis.deltas import (
    SeriesReader,
    StepUpdate,
    TensorPlan,
    failure_reason,
    iter_delta_blocks,
    iter_updates,
    read_base,
    read_step,
)
from opd_dynamics.analysis.metrics.embeddings import embedding_metrics
from opd_dynamics.analysis.metrics.geometry import geometry_metrics
from opd_dynamics.analysis.metrics.norms import norm_metrics
from opd_dynamics.analysis.metrics.spectrum import spectrum_metrics, top_singular_values
from opd_dynamics.analysis.metrics.subspace import alignment_metrics
from opd_dynamics.analysis.metrics.trajectory import TrajectoryAccumulator
from opd_dynamics.analysis.options import AnalysisOptions
from opd_dynamics.analysis.report import PER_TENSOR_TABLES
from opd_dynamics.io.model_dir import DTYPES
from opd_dynamics.io.series import CheckpointSeries
from opd_dynamics.numerics import fro2, update_dtype
from opd_dynamics.numerics.decomposition import decompose


def _ident(series: CheckpointSeries, tp: TensorPlan) -> dict:  # identifying columns of every row
    i = tp.info
    return {"run": series.name, "tensor": tp.name, "layer": i.layer, "group": i.group, "module": i.module,
            "expert": i.expert}



def _steps_with_ref(reader: SeriesReader, tp: TensorPlan, w0: torch.Tensor, ref: StepUpdate | None,
                    materialize: bool, failed: dict[int, str] | None = None) -> Iterator[StepUpdate]:
    """Every step's update in order, reusing the already-read reference step instead of reading it twice; with
    ``failed``, the steps that cannot be read are recorded there and left out (see `iter_updates`), and the steps
    already in it are not read again."""
    others = [s for s in tp.steps if (ref is None or s != ref.step) and s not in (failed or {})]
    pending = ref
    for upd in iter_updates(reader, tp, w0, others, materialize=materialize, failed=failed):
        if pending is not None and tp.steps.index(pending.step) < tp.steps.index(upd.step):
            yield pending
            pending = None
        yield upd
    if pending is not None:
        yield pending


def _units(tp: TensorPlan) -> list[int | None]:
    """The matrices inside one stored tensor: itself, or one per expert for stacked experts ((E, out, in)
    as analysed: see naming.stored_transposed)."""
    if len(tp.shape) == 3 and tp.info.group == "mlp" and "experts" in tp.name:
        return list(range(tp.shape[0]))
    return [None]


def analyze_tensor(reader: SeriesReader, tp: TensorPlan, opts: AnalysisOptions,
                   cache_root: Path | None = None, failed: dict[int, str] | None = None) -> dict[str, list[dict]]:
    """All rows of every table for one stored tensor over the whole series. With ``failed``, a step whose weights
    cannot be read is recorded there (step → reason) and the tensor's other steps are still analysed (the
    trajectory over the steps read; no alignment when the reference step is the one that failed); without it,
    the read's exception is raised."""
    series = reader.series
    device = opts.resolved_device()
    out: dict[str, list[dict]] = {t: [] for t in PER_TENSOR_TABLES}
    group = tp.info.group
    units = _units(tp)
    mshape = tp.shape[1:] if units != [None] else tp.shape
    spectral = len(mshape) == 2 and min(mshape) > 1 and opts.spectra_groups_include(group)  # a matrix of the groups
    matrix = spectral and opts.svd != "none"
    # the norm columns and embedding cosines run on the base and steps as stored; only spectra need floats
    # ΔW in the asked precision, never below the stored one (float64 checkpoints stay float64)
    work = update_dtype(DTYPES[tp.stored_dtype], opts.torch_dtype)
    w0 = read_base(reader, tp, work if matrix else None, device)
    k_vec = max(opts.k_subspace, opts.k_paired)
    part = (lambda t, u: t if u is None else t[u])  # noqa: E731
    ref_update, dec_ref = None, {}
    if matrix and opts.alignment:
        ref_step = opts.ref_step if opts.ref_step in tp.steps else tp.steps[-1]
        try:
            ref_update = read_step(reader, tp, ref_step, w0)
        except Exception as e:
            if failed is None:
                raise
            failed[ref_step] = (failure_reason(e) + f" (step {ref_step} is the alignment reference: the tensor has "
                                                    "no alignment rows)")
        if ref_update is not None:
            dec_ref = {u: decompose(part(ref_update.delta, u), k_vectors=k_vec, mode=opts.svd) for u in units}
    base_dec = ({u: base_decomposition(reader, tp, part(w0, u), cache_root, u) for u in units}
                if (matrix and opts.geometry) else {})
    shape_s = "x".join(map(str, mshape))
    numel = tp.numel // len(units)
    base_f2 = {u: fro2(part(w0, u)) for u in units}
    for upd in _steps_with_ref(reader, tp, w0, ref_update, materialize=matrix, failed=failed):
        for u in units:
            ident = {**_ident(series, tp), "step": upd.step}
            if u is not None:
                ident["expert"] = u
            w0u = part(w0, u)
            lora = None if upd.lora_delta is None else part(upd.lora_delta, u)
            out["module_allocation"].append({**ident, "shape": shape_s, "numel": numel,
                                             **norm_metrics(w0u, part(upd.raw, u), lora, base_f2[u]),
                                             "resized": tp.resized})
            if group == "embedding" and len(mshape) == 2:
                wt_raw = part(upd.raw, u)
                ids = None if opts.token_ids is None else \
                    [i for i in opts.token_ids if i < max(w0u.shape[0], wt_raw.shape[0])]  # positional tables: fewer
                out["embedding"].append({**ident, **embedding_metrics(w0u, wt_raw, ids),
                                         "resized": tp.resized})
            if not matrix:
                continue
            wtu, du = part(upd.weight, u), part(upd.delta, u)
            is_ref = ref_update is not None and upd.step == ref_update.step
            dec = dec_ref[u] if is_ref else decompose(du, k_vectors=k_vec, mode=opts.svd)
            out["spectrum"].append({**ident, **spectrum_metrics(dec, opts.ks)})
            fro = dec.fro2 ** 0.5 if dec.fro2 > 0 else float("nan")
            for i, s in enumerate(top_singular_values(dec, opts.n_singular_values).tolist(), start=1):
                out["singular_values"].append({**ident, "index": i, "sigma": s, "sigma_normalized": s / fro})
            if ref_update is not None:
                out["alignment"].append({**ident, "ref_step": ref_update.step,
                                         **alignment_metrics(dec, dec_ref[u], du, part(ref_update.delta, u),
                                                             k=opts.k_subspace, K=opts.k_paired)})
            if base_dec:
                out["geometry"].append({**ident, **geometry_metrics(base_dec[u], wtu, du, dec.fro2)})
    read = tuple(s for s in tp.steps if s not in (failed or {}))
    if opts.trajectory and spectral and len(read) >= 2:  # norm-based: in every svd mode
        _trajectory_rows(reader, replace(tp, steps=read), units, opts, out)  # over the steps that could be read
    return out


def _trajectory_rows(reader: SeriesReader, tp: TensorPlan, units: list[int | None], opts: AnalysisOptions,
                     out: dict[str, list[dict]]) -> None:
    """trajectory.csv (one row per matrix) and segments.csv (one per matrix and step), from the updates read
    again a row block at a time (see deltas.iter_delta_blocks)."""
    def finish(u: int | None, acc: TrajectoryAccumulator) -> None:
        ident = {**_ident(reader.series, tp), **({} if u is None else {"expert": u})}
        summary, rows = acc.result(opts.lockin_threshold, opts.lockin_margin)
        out["trajectory"].append({**ident, "step": tp.steps[-1], **summary})
        out["segments"].extend({**ident, **r} for r in rows)

    unit, acc = None, None  # the units come one after another: one accumulator alive at a time
    for u, block in iter_delta_blocks(reader, tp, units):
        if acc is None or u != unit:
            if acc is not None:
                finish(unit, acc)
            unit, acc = u, TrajectoryAccumulator(tp.steps)
        acc.add(block.numpy())
    if acc is not None:
        finish(unit, acc)



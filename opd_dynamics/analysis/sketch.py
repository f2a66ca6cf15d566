"""The analysis of a sketch series (what `record.DynamicsRecorder` wrote during training): the same tables as a
checkpoint series, for what the stored top-k triplets and exact norms determine.

Exact from a sketch: every column of module_allocation (over every trainable tensor the recorder normed, as a
checkpoint analysis covers every tensor, so energy_share divides by the same total; a series recorded before the
recorder normed the other tensors holds its matrices only, and its shares are of those); for the decomposed
matrices, spectral_norm, spectral_ratio, stable_rank, energy_top{j} for j ≤ the kept k, top1pct_norm_ratio when
⌈r/100⌉ ≤ k, rank90 when the kept values reach 0.9 (spectrum.csv's ``svd_method`` is ``sketch-top{k}``); the
subspace overlaps, principal angle, paired and rank-1 cosines of alignment.csv (K lowered to the kept k);
segment_cosine (recorded during training) and null_cosine of segments.csv. Not available (empty cells, listed in
run.json's ``unavailable``): effective_rank (the whole spectrum; given when the recorder kept fewer than k triplets,
which it does only when the rest is below the update's resolution), direction_cosine and with it direction_excess and
the lock-in step, rank{k}_share and the linear fit (each needs the whole ΔW_t of every step), geometry and
embeddings (not recorded).
"""

from __future__ import annotations

import math
import platform
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from opd_dynamics._version import __version__
from opd_dynamics.analysis.metrics.norms import allocation_columns
from opd_dynamics.analysis.metrics.spectrum import spectrum_metrics
from opd_dynamics.analysis.metrics.subspace import alignment_metrics
from opd_dynamics.analysis.options import AnalysisOptions
from opd_dynamics.analysis.report import ANALYSIS, Report, api_command, build_tables
from opd_dynamics.errors import InputError
from opd_dynamics.io.naming import parse_name
from opd_dynamics.io.sketches import SketchSeries
from opd_dynamics.io.writer import atomic_dir
from opd_dynamics.numerics.decomposition import Decomposition

#: the columns a sketch cannot give, by table (run.json's "unavailable")
UNAVAILABLE = {
    "spectrum": ["effective_rank, energy_top{k} for k above the kept k, top1pct_norm_ratio when ⌈r/100⌉ > k and "
                 "rank90 when the kept values hold less than 0.9, unless the update's rank is below the kept k (the "
                 "recorder keeps fewer than k triplets only when the rest is below its resolution: the spectrum is "
                 "then whole)"],
    "alignment": ["direction_cosine"],
    "segments": ["direction_cosine", "direction_excess"],
    "trajectory": ["linear_r2", "linear_r2_median", "rank{k}_share", "lockin_step"],
    "geometry": ["all"], "embedding": ["all"],
}


def _decomposition(trip, f2: float, shape: tuple[int, int], k: int) -> Decomposition:
    if trip is None:  # nothing kept: a zero update
        return Decomposition(torch.zeros(0, dtype=torch.float64), None, None, f2, "zero", False, shape, 0)
    U, S, V = trip
    n, r = int(S.shape[0]), min(shape)
    if n < min(k, r) or n == r:  # fewer than k kept: the rest of the spectrum is below the update's resolution
        whole = torch.zeros(r, dtype=torch.float64)
        whole[:n] = S
        return Decomposition(whole, U, V, f2, f"sketch-top{k}", True, shape, n)
    return Decomposition(S, U, V, f2, f"sketch-top{k}", False, shape, n)


def _cosine_null(table, ref: int, t_ref: int, start: int) -> dict[tuple[str, int], float]:
    """{(tensor, step): the random-walk null of direction_cosine to ``ref``}: sqrt(Σ_{i≤t}‖δ_i‖² / Σ_{i≤ref}‖δ_i‖²)
    from the recorded segment norms (DESIGN's null from the run itself, as the checkpoint analysis computes it);
    √((t − start)/(ref − start)) for a tensor whose segments up to ref are not all recorded (a resumed run's
    first one)."""
    out = {}
    for name, g in table[table["step"] <= ref].groupby("tensor", sort=False):
        seg2 = g["segment_norm"].to_numpy(dtype=float) ** 2
        steps = g["step"].to_numpy()
        cum = seg2.cumsum()
        whole = bool(np.isfinite(seg2).all()) and cum[-1] > 0
        for t, c in zip(steps.tolist(), cum.tolist()):
            out[(name, t)] = math.sqrt(c / cum[-1]) if whole else math.sqrt((t - start) / t_ref)
    return out


def sketch_tables(series: SketchSeries, opts: AnalysisOptions) -> dict[str, list[dict]]:
    """The per-tensor rows of one sketch series (module docstring)."""
    ref = opts.ref_step if opts.ref_step is not None else series.steps[-1]
    if ref not in series.files:
        raise InputError(None, f"ref_step {ref} is not a recorded step of {series.path} (its steps: "
                               f"{', '.join(map(str, series.steps))})", ("ref_step",))
    rows: dict[str, list[dict]] = {t: [] for t in ("module_allocation", "spectrum", "singular_values", "alignment",
                                                    "segments")}
    t_ref = ref - series.start_step
    table = series.table.sort_values(["tensor", "step"])
    # segments.csv pairs the segment ending at a step with the next one; the recorder's row holds the cosine of
    # the segment ending there with the previous one: the next row's value
    table["next_segment_cosine"] = table.groupby("tensor", sort=False)["segment_cosine"].shift(-1)
    null = _cosine_null(table, ref, t_ref, series.start_step)
    ident, shapes = {}, {}
    for name, info in series.tensors.items():
        i = parse_name(name)
        ident[name] = {"run": series.name, "tensor": name, "layer": i.layer, "group": i.group, "module": i.module,
                       "expert": i.expert}
        shapes[name] = tuple(info["shape"])
    decomposed = set(series.decomposed)
    at_ref = series.triplets(ref)
    f2_ref = dict(zip(table.loc[table["step"] == ref, "tensor"], table.loc[table["step"] == ref, "update_norm"] ** 2))
    dec_ref = {n: _decomposition(at_ref.get(n), float(f2_ref[n]), shapes[n], series.k) for n in decomposed}
    for step, at_step in table.groupby("step", sort=True):  # each step file read once
        step = int(step)
        trips = at_ref if step == ref else series.triplets(step)
        for r in at_step.itertuples(index=False):
            name, f = r.tensor, float(r.update_norm)
            shape, numel = shapes[name], math.prod(shapes[name])
            row = {**ident[name], "step": step}
            rows["module_allocation"].append({
                **row, "shape": "x".join(map(str, shape)), "numel": numel,
                **allocation_columns(f, r.base_norm, numel, r.changed_fraction),
                "finite": math.isfinite(f), "resized": False})
            if name not in decomposed or not opts.spectra_groups_include(ident[name]["group"]):
                continue
            dec = dec_ref[name] if step == ref else _decomposition(trips.get(name), f * f, shape, series.k)
            rows["spectrum"].append({**row, **spectrum_metrics(dec, opts.ks)})
            for j, s in enumerate(dec.singular_values[:opts.n_singular_values].tolist(), 1):
                rows["singular_values"].append({**row, "index": j, "sigma": s, "sigma_normalized": s / f})
            if opts.alignment:
                rows["alignment"].append({**row, "ref_step": ref, **alignment_metrics(
                    dec, dec_ref[name], None, None, k=opts.k_subspace, K=opts.k_paired)})
            if opts.trajectory and step <= ref:
                rows["segments"].append({**row, "segment_cosine": r.next_segment_cosine,
                                         "direction_cosine": math.nan,
                                         "null_cosine": null[(name, step)],
                                         "direction_excess": math.nan})
    return rows


def analyze_sketches(series: SketchSeries | Sequence[SketchSeries], *, out: str | Path | None = None,
                     options: AnalysisOptions | None = None, overwrite: bool = False, command: str | None = None,
                     **fields) -> Report:
    """Analyse one or more sketch series into a Report (the tables of `analyze`, module docstring, and
    sketch_alignment: alignment.csv's rows under the name `plot` draws every recorded step from); with ``out``,
    written there as CSVs and run.json."""
    lst = [series] if isinstance(series, SketchSeries) else list(series)
    names = [s.name for s in lst]
    if len(set(names)) != len(names):
        raise InputError(None, f"run names must be distinct, got {names}")
    opts = options or AnalysisOptions()
    if fields:
        from dataclasses import replace

        opts = replace(opts, **fields)
    rows: dict[str, list[dict]] = {}
    for s in lst:
        for t, rs in sketch_tables(s, opts).items():
            rows.setdefault(t, []).extend(rs)
    tables = build_tables(rows)
    if "alignment" in tables:  # every recorded step's alignment, as `lab run` writes it: figure step_alignment
        from opd_dynamics.schema import TABLES

        tables["sketch_alignment"] = tables["alignment"][TABLES["sketch_alignment"].names]
    meta = {"version": __version__, "command": command or api_command(),
            "python": platform.python_version(), "torch": torch.__version__, "source": "sketch series",
            "inputs": [{"run": s.name, "sketch": str(s.path), "k": s.k, "steps": s.steps,
                        "tensors": len(s.tensors), "decomposed": len(s.decomposed),
                        "normed": sorted(set(s.tensors) - set(s.decomposed))} for s in lst],
            "options": {"ref_step": opts.ref_step, "ks": list(opts.ks), "k_subspace": opts.k_subspace,
                        "k_paired": opts.k_paired, "alignment": opts.alignment, "trajectory": opts.trajectory},
            "unavailable": UNAVAILABLE, "warnings": [], "skipped": [], "failed": [],
            "tables": {k: len(v) for k, v in tables.items()}}
    report = Report(tables, meta)
    if out is not None:
        with atomic_dir(out, ANALYSIS, overwrite=overwrite, inputs=[s.path for s in lst],
                        command=meta["command"]) as tmp:
            report.write_into(tmp)
    return report


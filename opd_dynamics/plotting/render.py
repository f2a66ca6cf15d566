"""The figure registry and `plot_all`: render what the tables allow, say what was skipped and why,
write each file under a temporary name and rename it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from opd_dynamics.errors import InputError
from opd_dynamics.io.writer import atomic_file, output_errors
from opd_dynamics.plotting.allocation import (
    plot_allocation_heatmap,
    plot_embedding_cosine,
    plot_embedding_swap,
    plot_group_energy,
    plot_layer_norms,
)
from opd_dynamics.plotting.direction import (
    plot_alignment,
    plot_foresight,
    plot_singular_value_decay,
    plot_step_alignment,
    plot_table1,
    plot_trajectory_shape,
)
from opd_dynamics.plotting.effopd import plot_effopd_curves, plot_probe
from opd_dynamics.plotting.extrapolation import plot_extrapolation
from opd_dynamics.plotting.tables import Tables, as_tables
from opd_dynamics.plotting.utility import plot_eval_curves, plot_rank_recovery, plot_rescale, plot_scaling

log = logging.getLogger(__name__)

#: the file formats a figure is written in (`plot --format`)
FORMATS = ("png", "svg", "pdf")

#: the report's sections in page order (`plotting.html`); every figure's `section` is one of them
SECTIONS = ("Training", "Module allocation", "Utility", "Update direction", "EffOPD", "Extrapolation")


@dataclass(frozen=True)
class FigureSpec:
    """A named figure: the function drawing it, the tables it needs (each inner tuple: any one of them),
    the report section it belongs to (one of `SECTIONS`) and a one-line caption saying what it shows in
    general; `caption_for` gives the caption of a drawing: the runs, steps and layers shown, and only what
    the tables hold."""

    name: str
    fn: Callable[[Any], Figure]
    needs: tuple[tuple[str, ...], ...]
    section: str
    caption: str
    check: Callable[[dict[str, pd.DataFrame]], str | None] | None = None

    def caption_for(self, tables: Any) -> str:
        """The caption of this figure drawn from `tables` (`plotting.captions`)."""
        from opd_dynamics.plotting.captions import CAPTIONS

        fn = CAPTIONS.get(self.name)
        return fn(as_tables(tables)) if fn is not None else self.caption


def _present(t: dict[str, pd.DataFrame], name: str) -> bool:
    return name in t and not t[name].empty


def _table1_check(t: dict[str, pd.DataFrame]) -> str | None:
    s = t.get("summary")
    if s is not None and "aggregate" in s.columns and (s["aggregate"] == "table1").any():
        return None
    return None if _present(t, "spectrum") else "summary.csv has no table1 rows and spectrum.csv is absent"


def _layer_check(t: dict[str, pd.DataFrame]) -> str | None:
    if _present(t, "module_allocation"):
        return None
    s = t["summary"]
    if "aggregate" in s.columns and (s["aggregate"] == "layer").any():
        return None
    return "summary.csv has no per-layer rows and module_allocation.csv is absent"


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("eval_curves", plot_eval_curves, (("eval",),), "Training",
               "Held-out accuracy (and the reverse KL to the teacher, when measured) during training, per run."),
    FigureSpec("allocation_heatmap", plot_allocation_heatmap, (("module_allocation",),), "Module allocation",
               "Update norm ‖ΔW‖_F per layer and module at the last step (shared colour scale)."),
    FigureSpec("allocation_heatmap_share", partial(plot_allocation_heatmap, metric="energy_share"),
               (("module_allocation",),), "Module allocation",
               "Share of each run's update energy per layer and module at the last step."),
    FigureSpec("layer_norms", plot_layer_norms, (("module_allocation", "summary"),), "Module allocation",
               "Per-layer update norm for attention and MLP (Fig. 2b), with the sliding-window accuracy where "
               "window.csv holds it.",
               _layer_check),
    FigureSpec("group_energy", plot_group_energy, (("summary", "module_allocation"),), "Module allocation",
               "Share of the update's energy per parameter group."),
    FigureSpec("embedding_cosine", plot_embedding_cosine, (("embedding",),), "Module allocation",
               "Cosine between base and trained embedding rows."),
    FigureSpec("embedding_swap", plot_embedding_swap, (("embedding_swap",),), "Module allocation",
               "Accuracy with the embedding update swapped back to base."),
    FigureSpec("scaling", plot_scaling, (("scaling",),), "Utility",
               "Accuracy against update norm for α-scaled updates (Fig. 1)."),
    FigureSpec("rank_recovery", plot_rank_recovery, (("rank",),), "Utility",
               "Accuracy keeping only the top-k% or bottom-k% singular components of each matrix's update."),
    FigureSpec("rescale", plot_rescale, (("rescale",),), "Utility",
               "Module-wise rescaling of intermediate updates to the final norms, and the β sweep."),
    FigureSpec("singular_values", plot_singular_value_decay, (("singular_values",),), "Update direction",
               "Singular-value decay of ΔW (median over matrices) at the last step."),
    FigureSpec("table1", plot_table1, (("summary", "spectrum"),), "Update direction",
               "The paper's Table-1 aggregates over attention and MLP matrices.", _table1_check),
    FigureSpec("alignment", plot_alignment, (("alignment",),), "Update direction",
               "Alignment of early top singular directions with the final update's (Fig. 4b)."),
    FigureSpec("step_alignment", plot_step_alignment, (("sketch_alignment",),), "Update direction",
               "Alignment to the final update at every recorded step, from a sketch series' analysis (`lab run`, or "
               "`analyze` of any sketch series; dots: a checkpoint analysis of the same run, where given)."),
    FigureSpec("foresight", plot_foresight, (("segments",),), "Update direction",
               "Alignment to the final update against its random-walk null (from each matrix's measured segment "
               "norms), and consecutive-segment cosines."),
    FigureSpec("trajectory_shape", plot_trajectory_shape, (("trajectory",),), "Update direction",
               "Per layer: the per-entry linear fit's R² and the rank-1 share of the stacked updates."),
    FigureSpec("probe", plot_probe, (("probe",),), "EffOPD",
               "Line probe: score of W_t + c·(W_t − W_s) against c for early pairs (s, t)."),
    FigureSpec("effopd_curves", plot_effopd_curves, (("effopd_curves",),), "EffOPD",
               "Accuracy against optimizer steps and wall-clock: vanilla OPD, EffOPD, fixed coefficient."),
    FigureSpec("extrapolation", plot_extrapolation, (("extrapolation",),), "Extrapolation",
               "Share of the run's accuracy gain each extrapolator recovers from the first 10/20/40 % of training."),
)


def skip_reason(spec: FigureSpec, tables: dict[str, pd.DataFrame]) -> str | None:
    """Why `spec` cannot be drawn from `tables` (None when it can)."""
    for alts in spec.needs:
        if not any(_present(tables, n) for n in alts):
            return " or ".join(f"{n}.csv" for n in alts) + " is absent"
    return spec.check(tables) if spec.check else None


def available_figures(tables: Tables | Any) -> tuple[list[FigureSpec], dict[str, str]]:
    """The figures the tables allow, and {name: reason} for the others."""
    t = as_tables(tables).tables
    ok, skipped = [], {}
    for spec in FIGURES:
        reason = skip_reason(spec, t)
        if reason is None:
            ok.append(spec)
        else:
            skipped[spec.name] = reason
    return ok, skipped


#: the resolution of the figure files (PNG)
PNG_DPI = 150


def save_figure(fig: Figure, path: str | Path, *, overwrite: bool = False, dpi: int = PNG_DPI) -> Path:
    """Write `fig` to `path` (format from the suffix) under a temporary name, then rename; an OS error (a
    read-only file system, a full disk, a file where the folder must go) is one sentence naming `path`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(path, "already exists; pass overwrite=True to replace it", ("overwrite",))
    with output_errors(path), atomic_file(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=dpi)
    return path


class PlotResult(list):
    """The written paths (a list of Path), plus `.skipped`: {figure name: reason}."""

    def __init__(self, paths=(), skipped: dict[str, str] | None = None):
        super().__init__(paths)
        self.skipped: dict[str, str] = dict(skipped or {})


def plot_all(reports_or_dirs: Any, out_dir: str | Path, formats: Sequence[str] = ("png", "svg"),
             overwrite: bool = False, figures: Sequence[str] | None = None) -> PlotResult:
    """Render every registered figure the tables allow into `out_dir` as `<name>.<format>`.

    `reports_or_dirs`: a Report, a dict of DataFrames, a directory, or a list of them (tables merged).
    Returns the written paths; `.skipped` maps each figure not drawn to the reason (also logged).
    Existing files are refused (before anything is drawn) unless `overwrite`."""
    tables = as_tables(reports_or_dirs)
    formats = [f.lower().lstrip(".") for f in formats]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise InputError(None, f"figure format(s) {', '.join(bad)} not supported; use png, svg or pdf")
    ok, skipped = available_figures(tables)
    if figures is not None:
        unknown = sorted(set(figures) - {s.name for s in FIGURES})
        if unknown:
            raise InputError(None, f"unknown figure(s) {', '.join(unknown)}; the figures are "
                                   f"{', '.join(s.name for s in FIGURES)}")
        ok = [s for s in ok if s.name in figures]
        skipped = {n: r for n, r in skipped.items() if n in figures}  # only what was asked for
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a directory")
    targets = [out / f"{s.name}.{f}" for s in ok for f in formats]
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        raise InputError(existing[0], f"already exists ({len(existing)} figure file(s) would be replaced); "
                                      "pass overwrite=True", ("overwrite",))
    for name, reason in skipped.items():
        log.info("figure %s skipped: %s", name, reason)
    written = PlotResult(skipped=skipped)
    for spec in ok:
        try:
            fig = spec.fn(tables)
        except InputError as e:  # the tables exist but cannot feed this figure: skip it, draw the others
            written.skipped[spec.name] = str(e)
            log.info("figure %s skipped: %s", spec.name, e)
            continue
        try:
            for f in formats:
                written.append(save_figure(fig, out / f"{spec.name}.{f}", overwrite=overwrite))
        finally:
            fig.clear()
    return written

"""Figures for opd-dynamics results: each function takes a Report (or dict of DataFrames, or a directory)
and returns a matplotlib Figure; `plot_all` renders every figure the available tables allow.

Every run keeps its colour everywhere, a run named "opd" OPD blue (`style.run_colors`); titles and captions name
the runs shown, and a run's kind only where the provenance states it (`plotting.runs`)."""

from __future__ import annotations

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
from opd_dynamics.plotting.render import FIGURES, FigureSpec, PlotResult, available_figures, plot_all, save_figure
from opd_dynamics.plotting.style import OPD_COLOR, method_colors, opd_style, run_colors
from opd_dynamics.plotting.tables import Tables, as_tables, load_tables
from opd_dynamics.plotting.utility import plot_eval_curves, plot_rank_recovery, plot_rescale, plot_scaling

__all__ = [
    "FIGURES", "FigureSpec", "OPD_COLOR", "PlotResult", "Tables", "as_tables", "available_figures", "load_tables",
    "method_colors", "opd_style", "plot_alignment", "plot_all", "plot_allocation_heatmap", "plot_effopd_curves",
    "plot_embedding_cosine", "plot_embedding_swap", "plot_eval_curves", "plot_extrapolation", "plot_foresight",
    "plot_group_energy", "plot_layer_norms", "plot_probe", "plot_rank_recovery", "plot_rescale", "plot_scaling",
    "plot_singular_value_decay", "plot_step_alignment", "plot_table1", "plot_trajectory_shape", "run_colors",
    "save_figure",
]

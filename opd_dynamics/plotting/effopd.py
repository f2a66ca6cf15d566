"""EffOPD against vanilla OPD and a fixed coefficient (accuracy per optimizer step and per second), and the line
probe that says beforehand whether jumping ahead can help."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from opd_dynamics.plotting._draw import fig_legend, percent_axis
from opd_dynamics.plotting.style import method_colors, new_figure, order_runs, styled
from opd_dynamics.plotting.tables import as_tables, numeric, require_table

_METHOD_ORDER = ("vanilla", "vanilla-3x", "vanilla-10x", "effopd", "fixed")


@styled
def plot_effopd_curves(report: Any, target_fraction: float = 0.95) -> Figure:
    """Held-out accuracy against optimizer steps (left) and wall-clock seconds (right) for each method:
    faint lines are seeds, bold the median over seeds; dotted: the target (`target_fraction` of vanilla's
    final accuracy, median over seeds). Legend entries carry the median steps to target from effopd_summary."""
    c = require_table(report, "effopd_curves", ["seed", "method", "step", "accuracy", "wall_s"])
    c = c.assign(method=c["method"].astype(str), accuracy=numeric(c["accuracy"]), wall_s=numeric(c["wall_s"]),
                 step=c["step"].astype(int))
    methods = sorted(c["method"].unique(), key=lambda m: (_METHOD_ORDER.index(m) if m in _METHOD_ORDER else 9, m))
    colors = method_colors(methods)
    summ = as_tables(report).tables.get("effopd_summary")
    stt: dict[str, str] = {}
    if summ is not None and {"method", "steps_to_target"} <= set(summ.columns):
        for m, g in summ.groupby("method"):
            v = numeric(g["steps_to_target"])
            hit = v[~np.isnan(v)]
            stt[str(m)] = ("target not reached" if not hit.size else
                           f"median steps to target {np.median(hit):g}, {hit.size} of {v.size} seeds reached it")
    fig, axes = new_figure(1, 2, width=11, height=4, sharey=True)
    for ax, xcol, xlabel in zip(axes[0], ["step", "wall_s"], ["optimizer step", "wall-clock (s, incl. validation)"]):
        for m in methods:
            d = c[c["method"] == m]
            for _, s in d.groupby("seed"):
                s = s.sort_values("step")
                ax.plot(s[xcol], s["accuracy"], color=colors[m], alpha=0.25, lw=1, label=f"_{m} seed")
            med = d.groupby("step")[["accuracy", "wall_s"]].median().sort_index()
            label = m
            if m in stt:
                label += f" ({stt[m]})"
            ax.plot(med[xcol] if xcol == "wall_s" else med.index, med["accuracy"], color=colors[m], lw=2.2,
                    label=label)
        if "vanilla" in methods:
            v = c[c["method"] == "vanilla"]
            finals = v.sort_values("step").groupby("seed")["accuracy"].last()
            target = target_fraction * float(np.median(finals))
            ax.axhline(target, color="0.35", ls=":", lw=1.2,
                       label=f"target ({target_fraction:.0%} of vanilla final)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out accuracy")
        percent_axis(ax)
        ax.set_title(f"Accuracy vs {'optimizer steps' if xcol == 'step' else 'wall-clock'}")
    fig_legend(fig, axes[0, :1], ncol=2)
    n_seeds = c["seed"].nunique()
    fig.suptitle(f"EffOPD vs vanilla OPD vs fixed extrapolation ({n_seeds} seed{'s' if n_seeds != 1 else ''})")
    return fig


@styled
def plot_probe(report: Any) -> Figure:
    """The line probe: score of W_t + c·(W_t − W_s) against c, one line per pair (s → t), one panel per run;
    the shaded band is [0.5, 2], where EffOPD's first candidates lie, and c = 0 (W_t) is marked."""
    from opd_dynamics.effopd.probe import GATE_RANGE

    p = require_table(report, "probe", ["run", "step_from", "step", "coef", "score"])
    runs = order_runs(p["run"].unique())
    fig, axes = new_figure(1, len(runs), sharey=True, width=max(6.5, 4.6 * len(runs) + 0.6))
    for ax, r in zip(axes[0], runs):
        d = p[p["run"] == r]
        pairs = d[["step_from", "step"]].drop_duplicates().sort_values(["step", "step_from"])
        ax.axvspan(*GATE_RANGE, color="0.9", zorder=0)
        ax.axvline(0.0, color="0.5", lw=1, ls=":")
        for s, t in pairs.itertuples(index=False):
            x = d[(d["step_from"] == s) & (d["step"] == t)].sort_values("coef")
            ax.plot(numeric(x["coef"]), numeric(x["score"]), marker="o", label=f"{int(s)} → {int(t)}")
        ax.set_title(f"{r}: W_t + c·(W_t − W_s)")
        ax.set_xlabel("c (0 = W_t; shaded: EffOPD's first candidates)")
        ax.set_ylabel("score" if ax is axes[0][0] else "")
        ax.legend(title="s → t", fontsize=8)
    fig.suptitle("Line probe: does a jump along the last segment help?")
    return fig

"""The extrapolators side by side (lab extrapolate): share of the run's accuracy gain each method's prediction
recovers against the fraction of training observed, beside the run itself at its last observed step."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from opd_dynamics.plotting._draw import fig_legend, no_data
from opd_dynamics.plotting.style import method_colors, new_figure, order_runs, styled
from opd_dynamics.plotting.tables import numeric, require_table

OBSERVED = "the run at its last observed step"
FLOOR = -3.0  # the y axis stops here: a prediction that lost three times the run's gain is off the chart


@styled
def plot_extrapolation(report: Any) -> Figure:
    """One panel per run: mean over seeds (bars: sd) of `gain_recovered` per method against `fraction`, the
    run's own `observed_gain` dashed, 1 (the true final checkpoint) dotted."""
    d = require_table(report, "extrapolation", ["seed", "run", "fraction", "method", "gain_recovered",
                                                "observed_gain"])
    d = d.assign(fraction=numeric(d["fraction"]), gain_recovered=numeric(d["gain_recovered"]),
                 observed_gain=numeric(d["observed_gain"]), method=d["method"].astype(str), run=d["run"].astype(str))
    runs = order_runs(d["run"].unique())
    methods = list(dict.fromkeys(d["method"]))
    colors = method_colors([*methods, OBSERVED])
    fig, axes = new_figure(1, len(runs), width=5.2 * len(runs), height=4)
    for ax, run in zip(axes[0], runs):
        r = d[d["run"] == run]
        n_seeds = r["seed"].nunique()
        for m in methods:
            g = r[r["method"] == m].groupby("fraction")["gain_recovered"].agg(["mean", "std", "count"]).dropna(
                subset=["mean"])
            if len(g):
                ax.errorbar(g.index, g["mean"], yerr=g["std"].fillna(0), color=colors[m], marker="o", lw=1.8,
                            capsize=3, label=m)
        obs = r.drop_duplicates(["seed", "fraction"]).groupby("fraction")["observed_gain"].agg(["mean", "std"])
        ax.errorbar(obs.index, obs["mean"], yerr=obs["std"].fillna(0), color="0.3", ls="--", marker="s", lw=1.5,
                    capsize=3, label=OBSERVED)
        ax.axhline(1.0, color="0.45", ls=":", lw=1.2, label="the true final checkpoint")
        ax.axhline(0.0, color="0.75", lw=0.8)
        if not len(r):
            no_data(ax)
        ax.set_xticks(sorted(r["fraction"].unique()))
        ax.set_xticklabels([f"{x:.0%}" for x in sorted(r["fraction"].unique())])
        ax.set_xlabel("fraction of training observed")
        ax.set_title(f"{run} ({n_seeds} seed{'s' if n_seeds != 1 else ''})")
        vals = np.r_[r["gain_recovered"].to_numpy(), r["observed_gain"].to_numpy(), 0.0, 1.0]
        vals = vals[np.isfinite(vals)]
        lo, hi = vals.min(), vals.max()
        ax.set_ylim(max(lo, FLOOR) - 0.1, hi + 0.1)
        if lo < FLOOR:
            ax.text(0.02, 0.02, f"values below {FLOOR:g} not shown", transform=ax.transAxes, fontsize=8, color="0.4")
    axes[0, 0].set_ylabel("share of the run's accuracy gain recovered")
    fig_legend(fig, axes[0, :1], ncol=4)
    return fig

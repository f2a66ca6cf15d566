"""What the update is worth: α-scaling (Fig. 1), rank truncation recovery, module rescaling, and eval curves."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from opd_dynamics.plotting._draw import fig_legend, integer_xticks, no_data, percent_axis
from opd_dynamics.plotting.runs import runs_title
from opd_dynamics.plotting.style import new_figure, order_runs, run_colors, styled
from opd_dynamics.plotting.tables import as_bool, as_tables, numeric, require_table


@styled
def plot_scaling(report: Any) -> Figure:
    """Held-out accuracy against the norm of the α-scaled update W0 + αΔW, one line per run (the paper's Fig. 1):
    the run that reaches higher accuracy at a smaller norm spends its update better."""
    s = require_table(report, "scaling", ["run", "alpha", "update_norm", "accuracy"])
    runs = order_runs(s["run"].unique())
    colors = run_colors(runs)
    fig, axes = new_figure(1, 1, width=6, height=4.2)
    ax = axes[0, 0]
    for r in runs:
        d = s[s["run"] == r].assign(n=lambda x: numeric(x["update_norm"])).sort_values("n")
        ax.plot(d["n"], numeric(d["accuracy"]), marker="o", color=colors[r], label=r)
        for n, acc, a in zip(d["n"], numeric(d["accuracy"]), numeric(d["alpha"])):
            if np.isclose(a, 1.0):
                ax.annotate("α=1", (n, acc), textcoords="offset points", xytext=(4, -10), fontsize=7,
                            color=colors[r])
    ax.set_xlabel("update norm ‖αΔW‖$_F$ (all analysed weights)")
    ax.set_ylabel("held-out accuracy")
    percent_axis(ax)
    ax.set_title(f"Accuracy per unit of update norm (α-scaled updates): {runs_title(runs)}")
    ax.legend(title="run")
    return fig


@styled
def plot_rank_recovery(report: Any) -> Figure:
    """Accuracy when each matrix's update keeps only its top-k% (left) or bottom-k% (right) singular
    components; dashed: rescaled to the full update's Frobenius norm."""
    d = require_table(report, "rank", ["run", "side", "pct", "rescaled", "accuracy"])
    d = d.assign(rescaled=as_bool(d["rescaled"]), pct=numeric(d["pct"]), accuracy=numeric(d["accuracy"]))
    if np.nanmax(d["pct"]) <= 1.0:  # given as fractions (0.01 = 1%)
        d["pct"] = d["pct"] * 100
    runs = order_runs(d["run"].unique())
    colors = run_colors(runs)
    fig, axes = new_figure(1, 2, sharey=True)
    for ax, side in zip(axes[0], ["top", "bottom"]):
        sub = d[d["side"].astype(str) == side]
        for r in runs:
            for resc in (False, True):
                x = sub[(sub["run"] == r) & (sub["rescaled"] == resc)].sort_values("pct")
                if x.empty:
                    continue
                ax.plot(x["pct"], x["accuracy"], color=colors[r], ls="--" if resc else "-",
                        marker="o" if not resc else "x", label=f"{r}{' (rescaled)' if resc else ''}")
        ax.set_title(f"{'Top' if side == 'top' else 'Bottom'}-k% singular components kept")
        ax.set_xlabel("k (% of singular components per matrix)")
        ax.set_ylabel("held-out accuracy")
        percent_axis(ax)
        if not ax.get_lines():
            no_data(ax)
    fig_legend(fig, axes, title="run")
    fig.suptitle(f"Rank truncation, {runs_title(runs)}: how much accuracy lives in the top directions")
    return fig


@styled
def plot_rescale(report: Any) -> Figure:
    """Module-wise rescaling of an intermediate step's update to the final step's norms: recovered accuracy
    per step at the best β (left; dotted: the unmodified checkpoint from eval.csv when present) and the
    β sweep (right; lighter = earlier step)."""
    d = require_table(report, "rescale", ["run", "step", "beta", "accuracy"])
    d = d.assign(beta=numeric(d["beta"]), accuracy=numeric(d["accuracy"]), step=d["step"].astype(int))
    ev = as_tables(report).tables.get("eval")
    runs = order_runs(d["run"].unique())
    colors = run_colors(runs)
    fig, axes = new_figure(1, 2)
    ax = axes[0, 0]
    for r in runs:
        x = d[d["run"] == r].groupby("step")["accuracy"].max().sort_index()
        ax.plot(x.index, x.to_numpy(), color=colors[r], marker="o", label=f"{r} rescaled (best β)")
        if ev is not None and {"run", "step", "accuracy"} <= set(ev.columns):
            e = ev[(ev["run"] == r) & ev["step"].isin(x.index)].sort_values("step")
            if not e.empty:
                ax.plot(e["step"].astype(int), numeric(e["accuracy"]), color=colors[r], ls=":", marker=".",
                        label=f"{r} checkpoint as trained")
    ax.set_xlabel("training step of the rescaled update")
    integer_xticks(ax)
    ax.set_ylabel("held-out accuracy")
    percent_axis(ax)
    ax.set_title("Recovery by module-wise rescaling")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for r in runs:
        sub = d[d["run"] == r]
        steps = sorted(sub["step"].unique())
        for i, st in enumerate(steps):
            x = sub[sub["step"] == st].sort_values("beta")
            alpha = 0.35 + 0.65 * (i + 1) / len(steps)
            ax.plot(x["beta"], x["accuracy"], color=colors[r], alpha=alpha, marker="o", ms=3,
                    label=f"{r}" if i == len(steps) - 1 else f"_{r} step {st}")
    ax.set_xlabel("β")
    ax.set_ylabel("held-out accuracy")
    percent_axis(ax)
    ax.set_title("β sweep (lighter = earlier step)")
    if ax.get_lines():
        ax.legend(title="run")
    else:
        no_data(ax)
    fig.suptitle(f"Module-wise rescaling to the final update's norms: {runs_title(runs)}")
    return fig


@styled
def plot_eval_curves(report: Any) -> Figure:
    """Held-out accuracy (greedy solid, sampled dashed) and reverse KL to the teacher against training step."""
    e = require_table(report, "eval", ["run", "step", "accuracy"])
    runs = order_runs(e["run"].unique())
    colors = run_colors(runs)
    has_kl = "reverse_kl" in e.columns and e["reverse_kl"].notna().any()
    fig, axes = new_figure(1, 2 if has_kl else 1)
    ax = axes[0, 0]
    for r in runs:
        d = e[e["run"] == r].sort_values("step")
        ax.plot(d["step"].astype(int), numeric(d["accuracy"]), color=colors[r], marker="o", ms=3,
                label=f"{r} greedy")
        if "accuracy_sampled" in d.columns and d["accuracy_sampled"].notna().any():
            ax.plot(d["step"].astype(int), numeric(d["accuracy_sampled"]), color=colors[r], ls="--",
                    label=f"{r} sampled (T=1)")
    ax.set_xlabel("optimizer step")
    integer_xticks(ax)
    ax.set_ylabel("held-out accuracy")
    percent_axis(ax)
    ax.set_title("Held-out accuracy")
    ax.legend(fontsize=8)
    if has_kl:
        ax = axes[0, 1]
        for r in runs:
            d = e[e["run"] == r].sort_values("step")
            ax.plot(d["step"].astype(int), numeric(d["reverse_kl"]), color=colors[r], marker="o", ms=3, label=r)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("reverse KL to teacher (nats / token)")
        ax.set_title("Reverse KL on student samples")
        ax.legend(title="run")
    fig.suptitle(f"Training curves: {runs_title(runs)}")
    return fig

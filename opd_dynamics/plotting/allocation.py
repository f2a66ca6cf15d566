"""Where the update goes: layer × module heatmaps, per-layer norms with window utility (Fig. 2b), group shares,
and the embedding figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from opd_dynamics.errors import InputError
from opd_dynamics.io.naming import MATRIX_GROUPS, natural_key
from opd_dynamics.plotting._draw import fig_legend, grouped_bars, layer_axis, no_data, percent_axis, zoom_ylim
from opd_dynamics.plotting.runs import runs_title
from opd_dynamics.plotting.style import (
    GROUP_MARKERS,
    GROUP_ORDER,
    HEATMAP_CMAP,
    new_figure,
    order_runs,
    run_colors,
    styled,
)
from opd_dynamics.plotting.tables import as_tables, at_step, numeric, require_table, steps_of

_MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query_key_value", "o_proj", "c_proj",
                 "dense", "gate_proj", "up_proj", "gate_up_proj", "w1", "w3", "fc1", "c_fc", "dense_h_to_4h",
                 "down_proj", "w2", "fc2", "dense_4h_to_h", "gate", "router")
_HEATMAP_TITLE = {"update_norm": "Update norm", "energy_share": "Share of the update energy",
                  "relative_update": "Relative update"}
_METRIC_LABEL = {"update_norm": "update norm ‖ΔW‖$_F$", "energy_share": "energy share ‖ΔW‖$_F^2$ / total",
                 "relative_update": "relative update ‖ΔW‖$_F$ / ‖W$_0$‖$_F$"}


def _module_key(group: str, module: str) -> tuple:
    g = GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER)
    m = _MODULE_ORDER.index(module) if module in _MODULE_ORDER else len(_MODULE_ORDER)
    return (g, m, module)


def _sum(s: pd.Series) -> float:
    """A sum that stays NaN when any part is NaN or infinite (a non-finite tensor is not 'no update')."""
    v = s.to_numpy(dtype=float)
    return float(v.sum()) if np.isfinite(v).all() else float("nan")


def _finite_max(m: pd.DataFrame) -> float:
    v = m.to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    return float(v.max()) if v.size else 0.0


def _aggregate(rows: pd.DataFrame, by: list[str], metric: str) -> pd.DataFrame:
    """Combine matrices (experts, fused parts) into one value per `by`: norms in quadrature, shares summed;
    NaN where any part is non-finite."""
    r = rows.assign(_f2=numeric(rows["update_norm"]) ** 2)
    if metric == "energy_share":
        g = r.assign(_v=numeric(r["energy_share"])).groupby(by, as_index=False)["_v"].agg(_sum)
        return g.rename(columns={"_v": "value"})
    if metric == "update_norm":
        g = r.groupby(by, as_index=False)["_f2"].agg(_sum)
        return g.assign(value=np.sqrt(g["_f2"])).drop(columns="_f2")
    if metric == "relative_update":
        r = r.assign(_b2=numeric(r["base_norm"]) ** 2)
        g = r.groupby(by, as_index=False)[["_f2", "_b2"]].agg(_sum)
        return g.assign(value=np.sqrt(g["_f2"] / g["_b2"])).drop(columns=["_f2", "_b2"])
    raise InputError(None, f"metric must be update_norm, energy_share or relative_update, not {metric!r}")


def heatmap_matrix(report: Any, run: str, metric: str = "update_norm", step: int | None = None,
                   groups: Sequence[str] | None = MATRIX_GROUPS) -> pd.DataFrame:
    """Layer × module table (rows: layers ascending; columns: modules in attention-then-MLP order) of one run."""
    a = require_table(report, "module_allocation", ["run", "step", "layer", "group", "module", "update_norm"])
    a = at_step(a[a["run"] == run], step)
    a = a[a["layer"].notna()]
    if groups is not None:
        a = a[a["group"].isin(groups)]
    if a.empty:
        raise InputError("module_allocation.csv", f"has no per-layer rows for run {run!r}")
    a = a.assign(layer=a["layer"].astype(int))
    g = _aggregate(a, ["layer", "group", "module"], metric)
    cols = sorted({(gr, m) for gr, m in zip(g["group"], g["module"])}, key=lambda t: _module_key(*t))
    shared = {m for _, m in cols if sum(1 for _, m2 in cols if m2 == m) > 1}  # GPT-2's c_proj: attention and MLP
    label = {(gr, m): f"{gr}.{m}" if m in shared else m for gr, m in cols}
    g = g.assign(column=[label[(gr, m)] for gr, m in zip(g["group"], g["module"])])
    piv = g.pivot_table(index="layer", columns="column", values="value", aggfunc="first", dropna=False)
    return piv.reindex(columns=[label[c] for c in cols]).sort_index()


@styled
def plot_allocation_heatmap(report: Any, metric: str = "update_norm", step: int | None = None,
                            groups: Sequence[str] | None = MATRIX_GROUPS) -> Figure:
    """Layer × module heatmap of `metric` (update_norm, energy_share or relative_update) at `step`
    (default: each run's last), one panel per run on a shared colour scale."""
    a = require_table(report, "module_allocation", ["run", "step", "layer", "group", "module", "update_norm"])
    runs = order_runs(a["run"].unique())
    mats = {r: heatmap_matrix(report, r, metric, step, groups) for r in runs}
    steps = steps_of(at_step(a, step))
    vmax = max(_finite_max(m) for m in mats.values())
    n_layers = max(len(m) for m in mats.values())
    n_mod = max(m.shape[1] for m in mats.values())
    fig, axes = new_figure(1, len(runs), width=0.55 * n_mod * len(runs) + 2.5,
                           height=min(max(3.0, 0.28 * n_layers + 1.6), 12))
    for i, (ax, r) in enumerate(zip(axes[0], runs)):
        sns.heatmap(mats[r], ax=ax, cmap=HEATMAP_CMAP, vmin=0, vmax=vmax, cbar=i == len(runs) - 1,
                    cbar_kws={"label": _METRIC_LABEL.get(metric, metric)}, linewidths=0.3, linecolor="white")
        ax.set_title(f"{r} (step {steps.get(r, '?')})")
        ax.set_xlabel("module")
        ax.set_ylabel("layer" if i == 0 else "")
        ax.tick_params(axis="x", rotation=45)
        for t in ax.get_xticklabels():
            t.set_horizontalalignment("right")
    fig.suptitle(f"{_HEATMAP_TITLE.get(metric, metric)} by layer and module: {runs_title(runs)}")
    return fig


def layer_norms(report: Any, step: int | None = None) -> pd.DataFrame:
    """Per run, layer and group (attention|mlp): update norm (quadrature sum over the group's matrices)."""
    t = as_tables(report).tables
    if "module_allocation" in t and not t["module_allocation"].empty:
        a = require_table(report, "module_allocation", ["run", "step", "layer", "group", "update_norm"])
        a = at_step(a[a["layer"].notna() & a["group"].isin(list(MATRIX_GROUPS))], step)
        g = _aggregate(a.assign(layer=a["layer"].astype(int)), ["run", "step", "layer", "group"], "update_norm")
    else:
        s = require_table(report, "summary", ["run", "step", "aggregate", "group", "layer", "metric", "value"])
        s = s[(s["aggregate"] == "layer") & (s["metric"] == "update_norm") & s["group"].isin(list(MATRIX_GROUPS))]
        if s.empty:
            raise InputError("summary.csv", "has no per-layer update_norm rows")
        s = at_step(s, step)
        g = s.assign(layer=s["layer"].astype(int), value=numeric(s["value"]))[["run", "step", "layer", "group",
                                                                               "value"]]
    return g.sort_values(["run", "group", "layer"]).reset_index(drop=True)


def window_table(report: Any, runs) -> pd.DataFrame | None:
    """window.csv's rows of `runs` (None when the tables hold none): the sliding-window accuracy."""
    win = as_tables(report).tables.get("window")
    if win is None or win.empty or not {"run", "center_layer", "group", "accuracy"} <= set(win.columns):
        return None
    win = win[win["run"].astype(str).isin([str(r) for r in runs])]
    return None if win.empty else win


@styled
def plot_layer_norms(report: Any, step: int | None = None, window: bool = True) -> Figure:
    """Per-layer update norm, attention and MLP panels, one line per run (the paper's Fig. 2b); with window.csv
    holding rows of these runs, the sliding-window accuracy (only that window's group trained, the rest at base)
    on a twin axis."""
    g = layer_norms(report, step)
    win = window_table(report, g["run"].unique()) if window else None
    runs = order_runs(g["run"].unique())
    layers = sorted(int(v) for v in g["layer"].unique())
    colors = run_colors(runs)
    steps = steps_of(g)
    fig, axes = new_figure(1, 2, width=11, height=3.8, sharey=False)
    for ax, group in zip(axes[0], list(MATRIX_GROUPS)):
        sub = g[g["group"] == group]
        for r in runs:
            d = sub[sub["run"] == r]
            if d.empty:
                continue
            ax.plot(d["layer"].astype(int), d["value"], marker=GROUP_MARKERS[group], color=colors[r],
                    label=f"{r} ‖ΔW‖ (step {steps.get(r)})")
        ax.set_title(f"{'Attention' if group == 'attention' else 'MLP'}: update norm by layer")
        ax.set_xlabel("layer")
        ax.set_ylabel("update norm ‖ΔW‖$_F$ (per layer)")
        twin = None
        if win is not None:
            w = win[win["group"].astype(str).str.lower() == group]
            if not w.empty:
                twin = ax.twinx()
                twin.grid(False)
                for r in runs:
                    d = w[w["run"] == r].sort_values("center_layer")
                    if d.empty:
                        continue
                    twin.plot(d["center_layer"].astype(int), numeric(d["accuracy"]), ls="--", marker="^",
                              color=colors[r], alpha=0.8, label=f"{r} window accuracy")
                twin.set_ylabel(f"accuracy, only {group} window trained")
                percent_axis(twin)
        layer_axis(ax, layers)  # after the twin's lines, which share (and would rescale) the x axis
        if not ax.get_lines() and twin is None:
            no_data(ax)
    fig_legend(fig, fig.axes)
    fig.suptitle(f"Update norm by depth: {runs_title(runs)}")
    return fig


def group_values(report: Any, metric: str = "energy_share", step: int | None = None) -> pd.DataFrame:
    """Per run and group: energy share (sums to 1) or update norm, from summary.csv or module_allocation.csv."""
    t = as_tables(report).tables
    if "summary" in t and not t["summary"].empty and {"aggregate", "metric"} <= set(t["summary"].columns):
        s = t["summary"]
        s = s[(s["aggregate"] == "group") & (s["metric"] == metric)]
        if not s.empty:
            s = at_step(s, step)
            return s.assign(value=numeric(s["value"]))[["run", "step", "group", "value"]].reset_index(drop=True)
    a = at_step(require_table(report, "module_allocation", ["run", "step", "group", "update_norm"]), step)
    return _aggregate(a, ["run", "step", "group"], metric)


@styled
def plot_group_energy(report: Any, step: int | None = None, metric: str = "energy_share") -> Figure:
    """Share of the update's energy (‖ΔW‖² / total) per parameter group, one bar per run."""
    g = group_values(report, metric, step)
    runs = order_runs(g["run"].unique())
    groups = sorted(g["group"].unique(), key=lambda x: GROUP_ORDER.index(x) if x in GROUP_ORDER else 99)
    colors = run_colors(runs)
    series = {r: [float(g[(g["run"] == r) & (g["group"] == gr)]["value"].sum()) if
                  ((g["run"] == r) & (g["group"] == gr)).any() else np.nan for gr in groups] for r in runs}
    fig, axes = new_figure(1, 1, width=max(5.0, 1.2 * len(groups) + 2), height=3.8)
    ax = axes[0, 0]
    grouped_bars(ax, groups, series, colors, fmt="{:.1%}" if metric == "energy_share" else "{:.3g}")
    ax.set_xlabel("parameter group")
    ax.set_ylabel(_METRIC_LABEL.get(metric, metric))
    if metric == "energy_share":
        percent_axis(ax)
    steps = steps_of(g)
    ax.set_title(f"{'Update energy' if metric == 'energy_share' else _HEATMAP_TITLE.get(metric, metric)} by "
                 f"group: {runs_title([f'{r} (step {steps.get(r)})' for r in runs])}")
    ax.legend(title="run")
    return fig


@styled
def plot_embedding_swap(report: Any) -> Figure:
    """Accuracy of each embedding-swap variant (e.g. trained vs embeddings put back to base), per run."""
    e = require_table(report, "embedding_swap", ["run", "variant", "accuracy"])
    runs = order_runs(e["run"].unique())
    variants = list(dict.fromkeys(e["variant"].astype(str)))
    colors = run_colors(runs)
    series = {r: [float(e[(e["run"] == r) & (e["variant"].astype(str) == v)]["accuracy"].mean())
                  if ((e["run"] == r) & (e["variant"].astype(str) == v)).any() else np.nan for v in variants]
              for r in runs}
    fig, axes = new_figure(1, 1, width=max(5.0, 1.4 * len(variants) + 2), height=3.8)
    ax = axes[0, 0]
    grouped_bars(ax, variants, series, colors, fmt="{:.1%}")
    ax.set_ylim(0, min(1.05, max(1e-3, float(np.nanmax(numeric(e["accuracy"])))) * 1.15))
    percent_axis(ax)
    ax.set_xlabel("variant")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"Embedding swap: does the embedding update matter? ({runs_title(runs)})")
    ax.legend(title="run")
    return fig


#: cosines within this of 1 are drawn as their difference from 1 (on a cosine axis 0.99999993 reads 1.000)
NEAR_ONE = 1e-3
_EMB_NAMES = {"cosine_mean": "mean", "cosine_p5": "5th pct", "cosine_tokens_mean": "token-set mean"}


def embedding_cosines(report: Any, step: int | None = None) -> tuple[pd.DataFrame, list[str]]:
    """embedding.csv at `step` (default each run's last) and the statistics it holds (mean, 5th percentile, and
    the token-set mean when measured)."""
    e = at_step(require_table(report, "embedding", ["run", "step", "tensor", "cosine_mean", "cosine_p5"]), step)
    metrics = ["cosine_mean", "cosine_p5"]
    if "cosine_tokens_mean" in e.columns and e["cosine_tokens_mean"].notna().any():
        metrics.append("cosine_tokens_mean")
    return e, metrics


def _decimals(values, least: int = 3, most: int = 8) -> int:
    """Decimals that print distinct values distinctly (0.99890 and 0.99949, not 0.999 twice): one more than the
    smallest gap between them needs, at least `least`."""
    v = np.unique(np.asarray(values, dtype=float)[np.isfinite(np.asarray(values, dtype=float))])
    gap = float(np.diff(v).min()) if v.size > 1 else 0.0
    return least if gap <= 0 else int(min(most, max(least, math.ceil(-math.log10(gap)) + 1)))


def near_one(values) -> bool:
    """Whether every finite value lies within NEAR_ONE of 1 (and there is one): then the panel shows 1 − cosine."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return bool(v.size) and bool(np.all(np.abs(1.0 - v) <= NEAR_ONE))


def embedding_series(e: pd.DataFrame, tensor: str, runs, metrics) -> dict[str, list[float]]:
    """{run: [value per statistic]} of one embedding tensor (the bars of its panel)."""
    d = e[e["tensor"].astype(str) == tensor]
    return {r: [float(numeric(d[d["run"] == r][m]).mean()) if (d["run"] == r).any() else np.nan for m in metrics]
            for r in runs}


@styled
def plot_embedding_cosine(report: Any, step: int | None = None) -> Figure:
    """Row cosine between base and trained embedding rows (mean and 5th percentile), per run; one panel per
    tensor. The y axis is zoomed around the values, which the axis label says; when every value lies within
    NEAR_ONE of 1 the panel shows 1 − cosine instead (on a cosine axis they would all read 1.000), and when that is
    0 everywhere a note says that no row moved."""
    e, metrics = embedding_cosines(report, step)
    runs = order_runs(e["run"].unique())
    colors = run_colors(runs)
    tensors = sorted(dict.fromkeys(e["tensor"].astype(str)), key=natural_key)
    fig, axes = new_figure(1, len(tensors), width=max(6.0, 1.1 * len(metrics) * len(runs) + 1.5) * len(tensors),
                           height=3.8)
    steps = steps_of(e)
    for ax, tname in zip(axes[0], tensors):
        series = embedding_series(e, tname, runs, metrics)
        values = [v for vs in series.values() for v in vs]
        if near_one(values):
            diff = {r: [1.0 - v for v in vs] for r, vs in series.items()}
            grouped_bars(ax, [_EMB_NAMES[m] for m in metrics], diff, colors, fmt="{:.2g}")
            dv = np.asarray([v for vs in diff.values() for v in vs], dtype=float)
            lo, hi = float(np.nanmin(dv)), float(np.nanmax(dv))
            if hi <= 0 and lo >= 0:
                ax.set_ylim(0, 1)
                ax.set_yticks([0])
                ax.text(0.5, 0.5, "no row moved: cosine = 1 for every row", ha="center", va="center",
                        transform=ax.transAxes, fontsize=9, color="0.35")
            else:
                ax.set_ylim(min(lo * 1.25, 0.0), max(hi * 1.25, 0.0))
            ax.set_ylabel("1 − cosine(base row, trained row)")
        else:
            grouped_bars(ax, [_EMB_NAMES[m] for m in metrics], series, colors, fmt=f"{{:.{_decimals(values)}f}}")
            zoom_ylim(ax, values, pad=0.3, ceil=1.002)
            ax.set_ylabel("cosine(base row, trained row)  [zoomed]")
        ax.set_title(tname.removesuffix(".weight") + " (" + ", ".join(f"{r} step {steps.get(r)}" for r in runs) + ")",
                     fontsize=9)
        ax.set_xlabel("statistic over rows")
        ax.legend(title="run", fontsize=8)
    fig.suptitle(f"Embedding rows: similarity to base, {runs_title(runs)}")
    return fig

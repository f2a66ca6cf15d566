"""How the update points: singular-value decay, the Table-1 aggregates, and early-vs-final alignment (Fig. 4b)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from opd_dynamics.analysis.report import TABLE1_METRICS, table1
from opd_dynamics.errors import InputError
from opd_dynamics.io.naming import MATRIX_GROUPS
from opd_dynamics.plotting._draw import fig_legend, grouped_bars, iqr_band, layer_axis, no_data, percent_axis
from opd_dynamics.plotting.runs import runs_title
from opd_dynamics.plotting.style import GROUP_MARKERS, new_figure, order_runs, run_colors, styled
from opd_dynamics.plotting.tables import as_tables, at_step, numeric, require_table, steps_of

TABLE1_LABELS = {"spectral_norm": "σ$_1$ (spectral norm)", "spectral_ratio": "σ$_1$ / ‖ΔW‖$_F$",
                 "effective_rank": "effective rank", "top1pct_norm_ratio": "top-1% norm ratio"}
_PERCENT = {"spectral_ratio", "top1pct_norm_ratio"}
_ALIGN_LABELS = {"paired_cosine": "paired cosine of top-20 u$_i$ to final",
                 "subspace_overlap_u": "subspace overlap U$_k$ with final",
                 "subspace_overlap_v": "subspace overlap V$_k$ with final",
                 "rank1_cosine": "|cos(u$_1$, u$_1$ final)|", "direction_cosine": "cos(ΔW$_t$, ΔW$_T$)"}

_ALIGN_TITLES = {"paired_cosine": "paired cosine (top 20)", "subspace_overlap_u": "left subspace overlap (top k)",
                 "subspace_overlap_v": "right subspace overlap (top k)", "rank1_cosine": "rank-1 cosine",
                 "direction_cosine": "whole-update cosine"}


def _group_title(g: str) -> str:
    return {"attention": "Attention", "mlp": "MLP"}.get(g, g)


def sv_decay(report: Any, step: int | None = None, groups: Sequence[str] = MATRIX_GROUPS) -> pd.DataFrame:
    """Per run, group and index: median and quartiles over matrices of σ_i / ‖ΔW‖_F."""
    s = require_table(report, "singular_values", ["run", "step", "group", "index", "sigma_normalized"])
    s = at_step(s[s["group"].isin(groups)], step)
    s = s.assign(v=numeric(s["sigma_normalized"]), index=s["index"].astype(int))
    q = s.groupby(["run", "step", "group", "index"])["v"]
    out = pd.concat({"median": q.median(), "q25": q.quantile(0.25), "q75": q.quantile(0.75), "n": q.size()},
                    axis=1).reset_index()
    return out


@styled
def plot_singular_value_decay(report: Any, step: int | None = None,
                              groups: Sequence[str] = MATRIX_GROUPS, log: bool = True) -> Figure:
    """σ_i / ‖ΔW‖_F against i (median over matrices, band = interquartile range), one panel per group,
    one line per run, at `step` (default: each run's last)."""
    d = sv_decay(report, step, groups)
    runs = order_runs(d["run"].unique())
    colors = run_colors(runs)
    steps = steps_of(d)
    fig, axes = new_figure(1, len(groups), sharey=True)
    for ax, g in zip(axes[0], groups):
        sub = d[d["group"] == g]
        for r in runs:
            x = sub[sub["run"] == r].sort_values("index")
            if x.empty:
                continue
            iqr_band(ax, x["index"], x["q25"], x["q75"], colors[r])
            ax.plot(x["index"], x["median"], color=colors[r], label=f"{r} (step {steps.get(r)})")
        if log:
            ax.set_yscale("log")
        ax.set_title(f"{_group_title(g)}: singular-value decay")
        ax.set_xlabel("singular value index i")
        ax.set_ylabel("σ$_i$ / ‖ΔW‖$_F$ (median over matrices)")
        if ax.get_lines():
            ax.legend(title="run")
        else:
            no_data(ax)
    fig.suptitle(f"Spectrum of the update, {runs_title(runs)}: a faster decay means a more low-rank ΔW")
    return fig


def table1_rows(report: Any, step: int | None = None) -> pd.DataFrame:
    """Table-1 aggregates per run at `step` (default each run's last): columns run, step, metric, value.
    From summary.csv (aggregate == 'table1'), else computed from spectrum.csv the same way (report.table1)."""
    t = as_tables(report).tables
    s = t.get("summary")
    if s is not None and not s.empty and {"aggregate", "metric", "value"} <= set(s.columns):
        s = s[(s["aggregate"] == "table1") & s["metric"].isin(TABLE1_METRICS)]
        if not s.empty:
            s = at_step(s, step)
            return s.assign(value=numeric(s["value"]))[["run", "step", "metric", "value"]].reset_index(drop=True)
    sp = require_table(report, "spectrum", ["run", "step", "group", *TABLE1_METRICS])
    t = table1(at_step(sp, step))
    if t.empty:
        raise InputError("spectrum.csv", "has no updated attention or MLP matrix to aggregate")
    return t[t["metric"].isin(TABLE1_METRICS)].reset_index(drop=True)


def from_sketches(report: Any, runs) -> bool:
    """Whether every one of `runs` was analysed from a sketch series (spectrum.csv's svd_method sketch-top{k})."""
    sp = as_tables(report).tables.get("spectrum")
    if sp is None or sp.empty or "svd_method" not in sp.columns:
        return False
    sp = sp[sp["run"].astype(str).isin([str(r) for r in runs])]
    return bool(len(sp)) and bool(sp["svd_method"].astype(str).str.startswith("sketch-").all())


@styled
def plot_table1(report: Any, step: int | None = None) -> Figure:
    """The paper's Table-1 aggregates (mean over attention and MLP matrices), one panel per metric, a bar per run."""
    t = table1_rows(report, step)
    runs = order_runs(t["run"].unique())
    colors = run_colors(runs)
    sketched = from_sketches(report, runs)
    metrics = [m for m in TABLE1_METRICS if m in set(t["metric"])]
    fig, axes = new_figure(1, len(metrics), width=2.6 * len(metrics) + 1, height=3.6)
    for ax, m in zip(axes[0], metrics):
        series = {r: [float(t[(t["run"] == r) & (t["metric"] == m)]["value"].mean())] for r in runs}
        grouped_bars(ax, [""], series, colors, fmt="{:.1%}" if m in _PERCENT else "{:.3g}")
        ax.set_xticks([])
        if all(np.isnan(v[0]) for v in series.values()):
            ax.text(0.5, 0.5, "not in these tables:\nit needs the whole spectrum\n" + (
                "(a sketch series keeps the top k)" if sketched else "(--svd exact)"), ha="center", va="center",
                transform=ax.transAxes, fontsize=8, color="0.4")
        ax.set_title(TABLE1_LABELS[m])
        if m in _PERCENT:
            percent_axis(ax)
        top = np.nanmax([v[0] for v in series.values()] + [0.0])
        ax.set_ylim(0, top * 1.18 if top > 0 else 1)
    fig_legend(fig, axes, title="run")
    steps = steps_of(t)
    fig.suptitle("Table 1: low-rankness of ΔW, mean over attention and MLP matrices ("
                 + ", ".join(f"{r} step {steps.get(r)}" for r in runs) + ")")
    return fig


def _quartiles(df: pd.DataFrame, metrics: Sequence[str], keys: list[str]) -> pd.DataFrame:
    """Long form: per ``keys`` and metric, the median and quartiles over matrices (columns median, q25, q75)."""
    rows = []
    for m in metrics:
        q = df.assign(v=numeric(df[m])).groupby(keys)["v"]
        rows.append(pd.concat({"median": q.median(), "q25": q.quantile(0.25), "q75": q.quantile(0.75)}, axis=1)
                    .reset_index().assign(metric=m))
    return pd.concat(rows, ignore_index=True)


def alignment_curves(report: Any, metrics: Sequence[str] = ("paired_cosine", "subspace_overlap_u"),
                     groups: Sequence[str] = MATRIX_GROUPS) -> pd.DataFrame:
    """Per run, group, step and metric: median and quartiles over matrices; progress = step / ref_step."""
    a = require_table(report, "alignment", ["run", "step", "ref_step", "group", *metrics])
    out = _quartiles(a[a["group"].isin(groups)], metrics, ["run", "group", "step", "ref_step"])
    ref = out["ref_step"].astype(float).replace(0, np.nan)
    out["progress"] = out["step"].astype(float) / ref
    return out


@styled
def plot_alignment(report: Any, metrics: Sequence[str] = ("paired_cosine", "subspace_overlap_u"),
                   groups: Sequence[str] = MATRIX_GROUPS) -> Figure:
    """Alignment of each step's top singular directions to the final update's, against training progress
    (step / reference step), one line per run (the paper's Fig. 4b); rows: metrics, columns: groups; band = IQR."""
    d = alignment_curves(report, metrics, groups)
    runs = order_runs(d["run"].unique())
    colors = run_colors(runs)
    refs = d.groupby("run")["ref_step"].max()
    final = all(refs[r] == d[d["run"] == r]["step"].max() for r in runs)  # reference = each run's last step
    ref_name = "final" if final else "reference"
    fig, axes = new_figure(len(metrics), len(groups), sharex=True, sharey="row")
    for i, m in enumerate(metrics):
        for j, g in enumerate(groups):
            ax = axes[i, j]
            sub = d[(d["metric"] == m) & (d["group"] == g)]
            for r in runs:
                x = sub[sub["run"] == r].sort_values("progress")
                if x.empty:
                    continue
                iqr_band(ax, x["progress"], x["q25"], x["q75"], colors[r])
                ax.plot(x["progress"], x["median"], color=colors[r], marker=GROUP_MARKERS.get(g, "o"), label=r)
            ax.set_title(f"{_group_title(g)}: {_ALIGN_TITLES.get(m, m)}")
            ax.set_ylabel(_ALIGN_LABELS.get(m, m) if j == 0 else "")
            if i == len(metrics) - 1:
                ax.set_xlabel(f"training progress (step / {ref_name} step)")
            percent_axis(ax, "x")
            if not ax.get_lines():
                no_data(ax)
    fig_legend(fig, axes, title="run")
    fig.suptitle(f"Early directions vs the {ref_name} update, {runs_title(runs)} (median over matrices, band = IQR)"
                 + ("" if final else " — reference steps: " + ", ".join(f"{r} {refs[r]}" for r in runs)))
    return fig


def checkpoint_runs(report: Any) -> list[str]:
    """The runs whose alignment.csv rows are a checkpoint analysis beside their sketch series: those whose
    alignment.csv holds other steps than sketch_alignment.csv (an analysis of the sketch series itself writes both
    with the same steps; its dots would only repeat the line)."""
    t = as_tables(report).tables
    sk, al = t.get("sketch_alignment"), t.get("alignment")
    if sk is None or al is None or sk.empty or al.empty:
        return []
    out = []
    for r, d in al.groupby(al["run"].astype(str)):
        s_steps = set(sk.loc[sk["run"].astype(str) == r, "step"].astype(int))
        if s_steps and set(d["step"].astype(int)) != s_steps:
            out.append(r)
    return out


@styled
def plot_step_alignment(report: Any, metrics: Sequence[str] = ("subspace_overlap_u", "rank1_cosine"),
                        groups: Sequence[str] = MATRIX_GROUPS) -> Figure:
    """Alignment to the final update at every recorded step: lines from the runs' sketch series
    (sketch_alignment.csv, which `lab run` and `analyze` of a sketch series write), dots from a checkpoint
    analysis (alignment.csv) of the same run where the tables hold one (`checkpoint_runs`), so the early steps
    between checkpoints, where lock-in happens, are seen. Median over matrices, band = IQR."""
    t = as_tables(report).tables
    d = alignment_curves({"alignment": require_table(t, "sketch_alignment")}, metrics, groups)
    with_ck = checkpoint_runs(t)
    ck = alignment_curves({"alignment": t["alignment"]}, metrics, groups) if with_ck else None
    runs = order_runs(d["run"].unique())
    colors = run_colors(runs)
    fig, axes = new_figure(len(metrics), len(groups), sharex=True, sharey="row")
    for i, m in enumerate(metrics):
        for j, g in enumerate(groups):
            ax = axes[i, j]
            for r in runs:
                x = d[(d["metric"] == m) & (d["group"] == g) & (d["run"] == r)].sort_values("step")
                if x.empty:
                    continue
                iqr_band(ax, x["step"], x["q25"], x["q75"], colors[r])
                ax.plot(x["step"], x["median"], color=colors[r], label=f"{r}, every recorded step")
                c = None if ck is None or r not in with_ck else \
                    ck[(ck["metric"] == m) & (ck["group"] == g) & (ck["run"] == r)]
                if c is not None and not c.empty:
                    ax.plot(c["step"], c["median"], color=colors[r], marker="o", linestyle="none",
                            label=f"{r}, checkpoints")
            ax.set_title(f"{_group_title(g)}: {_ALIGN_TITLES.get(m, m)}")
            ax.set_ylabel(_ALIGN_LABELS.get(m, m) if j == 0 else "")
            if i == len(metrics) - 1:
                ax.set_xlabel("training step")
            if not ax.get_lines():
                no_data(ax)
    fig_legend(fig, axes, title="run")
    fig.suptitle(f"Alignment to the final update at every recorded step, {runs_title(runs)} (median over "
                 "matrices, band = IQR)")
    return fig


def segment_curves(report: Any, groups: Sequence[str] = MATRIX_GROUPS) -> pd.DataFrame:
    """Per run, group, step and metric (segments.csv's columns): median and quartiles over matrices, and
    progress = step / the run's last step."""
    cols = ["segment_cosine", "direction_cosine", "null_cosine"]
    s = require_table(report, "segments", ["run", "step", "group", *cols])
    out = _quartiles(s[s["group"].isin(groups)], cols, ["run", "group", "step"])
    out["progress"] = out["step"].astype(float) / out.groupby("run")["step"].transform("max").astype(float)
    return out


def has_direction_cosine(report: Any) -> bool:
    """Whether segments.csv holds cos(ΔW_t, ΔW_T) (a sketch series' analysis leaves it empty)."""
    s = as_tables(report).tables.get("segments")
    return s is not None and "direction_cosine" in s.columns and bool(numeric(s["direction_cosine"]).size) and \
        bool(np.isfinite(numeric(s["direction_cosine"])).any())


@styled
def plot_foresight(report: Any, groups: Sequence[str] = MATRIX_GROUPS) -> Figure:
    """Does the update find its final direction early? Top: cos(ΔW_t, ΔW_T) against its random-walk null (dashed:
    sqrt(Σ_{i≤t}‖δ_i‖²/Σ_{i≤T}‖δ_i‖²) from each matrix's measured segment norms, √(t/T) only for equal segments);
    above the null is foresight, on it a random walk. Bottom: the cosine between consecutive update
    segments (1 on a straight path, about 0 for a random walk). Median over matrices, band = IQR. Where
    segments.csv holds no cos(ΔW_t, ΔW_T) (a sketch series), only the segment cosines are drawn."""
    d = segment_curves(report, groups)
    runs = order_runs(d["run"].unique())
    colors = run_colors(runs)
    rows = ("direction_cosine", "segment_cosine") if has_direction_cosine(report) else ("segment_cosine",)
    fig, axes = new_figure(len(rows), len(groups), sharex=True, sharey="row")
    for j, g in enumerate(groups):
        for i, m in enumerate(rows):
            ax = axes[i, j]
            for r in runs:
                x = d[(d["metric"] == m) & (d["group"] == g) & (d["run"] == r)].dropna(subset=["median"])
                x = x.sort_values("progress")
                if x.empty:
                    continue
                iqr_band(ax, x["progress"], x["q25"], x["q75"], colors[r])
                ax.plot(x["progress"], x["median"], color=colors[r], marker=GROUP_MARKERS.get(g, "o"), label=r)
                if m == "direction_cosine":
                    z = d[(d["metric"] == "null_cosine") & (d["group"] == g) & (d["run"] == r)].sort_values("progress")
                    ax.plot(z["progress"], z["median"], color=colors[r], ls="--", lw=1, alpha=0.8)
            ax.set_title(f"{_group_title(g)}: " + ("to the final update (dashed: random-walk null)"
                                                    if m == "direction_cosine" else "consecutive segments"))
            ax.set_ylabel("cos(ΔW$_t$, ΔW$_T$)" if m == "direction_cosine" else "cos(δ$_i$, δ$_{i+1}$)")
            if i == len(rows) - 1:
                ax.set_xlabel("training progress (step / last step)")
            percent_axis(ax, "x")
            if not ax.get_lines():
                no_data(ax)
    fig_legend(fig, axes, title="run")
    fig.suptitle(f"Foresight, {runs_title(runs)}: " + ("alignment to the final update vs a random walk, and "
                                                        "straightness of the path" if len(rows) == 2 else
                                                        "straightness of the path"))
    return fig


#: what trajectory_shape draws per layer
TRAJECTORY_METRICS = {"linear_r2": "linear-fit R² (pooled)", "rank1_share": "rank-1 share of the trajectory"}


@styled
def plot_trajectory_shape(report: Any, groups: Sequence[str] = MATRIX_GROUPS) -> Figure:
    """Per layer (x) and group (columns): the per-entry linear fit's pooled R² (RLVR-Linearity) and the rank-1
    share of the stacked updates (RELEX), mean over the layer's matrices, one line per run. The layer axis spans
    the layers shown; with one checkpoint per run both are 1 by construction, which the panels say."""
    t = require_table(report, "trajectory", ["run", "layer", "group", "linear_r2", "rank1_share"])
    t = t[t["group"].isin(groups) & t["layer"].notna()]
    if t.empty:
        raise InputError("trajectory.csv", "has no per-layer attention or MLP rows")
    runs = order_runs(t["run"].unique())
    colors = run_colors(runs)
    layers = sorted(int(v) for v in t["layer"].unique())
    one_step = "n_steps" in t.columns and bool((numeric(t["n_steps"]) <= 1).all())
    fig, axes = new_figure(len(TRAJECTORY_METRICS), len(groups), sharex=True, sharey="row")
    for i, (m, label) in enumerate(TRAJECTORY_METRICS.items()):
        for j, g in enumerate(groups):
            ax = axes[i, j]
            for r in runs:
                x = t[(t["group"] == g) & (t["run"] == r)]
                x = x.assign(v=numeric(x[m]), layer=x["layer"].astype(int))
                x = x.groupby("layer")["v"].mean().sort_index()
                if len(x):
                    ax.plot(x.index.astype(int), x.to_numpy(), color=colors[r], marker=GROUP_MARKERS.get(g, "o"),
                            label=r)
            ax.set_title(f"{_group_title(g)}: {label}")
            ax.set_ylabel(label if j == 0 else "")
            ax.set_ylim(-0.02, 1.02)
            layer_axis(ax, layers)
            if i == len(TRAJECTORY_METRICS) - 1:
                ax.set_xlabel("layer")
            if not ax.get_lines():
                no_data(ax)
            elif one_step:
                ax.text(0.5, 0.08, "one checkpoint per run: 1 by construction", ha="center", va="bottom",
                        transform=ax.transAxes, fontsize=8, color="0.35")
    fig_legend(fig, axes, title="run")
    fig.suptitle(f"How straight and how low-rank each layer's trajectory is: {runs_title(runs)}")
    return fig

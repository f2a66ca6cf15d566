"""Each figure's caption from the tables it is drawn from: the runs shown by name (with a kind only where the
provenance states it, `plotting.runs`), the steps, the layers, and only what the tables hold (the window accuracy
only with window.csv rows of these runs, dots only where a checkpoint analysis is drawn, a statistic only when
measured). One function per figure of `render.FIGURES`, each taking `Tables`."""

from __future__ import annotations

import numpy as np

from opd_dynamics.io.naming import MATRIX_GROUPS, natural_key
from opd_dynamics.plotting.allocation import (
    embedding_cosines,
    embedding_series,
    group_values,
    layer_norms,
    near_one,
    window_table,
)
from opd_dynamics.plotting.direction import (
    _ALIGN_TITLES,
    TABLE1_LABELS,
    alignment_curves,
    checkpoint_runs,
    from_sketches,
    has_direction_cosine,
    table1_rows,
)
from opd_dynamics.plotting.runs import and_list, run_kinds, runs_caption
from opd_dynamics.plotting.style import GROUP_ORDER, order_runs
from opd_dynamics.plotting.tables import Tables, as_bool, at_step, numeric, steps_of

_STAT_WORDS = {"cosine_mean": "mean", "cosine_p5": "5th percentile", "cosine_tokens_mean": "mean over the token set"}
_PLAIN = {"spectral_norm": "σ1", "spectral_ratio": "σ1/‖ΔW‖F", "effective_rank": "the effective rank",
          "top1pct_norm_ratio": "the top-1% norm ratio"}


def _who(t: Tables, runs, steps=None) -> str:
    return runs_caption(order_runs(runs), run_kinds(t), steps)


def _layers(values) -> str:
    v = sorted({int(x) for x in values})
    return f"layer {v[0]}" if len(v) == 1 else f"layers {v[0]}–{v[-1]}"


def _num(x: float) -> str:
    return f"{x:g}"


def eval_curves(t: Tables) -> str:
    e = t.tables["eval"]
    runs = e["run"].astype(str).unique()
    sampled = "accuracy_sampled" in e.columns and e["accuracy_sampled"].notna().any()
    kl = "reverse_kl" in e.columns and e["reverse_kl"].notna().any()
    steps = e["step"].astype(int)
    return (f"Held-out accuracy (greedy{'; dashed: sampled at T = 1' if sampled else ''})"
            + (" and, right, the reverse KL to the teacher on the student's samples" if kl else "")
            + f" against the optimizer step (steps {steps.min()}–{steps.max()}), {_who(t, runs)}.")


def allocation_heatmap(t: Tables, metric: str = "update_norm") -> str:
    a = t.tables["module_allocation"]
    a = at_step(a[a["layer"].notna() & a["group"].isin(list(MATRIX_GROUPS))], None)
    runs = order_runs(a["run"].unique())
    what = {"update_norm": "Update norm ‖ΔW‖F",
            "energy_share": ("Share of the run's update energy" if len(runs) == 1 else
                             "Share of each run's update energy") + " (‖ΔW‖F² over every analysed tensor)",
            "relative_update": "Relative update ‖ΔW‖F / ‖W0‖F"}[metric]
    scale = "" if len(runs) == 1 else "; one colour scale for both panels" if len(runs) == 2 else \
        "; one colour scale for all panels"
    return (f"{what} of each attention and MLP matrix by layer ({_layers(a['layer'])}, rows) and module, "
            f"{_who(t, runs, steps_of(a))}{scale}.")


def allocation_heatmap_share(t: Tables) -> str:
    return allocation_heatmap(t, "energy_share")


def layer_norms_caption(t: Tables) -> str:
    g = layer_norms(t)
    runs = order_runs(g["run"].unique())
    win = window_table(t, runs)
    out = (f"As the paper's Fig. 2b: the update norm ‖ΔW‖F per layer ({_layers(g['layer'])}) of the attention and of "
           f"the MLP matrices (the quadrature sum over the group's matrices), {_who(t, runs, steps_of(g))}")
    if win is not None:
        out += ("; dashed, right axis: held-out accuracy with only a window of layers around each layer trained, the "
                f"rest at base (window.csv), {and_list(order_runs(win['run'].unique()))}")
    return out + "."


def group_energy(t: Tables) -> str:
    g = group_values(t, "energy_share")
    groups = sorted(g["group"].unique(), key=lambda x: GROUP_ORDER.index(x) if x in GROUP_ORDER else 99)
    return (f"Share of the update energy ‖ΔW‖F² in each parameter group ({', '.join(groups)}), "
            f"{_who(t, g['run'].unique(), steps_of(g))}.")


def embedding_cosine(t: Tables) -> str:
    e, metrics = embedding_cosines(t)
    runs = order_runs(e["run"].unique())
    tensors = sorted(dict.fromkeys(e["tensor"].astype(str)), key=natural_key)
    near = {n: near_one([v for vs in embedding_series(e, n, runs, metrics).values() for v in vs]) for n in tensors}
    out = (f"Cosine between each base and trained embedding row ({and_list([_STAT_WORDS[m] for m in metrics])} "
           f"over rows) of {and_list(tensors)}, {_who(t, runs, steps_of(e))}")
    if all(near.values()):
        out += "; every value lies within 0.001 of 1, so the bars show 1 − cosine"
    elif any(near.values()):
        out += f"; the values of {and_list([n for n in tensors if near[n]])} lie within 0.001 of 1: shown as 1 − cosine"
    return out + "."


def embedding_swap(t: Tables) -> str:
    e = t.tables["embedding_swap"]
    variants = list(dict.fromkeys(e["variant"].astype(str)))
    return f"Held-out accuracy of {_who(t, e['run'].unique())} with each embedding variant ({', '.join(variants)})."


def scaling(t: Tables) -> str:
    s = t.tables["scaling"]
    al = numeric(s["alpha"])
    return (f"Held-out accuracy against the norm of the α-scaled update W0 + αΔW (α from {_num(np.nanmin(al))} to "
            f"{_num(np.nanmax(al))}), {_who(t, s['run'].unique())} (the paper's Fig. 1).")


def rank_recovery(t: Tables) -> str:
    d = t.tables["rank"]
    pct = numeric(d["pct"])
    if np.nanmax(pct) <= 1.0:
        pct = pct * 100
    resc = as_bool(d["rescaled"]).any() if "rescaled" in d.columns else False
    return (f"Held-out accuracy of {_who(t, d['run'].unique())} keeping only the top-k % (left) or bottom-k % "
            f"(right) singular components of each matrix's update, k = {', '.join(_num(x) for x in sorted(set(pct)))}"
            + ("; dashed: rescaled to the full update's norm" if resc else "") + ".")


def rescale(t: Tables) -> str:
    d = t.tables["rescale"]
    runs = order_runs(d["run"].unique())
    ev = t.tables.get("eval")
    as_trained = ev is not None and {"run", "step", "accuracy"} <= set(ev.columns) and bool(
        (ev["run"].astype(str).isin(runs) & ev["step"].isin(d["step"].unique())).any())
    return (f"Held-out accuracy of {_who(t, runs)} with an intermediate step's update rescaled module by module to "
            f"the final step's norms: at the best β per step (left"
            + ("; dotted: the checkpoint as trained, from eval.csv" if as_trained else "")
            + f"), and over β = {', '.join(_num(x) for x in sorted(set(numeric(d['beta']))))} (right).")


def singular_values(t: Tables) -> str:
    s = at_step(t.tables["singular_values"], None)
    return ("Singular values σi / ‖ΔW‖F of the attention and MLP updates against i (median over matrices, band: "
            f"interquartile range), {_who(t, s['run'].unique(), steps_of(s))}.")


def table1(t: Tables) -> str:
    d = table1_rows(t)
    runs = order_runs(d["run"].unique())
    shown = [m for m in TABLE1_LABELS if m in set(d["metric"])]
    empty = [m for m in shown if not np.isfinite(numeric(d.loc[d["metric"] == m, "value"])).any()]
    out = (f"The paper's Table-1 aggregates, the mean over the attention and MLP matrices of "
           f"{and_list([_PLAIN[m] for m in shown if m not in empty])}, {_who(t, runs, steps_of(d))}")
    if empty:
        why = "a sketch series keeps the top k only" if from_sketches(t, runs) else "--svd exact computes it"
        out += f"; {and_list([_PLAIN[m] for m in empty])} is not in these tables (it needs the whole spectrum: {why})"
    return out + "."


def alignment(t: Tables) -> str:
    d = alignment_curves(t)
    runs = order_runs(d["run"].unique())
    refs = d.groupby("run")["ref_step"].max()
    final = all(refs[r] == d[d["run"] == r]["step"].max() for r in runs)
    ref = "the final update's (each run's last step)" if final else "the update at the reference step (" + ", ".join(
        f"{r}: step {refs[r]}" for r in runs) + ")"
    return (f"Alignment of each step's top singular directions with {ref}, the paper's Fig. 4b: "
            f"{and_list([_ALIGN_TITLES[m] for m in ('paired_cosine', 'subspace_overlap_u')])} against training "
            f"progress, median over matrices (band: interquartile range), {_who(t, runs)}.")


def step_alignment(t: Tables) -> str:
    sk = t.tables["sketch_alignment"]
    runs = order_runs(sk["run"].unique())
    steps = sk["step"].astype(int)
    ck = [r for r in runs if r in checkpoint_runs(t)]
    return (f"Alignment to the last recorded step at every recorded step (steps {steps.min()}–{steps.max()}) of the "
            f"sketch series of {_who(t, runs)}: the top-k left-subspace overlap and the rank-1 cosine, median over "
            "matrices (band: interquartile range)"
            + (f"; dots: the checkpoint analysis of {and_list(ck)} (alignment.csv)" if ck else "") + ".")


def foresight(t: Tables) -> str:
    s = t.tables["segments"]
    who = _who(t, s["run"].unique())
    seg = "the cosine between consecutive update segments (1 on a straight path, about 0 for a random walk)"
    if has_direction_cosine(t):
        return (f"Top: cos(ΔW_t, ΔW_T) of each step's update to the last step's, against its random-walk null from "
                f"each matrix's measured segment norms (dashed); bottom: {seg}; median over matrices, {who}.")
    return (f"{seg[0].upper() + seg[1:]}, median over matrices, {who}. The alignment to the final update, "
            "cos(ΔW_t, ΔW_T), is not drawn: segments.csv leaves it empty (a sketch series does not determine it).")


def trajectory_shape(t: Tables) -> str:
    d = t.tables["trajectory"]
    d = d[d["group"].isin(list(MATRIX_GROUPS)) & d["layer"].notna()]
    out = (f"Per layer ({_layers(d['layer'])}): the per-entry linear fit's pooled R² and the rank-1 share of the "
           f"stacked updates, mean over the layer's matrices, {_who(t, d['run'].unique())}")
    if "n_steps" in d.columns:
        n = sorted({int(x) for x in numeric(d["n_steps"]) if np.isfinite(x)})
        if len(n) == 1:
            out += f", from {n[0]} checkpoint{'s' if n[0] != 1 else ''} per run"
            if n[0] <= 1:
                out += " (both are 1 by construction)"
    return out + "."


def probe(t: Tables) -> str:
    p = t.tables["probe"]
    pairs = p[["step_from", "step"]].drop_duplicates().sort_values(["step", "step_from"])
    return (f"Line probe of {_who(t, p['run'].unique())}: the score of W_t + c·(W_t − W_s) against c for the pairs "
            f"(s → t) {', '.join(f'{int(a)} → {int(b)}' for a, b in pairs.itertuples(index=False))}; shaded: "
            "0.5 ≤ c ≤ 2, where EffOPD's first candidates lie.")


def effopd_curves(t: Tables) -> str:
    from opd_dynamics.plotting.effopd import _METHOD_ORDER

    c = t.tables["effopd_curves"]
    methods = sorted(c["method"].astype(str).unique(),
                     key=lambda m: (_METHOD_ORDER.index(m) if m in _METHOD_ORDER else 9, m))
    n = c["seed"].nunique()
    return (f"Held-out accuracy against optimizer steps (left) and wall-clock seconds (right) of {and_list(methods)}, "
            f"{n} seed{'s' if n != 1 else ''}: faint lines the seeds, bold the median"
            + ("; dotted: the target, 95 % of vanilla's final accuracy" if "vanilla" in methods else "") + ".")


def extrapolation(t: Tables) -> str:
    d = t.tables["extrapolation"]
    methods = list(dict.fromkeys(d["method"].astype(str)))
    fr = sorted(set(numeric(d["fraction"])))
    n = d["seed"].nunique()
    return (f"Share of the accuracy gain of {_who(t, d['run'].unique())} that each extrapolator "
            f"({', '.join(methods)}) recovers from the first {and_list([f'{x:.0%}' for x in fr])} of training, beside "
            f"the run itself at its last observed step; mean over {n} seed{'s' if n != 1 else ''}, bars: sd.")


#: figure name → caption function
CAPTIONS = {
    "eval_curves": eval_curves, "allocation_heatmap": allocation_heatmap,
    "allocation_heatmap_share": allocation_heatmap_share, "layer_norms": layer_norms_caption,
    "group_energy": group_energy, "embedding_cosine": embedding_cosine, "embedding_swap": embedding_swap,
    "scaling": scaling, "rank_recovery": rank_recovery, "rescale": rescale, "singular_values": singular_values,
    "table1": table1, "alignment": alignment, "step_alignment": step_alignment, "foresight": foresight,
    "trajectory_shape": trajectory_shape, "probe": probe, "effopd_curves": effopd_curves,
    "extrapolation": extrapolation,
}

"""Every figure function renders from small tables built to the CSV schemas, with the expected series."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from opd_dynamics import plotting as P  # noqa: E402
from opd_dynamics.errors import InputError  # noqa: E402
from opd_dynamics.plotting.allocation import heatmap_matrix  # noqa: E402

RUNS = ("opd", "grpo")
LAYERS = 4
STEPS = (10, 20, 40)
MODULES = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
ID = ["run", "step", "tensor", "layer", "group", "module", "expert"]


def _matrices():
    """(tensor, layer, group, module) for every analysed tensor of the toy model."""
    out = [("model.embed_tokens.weight", None, "embedding", "embed_tokens")]
    for layer in range(LAYERS):
        for group, mods in MODULES.items():
            sub = "self_attn" if group == "attention" else "mlp"
            out += [(f"model.layers.{layer}.{sub}.{m}.weight", layer, group, m) for m in mods]
        out.append((f"model.layers.{layer}.input_layernorm.weight", layer, "norm", "input_layernorm"))
    out.append(("lm_head.weight", None, "lm_head", "lm_head"))
    return out


def make_tables(seed: int = 0) -> dict[str, pd.DataFrame]:
    """Small tables following the CSV schemas exactly: two runs (opd, grpo), 4 layers, 3 steps."""
    rng = np.random.default_rng(seed)
    alloc, spec, sv, align, emb = [], [], [], [], []
    for run in RUNS:
        for step in STEPS:
            rows = []
            for tensor, layer, group, module in _matrices():
                depth = 0.0 if layer is None else 1 - abs(layer - (LAYERS - 1) / 2) / LAYERS
                scale = (0.3 + depth) if run == "opd" else 1.0
                scale *= step / STEPS[-1] * (0.5 if group == "attention" else 1.0)
                f = float(scale * (1 + 0.1 * rng.random()))
                rows.append(dict(run=run, step=step, tensor=tensor, layer=layer, group=group, module=module,
                                 expert=None, shape="[64, 64]" if group != "norm" else "[64]", numel=4096,
                                 update_norm=f, base_norm=8.0, relative_update=f / 8.0, rms_update=f / 64.0,
                                 energy_share=0.0, changed_fraction=0.5, finite=True))
            tot = sum(r["update_norm"] ** 2 for r in rows)
            for r in rows:
                r["energy_share"] = r["update_norm"] ** 2 / tot
            alloc += rows
            for r in rows:
                if r["group"] not in ("attention", "mlp"):
                    continue
                decay = 0.5 if run == "opd" else 0.75
                s = decay ** np.arange(64) * r["update_norm"]
                s = s / np.sqrt((s ** 2).sum()) * r["update_norm"]
                e = np.cumsum(s ** 2) / (s ** 2).sum()
                p = s / s.sum()
                idn = {k: r[k] for k in ID}
                spec.append(dict(**idn, spectral_norm=s[0], spectral_ratio=s[0] / r["update_norm"],
                                 stable_rank=(r["update_norm"] / s[0]) ** 2,
                                 effective_rank=float(np.exp(-(p * np.log(p)).sum())),
                                 top1pct_norm_ratio=float(np.sqrt(e[0])), energy_top1=e[0], energy_top4=e[3],
                                 energy_top16=e[15], energy_top64=e[63], rank90=int(np.searchsorted(e, 0.9) + 1),
                                 svd_method="exact-gram-f64"))
                sv += [dict(**idn, index=i + 1, sigma=s[i], sigma_normalized=s[i] / r["update_norm"])
                       for i in range(64)]
                base = 0.9 if run == "opd" else 0.5
                prog = step / STEPS[-1]
                align.append(dict(run=run, step=step, ref_step=STEPS[-1], **{k: r[k] for k in ID[2:]}, k=16,
                                  subspace_overlap_u=min(1.0, base * 0.8 + 0.2 * prog), subspace_overlap_v=0.5,
                                  max_principal_angle_deg=30.0, paired_cosine=min(1.0, base + (1 - base) * prog),
                                  rank1_cosine=0.9, direction_cosine=0.8))
            emb.append(dict(run=run, step=step, tensor="model.embed_tokens.weight", n_rows=100, resized=False,
                            cosine_mean=0.98 if run == "opd" else 0.94, cosine_p5=0.95 if run == "opd" else 0.9,
                            cosine_min=0.8, cosine_tokens_mean=np.nan))
    a = pd.DataFrame(alloc)
    summary = []
    for (run, step), d in a.groupby(["run", "step"]):
        for g, dg in d.groupby("group"):
            summary.append(dict(run=run, step=step, aggregate="group", group=g, layer=None, metric="update_norm",
                                value=float(np.sqrt((dg["update_norm"] ** 2).sum()))))
            summary.append(dict(run=run, step=step, aggregate="group", group=g, layer=None, metric="energy_share",
                                value=float(dg["energy_share"].sum())))
        for (layer, g), dg in d[d["group"].isin(["attention", "mlp"])].groupby(["layer", "group"]):
            summary.append(dict(run=run, step=step, aggregate="layer", group=g, layer=int(layer),
                                metric="update_norm", value=float(np.sqrt((dg["update_norm"] ** 2).sum()))))
    sp = pd.DataFrame(spec)
    for (run, step), d in sp.groupby(["run", "step"]):
        for m in ("spectral_norm", "spectral_ratio", "effective_rank", "top1pct_norm_ratio"):
            summary.append(dict(run=run, step=step, aggregate="table1", group="attention+mlp", layer=None,
                                metric=m, value=float(d[m].mean())))
    ev = pd.DataFrame([dict(run=r, step=s, accuracy=(0.3 + 0.5 * s / 40) if r == "opd" else 0.3 + 0.3 * s / 40,
                            accuracy_sampled=0.2 + 0.4 * s / 40, reverse_kl=1.0 / (s + 5))
                       for r in RUNS for s in (0,) + STEPS])
    scaling = pd.DataFrame([dict(run=r, alpha=al, update_norm=al * (10.0 if r == "opd" else 20.0),
                                 accuracy=0.3 + al * (0.5 if r == "opd" else 0.3)) for r in RUNS
                            for al in (0.0, 0.25, 0.5, 0.75, 1.0)])
    window = pd.DataFrame([dict(run=r, center_layer=c, first_layer=max(0, c - 1), last_layer=min(LAYERS - 1, c + 1),
                                group=g, accuracy=0.3 + 0.1 * c) for r in RUNS for g in ("attention", "mlp")
                           for c in range(LAYERS)])
    rank = pd.DataFrame([dict(run=r, side=side, pct=p, rescaled=resc, accuracy=0.3 + 0.004 * p)
                         for r in RUNS for side in ("top", "bottom") for resc in (False, True)
                         for p in (1, 10, 50, 100)])
    rescale = pd.DataFrame([dict(run=r, step=s, beta=b, accuracy=0.3 + 0.1 * b + s / 200) for r in RUNS
                            for s in STEPS[:-1] for b in (0.0, 0.5, 1.0)])
    swap = pd.DataFrame([dict(run=r, variant=v, accuracy=0.7 if v == "trained" else 0.68) for r in RUNS
                         for v in ("trained", "embeddings_at_base")])
    curves = pd.DataFrame([dict(seed=seed_, method=m, step=s,
                                accuracy=min(0.9, 0.3 + s * (0.03 if m != "vanilla" else 0.01)),
                                wall_s=s * 2.0 + (5 if m != "vanilla" else 0))
                           for seed_ in (0, 1) for m in ("vanilla", "effopd", "fixed") for s in range(0, 65, 8)])
    summ = pd.DataFrame([dict(seed=seed_, method=m, steps_to_target=64 if m == "vanilla" else 24,
                              final_accuracy=0.9, wall_s=130.0, validation_s=0.0 if m == "vanilla" else 5.0)
                         for seed_ in (0, 1) for m in ("vanilla", "effopd", "fixed")])
    probe = pd.DataFrame([dict(run=r, step_from=s_, step=t, coef=c, score=0.5 + (0.05 if r == "opd" else -0.05) * c)
                          for r in RUNS for s_, t in ((4, 8), (8, 16)) for c in (-0.5, 0.0, 0.5, 1.0, 2.0)])
    extrap = pd.DataFrame([dict(seed=seed_, run=r, fraction=f, method=m,
                                gain_recovered=(f if m == "relex" else -f) * (1 + seed_), observed_gain=2 * f)
                           for seed_ in (0, 1) for r in RUNS for f in (0.1, 0.2, 0.4) for m in ("linear", "relex")])
    mats = a[a["group"].isin(["attention", "mlp"])]
    seg = pd.DataFrame([dict(**{k: r[k] for k in ID}, segment_cosine=np.nan if r["step"] == STEPS[-1] else
                             (0.8 if r["run"] == "opd" else 0.05),
                             direction_cosine=(0.9 if r["run"] == "opd" else 0.55) ** (1 - r["step"] / STEPS[-1]),
                             null_cosine=np.sqrt(r["step"] / STEPS[-1]), direction_excess=0.0)
                        for _, r in mats.iterrows()])
    seg["direction_excess"] = seg["direction_cosine"] - seg["null_cosine"]
    last = mats[mats["step"] == STEPS[-1]]
    traj = pd.DataFrame([dict(**{k: r[k] for k in ID}, n_steps=len(STEPS),
                              linear_r2=0.9 if r["run"] == "opd" else 0.5, linear_r2_median=0.85,
                              rank1_share=0.95 if r["run"] == "opd" else 0.7, rank2_share=0.98, rank3_share=0.99,
                              rank4_share=1.0, rank5_share=1.0, lockin_step=STEPS[0] if r["run"] == "opd" else None)
                         for _, r in last.iterrows()])
    return dict(module_allocation=a, spectrum=sp, singular_values=pd.DataFrame(sv), alignment=pd.DataFrame(align),
                embedding=pd.DataFrame(emb), summary=pd.DataFrame(summary), eval=ev, scaling=scaling, window=window,
                rank=rank, rescale=rescale, embedding_swap=swap, effopd_curves=curves, effopd_summary=summ,
                trajectory=traj, segments=seg, probe=probe, extrapolation=extrap,
                sketch_alignment=pd.concat([pd.DataFrame(align).query(f"step == {STEPS[-1]}").assign(step=s)
                                            for s in range(1, STEPS[-1] + 1)], ignore_index=True))


def write_dirs(tmp_path, tables=None):
    """Write the tables as an analysis dir, a lab dir (opd/ grpo/ eval + interventions) and an effopd dir."""
    tables = tables or make_tables()
    analysis, lab, eff = tmp_path / "analysis", tmp_path / "lab", tmp_path / "effopd"
    for d in (analysis, lab / "opd", lab / "grpo", eff):
        d.mkdir(parents=True)
    for n in ("module_allocation", "spectrum", "singular_values", "alignment", "embedding", "summary", "trajectory",
              "segments"):
        tables[n].to_csv(analysis / f"{n}.csv", index=False)
    (analysis / "run.json").write_text(json.dumps({
        "version": "0.1.0", "command": "opd-dynamics analyze --run opd=a --run grpo=b --base s --out x",
        "python": "3.11.9", "torch": "2.13.0",
        "inputs": [{"run": r, "base": "/runs/student_init", "base_header_sha256": "ab" * 32, "base_bytes": 1000,
                    "steps": [{"step": st, "path": f"/runs/{r}/checkpoint-{st}", "header_sha256": "cd" * 32,
                               "bytes": 1000} for st in STEPS], "tensors": 31, "bytes_to_read": 4000}
                   for r in RUNS],
        "timings_s": {"plan": 0.1, "total": 1.5, "tensor_compute_sum": 2.5},
        "skipped": [{"tensor": "model.rotary_emb.inv_freq", "reason": "not in the base <checkpoint>"}],
        "failed": []}))
    (lab / "lab.json").write_text(json.dumps({"preset": "smoke", "seed": 0, "timings_s": {"teacher": 30.0}}))
    for r in ("opd", "grpo"):
        ev = tables["eval"]
        ev[ev["run"] == r].to_csv(lab / r / "eval.csv", index=False)
    for n in ("scaling", "window", "rank", "rescale", "embedding_swap", "sketch_alignment"):
        tables[n].to_csv(lab / f"{n}.csv", index=False)
    for n in ("effopd_curves", "effopd_summary", "probe", "extrapolation"):
        tables[n].to_csv(eff / f"{n}.csv", index=False)
    return [analysis, lab, eff]


@pytest.fixture(scope="module")
def tables():
    return make_tables()


def _legend_texts(fig) -> list[str]:
    texts = []
    for ax in fig.axes:
        leg = ax.get_legend()
        if leg is not None:
            texts += [t.get_text() for t in leg.get_texts()]
    for leg in fig.legends:
        texts += [t.get_text() for t in leg.get_texts()]
    return texts


def _labelled_lines(ax) -> list:
    return [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]


def _line_color(fig, startswith: str) -> set[str]:
    return {to_hex(ln.get_color()) for ax in fig.axes for ln in ax.get_lines()
            if ln.get_label().startswith(startswith)}


def _bar_color(fig, label: str) -> set[str]:
    return {to_hex(c.patches[0].get_facecolor()) for ax in fig.axes for c in ax.containers if c.get_label() == label}


def _has_both_runs(fig) -> None:
    text = " ".join(_legend_texts(fig))
    assert "opd" in text and "grpo" in text


def test_heatmap_shape_is_layers_by_modules(tables):
    fig = P.plot_allocation_heatmap(tables)
    heat_axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in heat_axes] == ["opd (step 40)", "grpo (step 40)"]
    n_mod = sum(len(m) for m in MODULES.values())
    for ax in heat_axes:
        mesh = ax.collections[0]
        assert np.asarray(mesh.get_array()).reshape(LAYERS, n_mod).shape == (LAYERS, n_mod)
        assert mesh.get_array().size == LAYERS * n_mod
        assert [t.get_text() for t in ax.get_xticklabels()] == ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"]
    # the drawn numbers are the table's: layer 2 down_proj of opd at the last step
    m = heatmap_matrix(tables, "opd")
    a = tables["module_allocation"]
    want = a[(a.run == "opd") & (a.step == 40) & (a.layer == 2) & (a.module == "down_proj")]["update_norm"].item()
    assert m.loc[2, "down_proj"] == pytest.approx(want)
    np.testing.assert_allclose(np.asarray(heat_axes[0].collections[0].get_array()).ravel(), m.to_numpy().ravel())


def _alloc(rows):
    return pd.DataFrame([dict(run="opd", step=1, tensor=t, layer=0, group=g, module=m, expert=None,
                              update_norm=v, base_norm=1.0, energy_share=np.nan) for t, g, m, v in rows])


def test_heatmap_keeps_same_named_modules_apart_and_non_finite_cells_empty():
    """GPT-2 names both its attention and its MLP output projection c_proj; a NaN update is not 'no update'."""
    a = _alloc([("h.0.attn.c_proj.weight", "attention", "c_proj", 3.0), ("h.0.mlp.c_proj.weight", "mlp", "c_proj", 4.0),
                ("h.0.mlp.c_fc.weight", "mlp", "c_fc", np.nan),
                ("h.0.mlp.experts.gate_up_proj", "mlp", "gate_up_proj", 1.0),
                ("h.0.mlp.experts.gate_up_proj", "mlp", "gate_up_proj", 2.0)])  # two experts: quadrature
    m = heatmap_matrix({"module_allocation": a}, "opd")
    assert list(m.columns) == ["attention.c_proj", "mlp.c_proj", "gate_up_proj", "c_fc"]
    row = m.loc[0]
    assert row["attention.c_proj"] == 3.0 and row["mlp.c_proj"] == 4.0
    assert row["gate_up_proj"] == pytest.approx(np.sqrt(5.0)) and np.isnan(row["c_fc"])
    a.loc[0, "update_norm"] = np.inf
    fig = P.plot_allocation_heatmap({"module_allocation": a})  # an infinite cell does not flatten the scale
    assert fig.axes[0].collections[0].get_clim() == (0.0, 4.0)


def test_a_figure_its_tables_cannot_feed_is_skipped_and_the_rest_drawn(tables, tmp_path):
    t = dict(tables)
    a = t["module_allocation"]
    t["module_allocation"] = a[a["group"] == "norm"]  # e.g. analyze --groups norm: layers, but no matrices
    res = P.plot_all(t, tmp_path / "figs", formats=("png",))
    assert "allocation_heatmap" in res.skipped and "per-layer rows" in res.skipped["allocation_heatmap"]
    assert (tmp_path / "figs" / "table1.png").exists()


def test_runs_of_the_same_name_in_two_directories_are_not_pooled(tables, tmp_path):
    d1 = write_dirs(tmp_path / "a", tables)[0]
    other = {k: v.copy() for k, v in tables.items()}
    other["module_allocation"]["update_norm"] *= 2
    d2 = write_dirs(tmp_path / "b", other)[0]
    with pytest.raises(InputError, match="module_allocation.csv: has different rows for run"):
        P.load_tables([d1, d2])
    assert len(P.load_tables([d1, d1]).tables["module_allocation"]) == len(tables["module_allocation"])


def test_alignment_axis_names_a_reference_step_that_is_not_the_last(tables):
    t = dict(tables)
    al = t["alignment"].copy()
    al["ref_step"] = 20
    t["alignment"] = al
    fig = P.plot_alignment(t)
    assert "step / reference step" in fig.axes[-1].get_xlabel() and "reference steps:" in fig._suptitle.get_text()
    assert "step / final step" in P.plot_alignment(tables).axes[-1].get_xlabel()


def test_heatmap_energy_share_and_chosen_step(tables):
    fig = P.plot_allocation_heatmap(tables, metric="energy_share", step=10)
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["opd (step 10)", "grpo (step 10)"]
    m = heatmap_matrix(tables, "grpo", metric="energy_share", step=10)
    a = tables["module_allocation"]
    sel = a[(a.run == "grpo") & (a.step == 10) & a.group.isin(["attention", "mlp"])]
    assert m.to_numpy().sum() == pytest.approx(sel["energy_share"].sum())
    with pytest.raises(InputError, match="step 11"):
        P.plot_allocation_heatmap(tables, step=11)


def test_layer_norms_with_window_twin_axis(tables):
    fig = P.plot_layer_norms(tables)
    main = [ax for ax in fig.axes if ax.get_xlabel() == "layer"]
    assert len(main) == 2
    for ax in main:
        assert len(_labelled_lines(ax)) == 2
        assert all(len(ln.get_xdata()) == LAYERS for ln in ax.get_lines())
    twins = [ax for ax in fig.axes if "window" in ax.get_ylabel()]
    assert len(twins) == 2 and all(len(ax.get_lines()) == 2 for ax in twins)
    _has_both_runs(fig)
    assert any("window accuracy" in t for t in _legend_texts(fig))
    # per-layer norm is the quadrature sum of the group's matrices
    a = tables["module_allocation"]
    sel = a[(a.run == "grpo") & (a.step == 40) & (a.layer == 1) & (a.group == "mlp")]
    grpo_mlp = [ln for ln in main[1].get_lines() if ln.get_label().startswith("grpo")][0]
    assert grpo_mlp.get_ydata()[1] == pytest.approx(np.sqrt((sel["update_norm"] ** 2).sum()))
    # without window.csv (or without module_allocation, from summary) it still draws
    t2 = {k: v for k, v in tables.items() if k not in ("window", "module_allocation")}
    fig2 = P.plot_layer_norms(t2)
    assert [len(_labelled_lines(ax)) for ax in fig2.axes] == [2, 2]


def test_group_energy_bars(tables):
    fig = P.plot_group_energy(tables)
    ax = fig.axes[0]
    assert [c.get_label() for c in ax.containers] == ["opd", "grpo"]
    groups = [t.get_text() for t in ax.get_xticklabels()]
    assert groups == ["attention", "mlp", "embedding", "lm_head", "norm"]
    assert len(ax.patches) == 2 * len(groups)
    assert sum(p.get_height() for p in ax.containers[0].patches) == pytest.approx(1.0)


def test_embedding_figures(tables):
    fig = P.plot_embedding_swap(tables)
    ax = fig.axes[0]
    assert [c.get_label() for c in ax.containers] == ["opd", "grpo"] and len(ax.patches) == 4
    fig = P.plot_embedding_cosine(tables)
    ax = fig.axes[0]
    assert [c.get_label() for c in ax.containers] == ["opd", "grpo"]
    assert len(ax.patches) == 4  # mean and p5 (token-set cosine is empty) × 2 runs
    assert ax.containers[0].patches[0].get_height() == pytest.approx(0.98)


def test_scaling_rank_rescale(tables):
    fig = P.plot_scaling(tables)
    lines = _labelled_lines(fig.axes[0])
    assert [ln.get_label() for ln in lines] == ["opd", "grpo"] and all(len(ln.get_xdata()) == 5 for ln in lines)
    fig = P.plot_rank_recovery(tables)
    for ax in fig.axes:
        assert sorted(ln.get_label() for ln in _labelled_lines(ax)) == ["grpo", "grpo (rescaled)", "opd",
                                                                        "opd (rescaled)"]
    frac = tables["rank"].assign(pct=tables["rank"]["pct"] / 100)  # pct given as fractions reads the same
    xs = P.plot_rank_recovery({"rank": frac}).axes[0].get_lines()[0].get_xdata()
    np.testing.assert_allclose(xs, [1, 10, 50, 100])
    fig = P.plot_rescale(tables)
    left, right = fig.axes
    assert len(_labelled_lines(left)) == 4  # rescaled + as-trained, per run
    assert len(right.get_lines()) == 2 * 2  # one β curve per (run, step)
    _has_both_runs(fig)


def test_direction_figures(tables):
    fig = P.plot_singular_value_decay(tables)
    for ax in fig.axes:
        lines = _labelled_lines(ax)
        assert len(lines) == 2 and all(len(ln.get_xdata()) == 64 for ln in lines)
    opd = [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("opd")][0]
    assert opd.get_ydata()[1] / opd.get_ydata()[0] == pytest.approx(0.5)
    fig = P.plot_table1(tables)
    assert len(fig.axes) == 4
    for ax in fig.axes:
        assert [c.get_label() for c in ax.containers] == ["opd", "grpo"]
    s = tables["summary"]
    want = s[(s["aggregate"] == "table1") & (s.run == "opd") & (s.step == 40) & (s.metric == "spectral_ratio")]["value"]
    assert fig.axes[1].containers[0].patches[0].get_height() == pytest.approx(want.item())
    # from spectrum.csv alone, the same aggregate
    t2 = {k: v for k, v in tables.items() if k != "summary"}
    fig2 = P.plot_table1(t2)
    assert fig2.axes[1].containers[0].patches[0].get_height() == pytest.approx(want.item())
    fig = P.plot_alignment(tables)
    assert len(fig.axes) == 4
    for ax in fig.axes:
        lines = _labelled_lines(ax)
        assert [ln.get_label() for ln in lines] == ["opd", "grpo"]
        np.testing.assert_allclose(lines[0].get_xdata(), [s / STEPS[-1] for s in STEPS])


def test_eval_and_effopd(tables):
    fig = P.plot_eval_curves(tables)
    assert len(_labelled_lines(fig.axes[0])) == 4 and len(_labelled_lines(fig.axes[1])) == 2
    fig = P.plot_effopd_curves(tables)
    for ax in fig.axes:
        labels = [ln.get_label() for ln in _labelled_lines(ax)]
        assert len(labels) == 4 and labels[-1].startswith("target")
        assert [lb.split(" ")[0] for lb in labels[:3]] == ["vanilla", "effopd", "fixed"]
    assert "effopd (median steps to target 24, 2 of 2 seeds reached it)" in _legend_texts(fig)
    assert _line_color(fig, "vanilla") == {P.OPD_COLOR.lower()}
    missed = dict(tables)  # one seed of effopd never reaches the target: said, not hidden in the median
    summ = tables["effopd_summary"].copy()
    summ.loc[(summ["method"] == "effopd") & (summ["seed"] == 1), "steps_to_target"] = np.nan
    missed["effopd_summary"] = summ
    assert "effopd (median steps to target 24, 1 of 2 seeds reached it)" in _legend_texts(P.plot_effopd_curves(missed))


def test_opd_and_grpo_keep_their_colours(tables):
    colours = run_colours = P.run_colors(["grpo", "opd", "zrl"])
    assert colours["opd"] == P.OPD_COLOR and P.run_colors(["grpo", "opd"])["grpo"] == run_colours["grpo"]
    seen = {"opd": set(), "grpo": set()}
    for fn in (P.plot_layer_norms, P.plot_scaling, P.plot_singular_value_decay, P.plot_alignment, P.plot_eval_curves):
        fig = fn(tables)
        for r in seen:
            seen[r] |= _line_color(fig, r)
    for fn in (P.plot_group_energy, P.plot_table1, P.plot_embedding_swap, P.plot_embedding_cosine):
        fig = fn(tables)
        for r in seen:
            seen[r] |= _bar_color(fig, r)
    assert seen["opd"] == {P.OPD_COLOR.lower()}
    assert seen["grpo"] == {run_colours["grpo"].lower()}


def test_no_global_figures_leak(tables):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    rc = dict(matplotlib.rcParams)
    P.plot_table1(tables)
    assert plt.get_fignums() == before
    assert dict(matplotlib.rcParams) == rc


def test_missing_table_and_column_are_clear(tables):
    with pytest.raises(InputError, match="scaling.csv"):
        P.plot_scaling({k: v for k, v in tables.items() if k != "scaling"})
    with pytest.raises(InputError, match="accuracy"):
        P.plot_scaling({"scaling": tables["scaling"].drop(columns="accuracy")})


def test_plot_all_from_dirs_writes_atomically_and_reports_skips(tmp_path, tables):
    dirs = write_dirs(tmp_path, tables)
    out = tmp_path / "figs"
    res = P.plot_all(dirs, out, formats=("png",))
    assert [p.stem for p in res] == [s.name for s in P.FIGURES]
    assert all(p.suffix == ".png" and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in res)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in res)  # no temporary files left
    assert res.skipped == {}
    with pytest.raises(InputError, match="already exists"):
        P.plot_all(dirs, out, formats=("png",))
    again = P.plot_all(dirs, out, formats=("png", "svg"), figures=["table1"], overwrite=True)
    assert [p.name for p in again] == ["table1.png", "table1.svg"]
    assert b"<svg" in (out / "table1.svg").read_bytes()[:2000]
    # only the analysis dir: the lab and effopd figures are skipped, each with its reason
    ok, skipped = P.available_figures(dirs[:1])
    assert set(skipped) == {"eval_curves", "embedding_swap", "scaling", "rank_recovery", "rescale", "effopd_curves",
                            "probe", "extrapolation", "step_alignment"}
    assert skipped["scaling"] == "scaling.csv is absent"
    res2 = P.plot_all(dirs[:1], tmp_path / "figs2", formats=("png",), figures=["alignment", "scaling"])
    assert [p.name for p in res2] == ["alignment.png"] and res2.skipped == {"scaling": skipped["scaling"]}
    with pytest.raises(InputError, match="unknown figure.s. nosuch; the figures are .*alignment"):
        P.plot_all(dirs[:1], tmp_path / "figs4", figures=["nosuch"])
    with pytest.raises(InputError, match="format"):
        P.plot_all(dirs, tmp_path / "figs3", formats=("jpg",))


def test_a_failed_save_leaves_the_existing_figure_and_no_temporary_file(tmp_path):
    """save_figure writes under a temporary name: when matplotlib fails mid-save (SVG opens its file, then
    the drawing hits bad mathtext), the file already there is byte-for-byte what it was and nothing else
    is left in the folder."""
    import matplotlib.pyplot as plt

    from opd_dynamics.plotting.render import save_figure

    fig = plt.figure()
    fig.text(0.5, 0.5, r"$\notacommand{x}$")
    out = tmp_path / "fig.svg"
    out.write_bytes(b"the user's file")
    with pytest.raises(ValueError):
        save_figure(fig, out, overwrite=True)
    plt.close(fig)
    assert out.read_bytes() == b"the user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.svg"]


def test_extrapolation_figure_plots_the_mean_over_seeds_per_method(tables):
    fig = P.plot_extrapolation(tables)
    ax = fig.axes[0]
    lines = {c.get_label(): c.lines[0] for c in ax.containers}  # errorbar containers: label and data line
    assert {"linear", "relex", "the run at its last observed step"} <= set(lines)
    def y(label):
        return np.asarray(lines[label].get_ydata(), float)

    np.testing.assert_allclose(y("relex"), [0.15, 0.3, 0.6])  # the mean of f·1 and f·2 over the seeds
    np.testing.assert_allclose(y("the run at its last observed step"), [0.2, 0.4, 0.8])
    assert ax.get_title() == "opd (2 seeds)"


def test_step_alignment_draws_every_recorded_step_and_the_checkpoints(tables):
    """Lines: the sketch series' alignment at every recorded step (planted: overlap s/40, the median over
    matrices); markers: the checkpoints' alignment.csv at its saved steps."""
    al = tables["alignment"]
    one = al[al["step"] == STEPS[-1]]
    sk = pd.concat([one.assign(step=s, subspace_overlap_u=s / 40, rank1_cosine=1.0) for s in range(1, 41)])
    fig = P.plot_step_alignment({**tables, "sketch_alignment": sk})
    assert len(fig.axes) == 4
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    np.testing.assert_allclose(lines["opd, every recorded step"].get_xdata(), range(1, 41))
    np.testing.assert_allclose(lines["opd, every recorded step"].get_ydata(), [s / 40 for s in range(1, 41)])
    assert list(lines["grpo, checkpoints"].get_xdata()) == list(STEPS)
    assert lines["grpo, checkpoints"].get_linestyle() == "None"
    fig = P.plot_step_alignment({"sketch_alignment": sk})  # without checkpoints: the lines alone
    assert {ln.get_label() for ln in fig.axes[0].get_lines()} == {"opd, every recorded step",
                                                                   "grpo, every recorded step"}

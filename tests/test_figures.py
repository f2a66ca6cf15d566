"""Figures for any run on a 30-layer series (SmolLM2-135M has 30): one run (an SFT run) and two, tables built in
code to the CSV schemas. Every title, suptitle and axis label lies inside the canvas, drawn by the renderer, in the
PNG (150 dpi) and at the report's resolution; the layer axis ends at the last layer; an embedding cosine within
1e-3 of 1 is drawn as 1 − cosine; captions name the runs shown and nothing the tables do not hold; the every-step
alignment figure comes from any sketch series."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from test_plotting import make_tables  # noqa: E402

from opd_dynamics import plotting as P  # noqa: E402
from opd_dynamics.plotting._draw import layer_ticks  # noqa: E402
from opd_dynamics.plotting.html import REPORT_DPI, build_html  # noqa: E402
from opd_dynamics.plotting.render import PNG_DPI  # noqa: E402
from opd_dynamics.plotting.runs import run_kinds  # noqa: E402

N_LAYERS = 30
STEPS = (1, 2, 4, 8)
MODULES = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
EMB = "model.embed_tokens.weight"
#: what SmolLM2's single SFT run gave (0.99999993: both bars read 1.000 on a cosine axis)
COS_MEAN, COS_P5 = 0.99999993, 0.9999998
LAB_ONLY = ("eval", "scaling", "window", "rank", "rescale", "embedding_swap", "probe", "extrapolation")


def _tensors():
    out = [(EMB, None, "embedding", "embed_tokens")]
    for layer in range(N_LAYERS):
        for group, mods in MODULES.items():
            sub = "self_attn" if group == "attention" else "mlp"
            out += [(f"model.layers.{layer}.{sub}.{m}.weight", layer, group, m) for m in mods]
        out.append((f"model.layers.{layer}.input_layernorm.weight", layer, "norm", "input_layernorm"))
    return out


def series_tables(runs=("sft",), steps=STEPS) -> dict[str, pd.DataFrame]:
    """The analysis tables of a 30-layer series, one row per run × step × tensor (planted: run i's update norm grows
    with the step and with depth; the alignment to the last step is step / last step)."""
    ident = ["run", "step", "tensor", "layer", "group", "module", "expert"]
    alloc, spec, sv, align, seg, traj, emb = [], [], [], [], [], [], []
    last = steps[-1]
    for i, run in enumerate(runs):
        for step in steps:
            rows = []
            for tensor, layer, group, module in _tensors():
                f = 1e-3 * step * (1 + i) * (1.0 if layer is None else 1 + layer / N_LAYERS)
                rows.append(dict(run=run, step=step, tensor=tensor, layer=layer, group=group, module=module,
                                 expert=None, update_norm=f, base_norm=1.0, relative_update=f, energy_share=0.0))
            tot = sum(r["update_norm"] ** 2 for r in rows)
            for r in rows:
                r["energy_share"] = r["update_norm"] ** 2 / tot
            alloc += rows
            for r in rows:
                if r["group"] not in MODULES:
                    continue
                idn = {k: r[k] for k in ident}
                s = 0.5 ** np.arange(16) * r["update_norm"]
                spec.append(dict(**idn, spectral_norm=s[0], spectral_ratio=0.8, stable_rank=1.5, effective_rank=2.0,
                                 top1pct_norm_ratio=0.8, energy_top1=0.64, svd_method="exact-gram-f64"))
                sv += [dict(**idn, index=j + 1, sigma=s[j], sigma_normalized=s[j] / r["update_norm"])
                       for j in range(16)]
                align.append(dict(**idn, ref_step=last, k=16, subspace_overlap_u=step / last, subspace_overlap_v=0.5,
                                  paired_cosine=step / last, rank1_cosine=step / last, direction_cosine=step / last))
                seg.append(dict(**idn, segment_cosine=np.nan if step == last else 0.5,
                                direction_cosine=step / last, null_cosine=np.sqrt(step / last)))
                if step == last:
                    traj.append(dict(**idn, n_steps=len(steps), linear_r2=0.9, rank1_share=0.95))
            emb.append(dict(run=run, step=step, tensor=EMB, n_rows=49152, cosine_mean=COS_MEAN, cosine_p5=COS_P5))
    return dict(module_allocation=pd.DataFrame(alloc), spectrum=pd.DataFrame(spec), singular_values=pd.DataFrame(sv),
                alignment=pd.DataFrame(align), segments=pd.DataFrame(seg), trajectory=pd.DataFrame(traj),
                embedding=pd.DataFrame(emb))


def lab_tables(runs) -> dict[str, pd.DataFrame]:
    """The lab's and EffOPD's tables (test_plotting's), their rows renamed to `runs` (one run: grpo's rows)."""
    t = make_tables()
    names = dict(zip(("opd", "grpo"), runs)) if len(runs) == 2 else {"grpo": runs[0]}
    out = {}
    for n in (*LAB_ONLY, "effopd_curves", "effopd_summary"):
        d = t[n]
        if "run" in d.columns:
            d = d[d["run"].isin(list(names))].assign(run=lambda x: x["run"].map(names))
        out[n] = d.reset_index(drop=True)
    return out


def every_step(tables) -> pd.DataFrame:
    """A sketch series' alignment at every step 1 … 8 (planted: step / 8)."""
    a = tables["alignment"]
    one = a[a["step"] == STEPS[-1]]
    return pd.concat([one.assign(step=s, subspace_overlap_u=s / 8, rank1_cosine=s / 8) for s in range(1, 9)],
                     ignore_index=True)


CASES = {"one run": ("sft",), "two runs": ("opd", "grpo")}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    runs = CASES[request.param]
    t = series_tables(runs)
    t |= lab_tables(runs) | {"sketch_alignment": every_step(t)}
    return runs, P.as_tables(t)


def _texts(fig):
    """(what, Text) of every title, suptitle and axis label, and every legend."""
    out = [("suptitle", fig._suptitle)] if fig._suptitle is not None else []
    for ax in fig.axes:
        for t in (ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label):
            if t.get_text() and t.get_visible():
                out.append((f"{ax.get_title() or 'axes'}: {t.get_text()[:30]!r}", t))
    return out


def _outside(fig, dpi) -> list[str]:
    """The texts of `fig` drawn at `dpi` that do not lie inside the canvas."""
    fig.set_dpi(dpi)
    fig.canvas.draw()
    box = fig.bbox
    bad = []
    for what, t in _texts(fig):
        bb = t.get_window_extent()
        if bb.x0 < box.x0 - 0.5 or bb.x1 > box.x1 + 0.5 or bb.y0 < box.y0 - 0.5 or bb.y1 > box.y1 + 0.5:
            bad.append(f"{what} at x {bb.x0:.0f}…{bb.x1:.0f}, y {bb.y0:.0f}…{bb.y1:.0f} in "
                       f"{box.width:.0f}×{box.height:.0f}")
    for leg in fig.legends:
        bb = leg.get_window_extent()
        if bb.x0 < box.x0 - 0.5 or bb.x1 > box.x1 + 0.5:
            bad.append(f"legend at x {bb.x0:.0f}…{bb.x1:.0f} in {box.width:.0f}")
    return bad


def _flat(text) -> str:
    return " ".join(text.get_text().split("\n"))


def test_every_title_lies_inside_the_canvas_in_the_png_and_the_report(case):
    runs, t = case
    ok, skipped = P.available_figures(t)
    assert skipped == {} and len(ok) == len(P.FIGURES)
    for spec in ok:
        fig = spec.fn(t)
        for dpi in (PNG_DPI, REPORT_DPI):
            assert _outside(fig, dpi) == [], (spec.name, dpi)
        fig.clear()


def test_the_titles_cut_off_on_a_real_model_now_fit_whole(case):
    """allocation_heatmap_share (one narrow panel) and foresight (at the report's 110 dpi) were cut on both sides."""
    runs, t = case
    who = {1: "sft", 2: "opd vs grpo"}[len(runs)]
    fig = P.plot_allocation_heatmap(t, metric="energy_share")
    assert _outside(fig, REPORT_DPI) == [] and _outside(fig, PNG_DPI) == []
    assert _flat(fig._suptitle) == f"Share of the update energy by layer and module: {who}"
    fig = P.plot_foresight(t)
    assert _outside(fig, REPORT_DPI) == [] and _outside(fig, PNG_DPI) == []
    assert _flat(fig._suptitle) == (f"Foresight, {who}: alignment to the final update vs a random walk, and "
                                    "straightness of the path")
    assert "\n" in fig._suptitle.get_text()  # wrapped, not shrunk: one line is wider than the canvas
    assert fig._suptitle.get_fontsize() == 13.0


def test_the_layer_axis_ends_at_the_last_layer(case):
    runs, t = case
    assert layer_ticks(0, 29) == [0, 5, 10, 15, 20, 25, 29]
    for fn in (P.plot_trajectory_shape, P.plot_layer_norms):
        fig = fn(t)
        layer_axes = [ax for ax in fig.axes if ax.get_xlabel() == "layer"]
        assert len(layer_axes) == 2, fn.__name__
        for ax in fig.axes:  # the twin and the upper panels share the axis
            assert ax.get_xlim() == (-0.5, 29.5), fn.__name__
            assert list(ax.get_xticks()) == [0, 5, 10, 15, 20, 25, 29], fn.__name__
        line = [ln for ln in layer_axes[0].get_lines() if ln.get_label() == runs[0] or
                ln.get_label().startswith(f"{runs[0]} ")][0]
        assert list(line.get_xdata()) == list(range(N_LAYERS)), fn.__name__
    fig = P.plot_allocation_heatmap(t)
    assert [int(x.get_text()) for x in fig.axes[0].get_yticklabels()] == list(range(N_LAYERS))


def test_layers_and_runs_in_natural_order_even_as_text():
    """Layers read back as text ('10' < '2' as strings) and runs named seed-2 and seed-10 are put in number order."""
    t = series_tables(("seed-10", "seed-2"), steps=(8,))
    for n in ("module_allocation", "trajectory"):
        t[n] = t[n].assign(layer=t[n]["layer"].map(lambda v: "" if pd.isna(v) else str(int(v))).astype(object))
    assert P.as_tables(t).tables["trajectory"]["layer"].dtype == "Int64"
    fig = P.plot_trajectory_shape(t)
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["seed-2", "seed-10"]
    assert list(lines[0].get_xdata()) == list(range(N_LAYERS))
    from opd_dynamics.plotting.allocation import heatmap_matrix

    assert list(heatmap_matrix(t, "seed-2").index) == list(range(N_LAYERS))
    assert [ax.get_title() for ax in P.plot_allocation_heatmap(t).axes if ax.get_title()] == [
        "seed-2 (step 8)", "seed-10 (step 8)"]


def test_embedding_cosines_near_one_are_drawn_as_their_difference_from_one(case):
    runs, t = case
    fig = P.plot_embedding_cosine(t)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "1 − cosine(base row, trained row)"
    for c in ax.containers:
        assert [p.get_height() for p in c.patches] == [1.0 - COS_MEAN, 1.0 - COS_P5]
    assert [x.get_text() for x in ax.texts] == ["7e-08", "2e-07"] * len(runs)
    lo, hi = ax.get_ylim()
    assert lo == 0.0 and hi == pytest.approx((1.0 - COS_P5) * 1.25)
    assert P.FIGURES[[s.name for s in P.FIGURES].index("embedding_cosine")].caption_for(t).endswith(
        "; every value lies within 0.001 of 1, so the bars show 1 − cosine.")
    # an embedding that did not move at all: a note, not an empty axis
    same = t.tables["embedding"].assign(cosine_mean=1.0, cosine_p5=1.0)
    ax = P.plot_embedding_cosine({"embedding": same}).axes[0]
    assert "no row moved: cosine = 1 for every row" in [x.get_text() for x in ax.texts]
    # cosines that are not all within 1e-3 of 1 stay cosines, on an axis zoomed around them, printed with the
    # decimals that tell them apart (the lab's 0.99949 and 0.99890 both read 0.999 at three)
    far = t.tables["embedding"].assign(cosine_mean=0.99949, cosine_p5=0.9989)
    ax = P.plot_embedding_cosine({"embedding": far}).axes[0]
    assert ax.get_ylabel() == "cosine(base row, trained row)  [zoomed]"
    assert ax.containers[0].patches[0].get_height() == 0.99949
    assert [x.get_text() for x in ax.texts] == ["0.99949", "0.99890"] * len(runs)


def _captions(t) -> dict[str, str]:
    return {s.name: s.caption_for(t) for s in P.available_figures(t)[0]}


def test_captions_name_the_runs_shown_and_only_what_the_tables_hold():
    one = P.as_tables(series_tables(("sft",)))
    caps = _captions(one)
    assert caps["layer_norms"] == ("As the paper's Fig. 2b: the update norm ‖ΔW‖F per layer (layers 0–29) of the "
                                   "attention and of the MLP matrices (the quadrature sum over the group's matrices), "
                                   "sft (step 8).")
    assert caps["allocation_heatmap_share"] == (
        "Share of the run's update energy (‖ΔW‖F² over every analysed tensor) of each attention and MLP matrix by "
        "layer (layers 0–29, rows) and module, sft (step 8).")
    assert caps["trajectory_shape"] == ("Per layer (layers 0–29): the per-entry linear fit's pooled R² and the rank-1 "
                                        "share of the stacked updates, mean over the layer's matrices, sft, from 4 "
                                        "checkpoints per run.")
    for name, cap in caps.items():  # a single SFT run: nothing of OPD, RL, a teacher or a window
        for word in ("OPD", "RL", "GRPO", "teacher", "window", "vs"):
            assert word not in cap.split(), (name, word)
        assert "sft" in cap, name
    figs = {s.name: s.fn(one) for s in P.available_figures(one)[0]}
    titles = {n: _flat(f._suptitle) for n, f in figs.items() if f._suptitle is not None}
    assert titles["layer_norms"] == "Update norm by depth: sft"
    assert all("OPD" not in x and " RL" not in x for x in titles.values()), titles

    two = P.as_tables(series_tables(("opd", "grpo")) | lab_tables(("opd", "grpo")))
    caps = _captions(two)
    assert caps["layer_norms"] == (
        "As the paper's Fig. 2b: the update norm ‖ΔW‖F per layer (layers 0–29) of the attention and of the MLP "
        "matrices (the quadrature sum over the group's matrices), opd (step 8) and grpo (step 8); dashed, right axis: "
        "held-out accuracy with only a window of layers around each layer trained, the rest at base (window.csv), "
        "opd and grpo.")
    assert caps["eval_curves"] == ("Held-out accuracy (greedy; dashed: sampled at T = 1) and, right, the reverse KL "
                                   "to the teacher on the student's samples against the optimizer step (steps 0–40), "
                                   "opd and grpo.")
    assert caps["foresight"] == ("Top: cos(ΔW_t, ΔW_T) of each step's update to the last step's, against its "
                                 "random-walk null from each matrix's measured segment norms (dashed); bottom: the "
                                 "cosine between consecutive update segments (1 on a straight path, about 0 for a "
                                 "random walk); median over matrices, opd and grpo.")
    assert _flat(P.plot_layer_norms(two)._suptitle) == "Update norm by depth: opd vs grpo"
    assert _flat(P.plot_eval_curves(two)._suptitle) == "Training curves: opd vs grpo"
    # the lab's provenance says what its runs are; nothing else does (a name is not a kind)
    two.metas = [("lab/lab.json", {"preset": "smoke"})]
    assert run_kinds(two) == {"opd": "OPD", "grpo": "RL, GRPO"}
    assert _captions(two)["group_energy"] == ("Share of the update energy ‖ΔW‖F² in each parameter group (attention, "
                                              "mlp, embedding, norm), opd (step 8) and grpo (RL, GRPO; step 8).")
    one.metas = [("a/run.json", {"inputs": [{"run": "sft", "kind": "SFT"}]})]
    assert _captions(one)["group_energy"] == ("Share of the update energy ‖ΔW‖F² in each parameter group (attention, "
                                              "mlp, embedding, norm), sft (step 8).")
    one.metas = [("a/run.json", {"kinds": {"sft": "supervised fine-tuning"}})]
    assert _captions(one)["group_energy"].endswith("sft (supervised fine-tuning; step 8).")


def test_a_sketch_analysis_captions_what_a_sketch_determines():
    """A sketch series' tables: no cos(ΔW_t, ΔW_T) (foresight draws the segment cosines alone), no effective rank,
    and the every-step alignment without checkpoint dots."""
    t = series_tables(("sft",))
    t["segments"] = t["segments"].assign(direction_cosine=np.nan)
    t["spectrum"] = t["spectrum"].assign(effective_rank=np.nan, svd_method="sketch-top16")
    t["alignment"] = every_step(t)
    t["sketch_alignment"] = t["alignment"]
    caps = _captions(P.as_tables(t))
    assert caps["foresight"] == ("The cosine between consecutive update segments (1 on a straight path, about 0 for a "
                                 "random walk), median over matrices, sft. The alignment to the final update, "
                                 "cos(ΔW_t, ΔW_T), is not drawn: segments.csv leaves it empty (a sketch series does "
                                 "not determine it).")
    assert caps["table1"].endswith("; the effective rank is not in these tables (it needs the whole spectrum: a "
                                   "sketch series keeps the top k only).")
    assert caps["step_alignment"] == ("Alignment to the last recorded step at every recorded step (steps 1–8) of the "
                                      "sketch series of sft: the top-k left-subspace overlap and the rank-1 cosine, "
                                      "median over matrices (band: interquartile range).")
    fig = P.plot_foresight(t)
    assert len(fig.axes) == 2 and [ax.get_ylabel() for ax in fig.axes][0] == "cos(δ$_i$, δ$_{i+1}$)"
    assert {ln.get_label() for ax in P.plot_step_alignment(t).axes for ln in ax.get_lines()} == {
        "sft, every recorded step"}
    # beside a checkpoint analysis (other steps), the checkpoints are dots, and the caption says so
    t["alignment"] = series_tables(("sft",))["alignment"]
    assert _captions(P.as_tables(t))["step_alignment"].endswith(
        "; dots: the checkpoint analysis of sft (alignment.csv).")


def test_the_report_captions_each_figure_from_its_runs(tmp_path):
    t = series_tables(("sft",))
    page, names, _ = build_html(t)
    assert "OPD vs RL" not in page and "sliding-window" not in page
    assert ("<figcaption><b>layer_norms</b>: As the paper&#x27;s Fig. 2b: the update norm ‖ΔW‖F per layer "
            "(layers 0–29) of the attention and of the MLP matrices (the quadrature sum over the group&#x27;s "
            "matrices), sft (step 8).</figcaption>") in page


def _llama_blocks(n_layers: int = 2, hidden: int = 16) -> torch.nn.Module:
    """A module whose parameters carry Llama's names (model.layers.N.self_attn.q_proj.weight …), nothing else."""
    lin = lambda o, i: torch.nn.Linear(i, o, bias=False)  # noqa: E731
    root, model = torch.nn.Module(), torch.nn.Module()
    model.layers = torch.nn.ModuleList()
    for _ in range(n_layers):
        block, attn, mlp = torch.nn.Module(), torch.nn.Module(), torch.nn.Module()
        attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj = (lin(hidden, hidden) for _ in range(4))
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = lin(2 * hidden, hidden), lin(2 * hidden, hidden), lin(hidden,
                                                                                                         2 * hidden)
        block.self_attn, block.mlp = attn, mlp
        model.layers.append(block)
    root.model = model
    return root


@pytest.fixture(scope="module")
def sketch_analysis(tmp_path_factory):
    """A sketch series recorded from a two-layer Llama-named model over 6 steps, analysed into a directory."""
    from opd_dynamics import SketchSeries, analyze
    from opd_dynamics.record import DynamicsRecorder

    root = tmp_path_factory.mktemp("sk")
    torch.manual_seed(0)
    model = _llama_blocks()
    rec = DynamicsRecorder(root / "sk", k=4, background=False)
    rec.record(model, 0)
    g = torch.Generator().manual_seed(5)
    for step in range(1, 7):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=g))
        rec.record(model, step)
    rec.close()
    analyze(SketchSeries(root / "sk", name="my-run"), out=root / "analysis")
    return root / "analysis"


def test_any_sketch_series_gets_the_every_step_alignment_figure(sketch_analysis, tmp_path):
    sk = pd.read_csv(sketch_analysis / "sketch_alignment.csv")
    pd.testing.assert_frame_equal(sk, pd.read_csv(sketch_analysis / "alignment.csv")[sk.columns])
    assert sorted(sk["step"].unique()) == [1, 2, 3, 4, 5, 6]
    assert json.loads((sketch_analysis / "run.json").read_text())["tables"]["sketch_alignment"] == len(sk)
    res = P.plot_all([sketch_analysis], tmp_path / "figs", formats=("png",), figures=["step_alignment"])
    assert [p.name for p in res] == ["step_alignment.png"]
    fig = P.plot_step_alignment(sketch_analysis)
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    assert list(lines) == ["my-run, every recorded step"]  # its own alignment.csv is no checkpoint analysis
    assert list(lines["my-run, every recorded step"].get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert _flat(fig._suptitle) == ("Alignment to the final update at every recorded step, my-run (median over "
                                    "matrices, band = IQR)")

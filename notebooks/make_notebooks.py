"""Build the three notebooks (stored without outputs) so they are reproducible: `python notebooks/make_notebooks.py`."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """\
from pathlib import Path
import matplotlib.pyplot as plt
%matplotlib inline

# the repository root: the first parent holding data/lab (works from notebooks/ or the root)
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "data" / "lab").is_dir())
LAB = ROOT / "data" / "lab"
"""

ANALYZE = """\
from opd_dynamics import analyze
from opd_dynamics.io.series import CheckpointSeries

series = [CheckpointSeries.discover(LAB / run, base=LAB / "student_init", name=run) for run in ("opd", "grpo")]
report = analyze(series, progress=False, **OPTIONS)  # in memory
tables = dict(report.tables)
# the lab's held-out accuracy per checkpoint (for the sliding-window / accuracy overlays)
import pandas as pd
tables["eval"] = pd.concat([pd.read_csv(LAB / run / "eval.csv") for run in ("opd", "grpo")], ignore_index=True)
{k: len(v) for k, v in tables.items()}
"""


def nb(cells: list) -> nbformat.NotebookNode:
    n = new_notebook(cells=cells)
    n.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    n.metadata["language_info"] = {"name": "python"}
    return n


def allocation() -> nbformat.NotebookNode:
    return nb([
        new_markdown_cell(
            "# 01 · Where the update goes (module allocation)\n\n"
            "**Paper's claim.** On-policy distillation (OPD) and RL spread their weight updates differently over "
            "the network: the paper reports that OPD's update concentrates in particular layers / module types "
            "(attention vs MLP) and that a window of layers carries most of the accuracy gain (its Fig. 2b).\n\n"
            "**What this notebook shows.** The shipped lab run in `data/lab` (a small Qwen3-architecture student trained on "
            "2-digit addition by OPD and by GRPO from the same `student_init`) is analysed here, and the "
            "figures show where the update norm and energy went for each run. The lab is tiny and the data may "
            "or may not agree with the paper; read the figures, not the claim."),
        new_code_cell(SETUP),
        new_markdown_cell("Analyse both runs against the common base: norms only (no SVD, no alignment) are "
                          "all the allocation figures need."),
        new_code_cell("OPTIONS = dict(svd='none', alignment=False)\n" + ANALYZE),
        new_markdown_cell(
            "**Layer × module heatmap** of the update's Frobenius norm ‖W_t − W_0‖ at the last step, per run."),
        new_code_cell("from opd_dynamics.plotting import plot_allocation_heatmap\n"
                      "fig = plot_allocation_heatmap(tables, metric='update_norm')\ndisplay(fig)"),
        new_markdown_cell(
            "**Per-layer update norms** for attention and MLP, OPD vs GRPO (same colours everywhere)."),
        new_code_cell("from opd_dynamics.plotting import plot_layer_norms\n"
                      "fig = plot_layer_norms(tables)\ndisplay(fig)"),
        new_markdown_cell(
            "**Energy share by group**: the fraction of the squared update norm in attention, MLP, embeddings, "
            "norms. If OPD and GRPO allocate alike, the bars match."),
        new_code_cell("from opd_dynamics.plotting import plot_group_energy\n"
                      "fig = plot_group_energy(tables)\ndisplay(fig)"),
        new_code_cell("summary = tables['summary']\n"
                      "summary[(summary.aggregate == 'group') & (summary.metric == 'energy_share')]"
                      ".pivot_table(index=['run', 'step'], columns='group', values='value').tail(4)"),
    ])


def direction() -> nbformat.NotebookNode:
    return nb([
        new_markdown_cell(
            "# 02 · The direction of the update\n\n"
            "**Paper's claim.** The paper reports that OPD's update is low-rank-ish and points early in the "
            "direction it ends in: its singular values decay fast, its Table 1 aggregates (spectral norm, "
            "spectral ratio, effective rank, top-1% norm ratio) differ from RL's, and its alignment to the "
            "final update rises early in training (Fig. 4b).\n\n"
            "**What this notebook shows.** The same analysis of the shipped lab run (`data/lab`), drawn as "
            "singular-value decay, the Table-1 aggregates side by side, and alignment to the final checkpoint "
            "over training. The figures are what the data says, whether or not it matches the paper."),
        new_code_cell(SETUP),
        new_markdown_cell("Analyse both runs against the common base (exact SVD of every matrix update, alignment "
                          "to the last checkpoint)."),
        new_code_cell("OPTIONS = dict(svd='exact', alignment=True)\n" + ANALYZE),
        new_markdown_cell("**Singular-value decay** of ΔW (σ_i / ‖ΔW‖_F, top 64) at the last step."),
        new_code_cell("from opd_dynamics.plotting import plot_singular_value_decay\n"
                      "fig = plot_singular_value_decay(tables)\ndisplay(fig)"),
        new_markdown_cell("**Table-1 aggregates** over attention+MLP matrices, OPD vs GRPO."),
        new_code_cell("from opd_dynamics.plotting import plot_table1\nfig = plot_table1(tables)\ndisplay(fig)"),
        new_code_cell("s = tables['summary']\n"
                      "s[s['aggregate'] == 'table1'][['run', 'step', 'metric', 'value']].groupby(['run', 'metric'])"
                      ".tail(1)"),
        new_markdown_cell(
            "**Alignment to the final update** (paired cosine of singular vectors, subspace overlap) against "
            "training progress. An early rise means the direction is settled early."),
        new_code_cell("from opd_dynamics.plotting import plot_alignment\nfig = plot_alignment(tables)\ndisplay(fig)"),
    ])


EFFOPD_LOAD = """\
import pandas as pd

# the measurement shipped in docs/effopd (files <name>_effopd_curves.csv, ...) if present, else any in data/
def find_measurement():
    docs = ROOT / "docs" / "effopd"
    curves = sorted(docs.glob("*effopd_curves.csv")) if docs.is_dir() else []
    curves = curves or sorted((ROOT / "data").rglob("*effopd_curves.csv"))
    if not curves:
        raise FileNotFoundError("no effopd_curves.csv in docs/effopd or data/; run `opd-dynamics lab effopd` first")
    preferred = [c for c in curves if c.name == "cpu-default-5seeds_effopd_curves.csv"]  # README's and EFFOPD.md's
    c = (preferred or curves)[0]
    s = c.with_name(c.name.replace("effopd_curves", "effopd_summary"))
    return c, s

curves_path, summary_path = find_measurement()
tables = {"effopd_curves": pd.read_csv(curves_path), "effopd_summary": pd.read_csv(summary_path)}
print("measurement:", curves_path.relative_to(ROOT))
tables["effopd_summary"]
"""


def effopd() -> nbformat.NotebookNode:
    return nb([
        new_markdown_cell(
            "# 03 · EffOPD: extrapolating the OPD update\n\n"
            "**Paper's claim.** Because OPD's update direction settles early, the paper proposes EffOPD: "
            "periodically extrapolate the weights along the recent update (accepting a step multiplier k only if "
            "a small validation check does not get worse), reaching the same accuracy in fewer optimizer steps "
            "and less wall-clock than vanilla OPD.\n\n"
            "**What this notebook shows.** A measurement made by the toolkit on the lab task (`opd-dynamics lab "
            "effopd`): held-out accuracy against optimizer steps and wall-clock for vanilla OPD, EffOPD "
            "(adaptive k) and a fixed-k variant, plus the steps each needed to reach 95% of vanilla "
            "OPD's final accuracy (same seed). The measured speed-up may be smaller than, larger than, or absent compared with the paper."),
        new_code_cell(SETUP),
        new_code_cell(EFFOPD_LOAD),
        new_code_cell("from opd_dynamics.plotting import plot_effopd_curves\n"
                      "fig = plot_effopd_curves(tables)\ndisplay(fig)"),
        new_markdown_cell("Median steps to target and final accuracy per method (over seeds)."),
        new_code_cell("tables['effopd_summary'].groupby('method')[['steps_to_target', 'final_accuracy', 'wall_s']]"
                      ".median()"),
    ])


NOTEBOOKS = {"01_module_allocation.ipynb": allocation, "02_update_direction.ipynb": direction,
             "03_effopd.ipynb": effopd}


def main() -> None:
    for name, build in NOTEBOOKS.items():
        nbformat.write(build(), HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()

"""The table schema (opd_dynamics.schema) against what is written and what is documented: docs/METRICS.md lists
every table with its columns in order and defines every column; the analysis, the lab's EffOPD summary and the
EffOPD trigger CSV write exactly the schema's columns in its order; the step speedup has one rule."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest
from torch import nn

from opd_dynamics.analysis.api import analyze
from opd_dynamics.io.series import CheckpointSeries
from opd_dynamics.schema import (
    ALL_INT_COLUMNS,
    DEFAULT_KS,
    DEFAULT_PCTS,
    ID_COLUMNS,
    INT_COLUMNS,
    PER_RUN_TABLES,
    PER_TENSOR_TABLES,
    TABLES,
    TEXT_COLUMNS,
    Column,
)

from builders import llama_like, perturb, write_dir

METRICS_MD = Path(__file__).resolve().parents[1] / "docs" / "METRICS.md"


def md_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table of `text` as (header cells, body rows of cells); an escaped \\| stays in its cell."""
    out, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
            continue
        if len(block) >= 2:
            out.append((block[0], block[2:]))
        block = []
    return out


def names_in(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def documented_columns(text: str) -> set[str]:
    """Column names defined in METRICS.md: the first cell of each `| column | definition |` table's rows."""
    return {n for head, rows in md_tables(text) if head[0] == "column" for r in rows for n in names_in(r[0])}


def documented_tables(text: str) -> dict[str, tuple[str, list[str]]]:
    """METRICS.md's table index: name → (file, columns in order), *identifiers* expanded."""
    index = [rows for head, rows in md_tables(text) if head[:4] == ["table", "file", "written by", "columns, in order"]]
    assert len(index) == 1, "METRICS.md needs one '| table | file | written by | columns, in order |' index"
    out = {}
    for r in index[0]:
        cols = []
        for item in r[3].split(","):
            item = item.strip()
            cols += list(ID_COLUMNS) if item == "*identifiers*" else names_in(item)
        (name,), (file,) = names_in(r[0]), names_in(r[1])
        out[name] = (file, cols)
    return out


# ---- (a) docs/METRICS.md agrees with the schema ----

def test_metrics_md_lists_every_table_with_its_file_and_columns_in_order():
    doc = documented_tables(METRICS_MD.read_text())
    assert list(doc) == list(TABLES)
    for name, t in TABLES.items():
        assert doc[name] == (t.file, t.patterns), name


def test_metrics_md_defines_every_schema_column_and_no_other():
    documented = documented_columns(METRICS_MD.read_text())
    in_schema = {n for t in TABLES.values() for n in t.patterns}
    assert sorted(in_schema - documented) == [], "schema columns METRICS.md does not define"
    assert sorted(documented - in_schema) == [], "columns METRICS.md defines that no table has"


def test_md_parser_reads_escaped_pipes_and_several_names():
    text = "x\n\n| column | definition |\n|---|---|\n| `a`, `b` | \\|x\\| |\n| `c` | y |\n\nz\n"
    assert documented_columns(text) == {"a", "b", "c"}


# ---- the schema itself ----

def test_shared_constants_keep_their_sets():
    assert set(INT_COLUMNS) == {"step", "layer", "expert", "ref_step", "index", "k", "paired_k", "rank90", "numel",
                                "n_rows", "n_steps", "lockin_step"}
    assert set(TEXT_COLUMNS) == {"run", "tensor", "group", "module", "shape", "svd_method", "aggregate", "metric"}
    assert ID_COLUMNS == ("run", "step", "tensor", "layer", "group", "module", "expert")
    assert PER_TENSOR_TABLES == ("module_allocation", "spectrum", "singular_values", "alignment", "geometry",
                                 "embedding", "trajectory", "segments")
    assert PER_RUN_TABLES == {"eval", "early_eval", *PER_TENSOR_TABLES, "summary"}
    assert {"seed", "center_layer", "first_layer", "last_layer"} | set(INT_COLUMNS) <= set(ALL_INT_COLUMNS)
    assert TABLES["callback_triggers"].file == TABLES["effopd_triggers"].file == "effopd_triggers.csv"


def test_schema_defaults_are_the_analysis_defaults():
    from opd_dynamics.analysis.metrics.geometry import DEFAULT_PCTS as geometry_pcts
    from opd_dynamics.analysis.metrics.spectrum import DEFAULT_KS as spectrum_ks
    from opd_dynamics.analysis.metrics.subspace import ALIGNMENT_KEYS
    from opd_dynamics.analysis.options import AnalysisOptions

    assert DEFAULT_KS == tuple(spectrum_ks) == tuple(AnalysisOptions().ks)
    assert DEFAULT_PCTS == tuple(geometry_pcts)
    assert TABLES["alignment"].names[len(ID_COLUMNS) + 1:] == list(ALIGNMENT_KEYS)


def test_patterns_expand_and_order():
    s = TABLES["spectrum"]
    assert [n for n in s.names if n.startswith("energy_top")] == [f"energy_top{k}" for k in DEFAULT_KS]
    assert s.expand(k=(8, 2))[-4:] == ["energy_top8", "energy_top2", "rank90", "svd_method"]
    assert s.column("energy_top8").name == "energy_top{k}" and s.column("rank90").dtype == "int"
    with pytest.raises(KeyError):
        s.column("energy_topx")
    with pytest.raises(ValueError, match="no column pattern"):
        s.expand(q=(1,))
    # a frame's columns: the schema's order, a pattern's columns in the order they come, unknown ones last
    assert s.order(["extra", "svd_method", "energy_top8", "run", "energy_top2", "spectral_norm"]) == [
        "run", "spectral_norm", "energy_top8", "energy_top2", "svd_method", "extra"]
    assert TABLES["geometry"].expand(p=(3,))[len(ID_COLUMNS)] == "principal_energy_3pct"
    with pytest.raises(ValueError, match="dtype"):
        Column("x", "double", "not a dtype")
    for t in TABLES.values():
        assert len(set(t.names)) == len(t.names), t.name
        assert all(c.meaning for c in t.columns), t.name


# ---- (b) the analysis writes the schema's columns in its order ----

@pytest.fixture(scope="module")
def series(tmp_path_factory) -> CheckpointSeries:
    tmp = tmp_path_factory.mktemp("schema")
    sd = llama_like(n_layers=1)
    write_dir(tmp / "base", sd)
    for s in (1, 2):
        write_dir(tmp / "run" / f"checkpoint-{s}", perturb(sd, 0.002 * s, seed=s))
    return CheckpointSeries.discover(tmp / "run", base=tmp / "base", name="opd")


def _headers(directory: Path) -> dict[str, list[str]]:
    return {p.stem: p.read_text().splitlines()[0].split(",") for p in sorted(directory.glob("*.csv"))}


def test_analysis_writes_the_schema_columns_in_order(series, tmp_path):
    analyze(series, out=tmp_path / "out", geometry=True, progress=False)
    written = _headers(tmp_path / "out")
    assert set(written) == {*PER_TENSOR_TABLES, "summary"}
    for name, cols in written.items():
        assert cols == TABLES[name].names, name


def test_analysis_with_other_ks_writes_the_expanded_columns(series, tmp_path):
    rep = analyze(series, svd="fast", ks=(8, 2), alignment=False, progress=False)
    assert list(rep.spectrum.columns) == TABLES["spectrum"].expand(k=(8, 2))
    assert list(rep.module_allocation.columns) == TABLES["module_allocation"].names


# ---- (c) the lab's EffOPD summary and the EffOPD trigger CSV ----

def _curves_and_runs() -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = []
    for m, accs in {"vanilla": [0.2, 0.5, 0.8], "effopd": [0.2, 0.8, 0.8], "fixed": [0.2, 0.1, 0.1]}.items():
        for step, a in zip([0, 2, 4], accs):
            rows.append({"seed": 0, "method": m, "step": step, "accuracy": a, "wall_s": step * 0.5})
    runs = pd.DataFrame([{"seed": 0, "method": m, "final_accuracy": 0.5, "wall_s": 1.0, "validation_s": 0.0}
                         for m in ("vanilla", "effopd", "fixed")])
    return pd.DataFrame(rows)[TABLES["effopd_curves"].names], runs


def test_lab_effopd_summary_has_the_schema_columns():
    from opd_dynamics.lab.effopd import summarize

    curves, runs = _curves_and_runs()
    assert list(summarize(curves, runs).columns) == TABLES["effopd_summary"].names


class _Net(nn.Module):
    """One MLP matrix under an HF-style name, so EffOPD selects it."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Module()])
        self.model.layers[0].mlp = nn.Module()
        self.model.layers[0].mlp.up_proj = nn.Linear(4, 8, bias=False)


def test_callback_trigger_rows_have_the_schema_columns():
    from opd_dynamics.effopd import EffOPD

    names = TABLES["callback_triggers"].names
    for kw in ({"score_fn": lambda _m: 0.0, "k_max": 1}, {"score_fn": None, "fixed_k": 2}):
        e = EffOPD(_Net(), **kw)
        rec = e.after_step(1)
        assert list(rec.as_row()) == names
        frame = e.records_frame()
        assert list(frame.columns) == names and len(frame) == 1
        assert frame.loc[0, "mode"] == ("adaptive" if kw["score_fn"] else "fixed")


# ---- the step speedup: one rule for effopd.json and the HTML report ----

def test_speedup_is_one_rule_for_the_lab_and_the_html_report():
    from opd_dynamics.effopd.summary import median_speedup, per_seed_speedups
    from opd_dynamics.lab.effopd import speedups
    from opd_dynamics.plotting import as_tables
    from opd_dynamics.plotting.html import key_tables

    rows = [dict(seed=s, method=m, steps_to_target=v, final_accuracy=0.9, wall_s=1.0, validation_s=0.0,
                 tie_accepts=0)
            for m, vals in (("vanilla", (100, 200, 300)), ("effopd", (100, 50, 300)), ("fixed", (50, None, None)))
            for s, v in zip((0, 1, 2), vals)]
    summary = pd.DataFrame(rows, columns=TABLES["effopd_summary"].names)
    assert per_seed_speedups(summary, "effopd").tolist() == [1.0, 4.0, 1.0]
    assert median_speedup(summary, "effopd") == 1.0  # the ratio of the medians would say 4/3
    assert math.isnan(median_speedup(summary.assign(steps_to_target=float("nan")), "effopd"))
    lab = speedups(summary)
    assert lab["effopd"] == {"per_seed": {0: 1.0, 1: 4.0, 2: 1.0}, "median": 1.0, "seeds_with_a_ratio": 3}
    assert lab["fixed"]["median"] == 2.0 and math.isnan(lab["fixed"]["per_seed"][1])
    assert lab["fixed"]["seeds_with_a_ratio"] == sum(not math.isnan(v) for v in lab["fixed"]["per_seed"].values())
    html = dict(key_tables(as_tables({"effopd_summary": summary})))["EffOPD summary (median over seeds)"]
    col = html.set_index("method")["step speedup vs vanilla (median of per-seed ratios)"]
    assert {m: col[m] for m in ("effopd", "fixed", "vanilla")} == {"effopd": 1.0, "fixed": 2.0, "vanilla": 1.0}


def test_int_columns_are_restored_by_the_readers(tmp_path):
    """An int column with empty cells is read back as nullable integers, not floats (Report.load)."""
    from opd_dynamics.analysis.report import Report

    df = pd.DataFrame({"run": ["a", "a"], "step": [1, 2], "tensor": ["t", "t"], "layer": [None, 1.0]})
    (tmp_path / "module_allocation.csv").write_text(df.to_csv(index=False))
    got = Report.load(tmp_path).tables["module_allocation"]
    assert str(got["layer"].dtype) == "Int64" and got["layer"].isna().tolist() == [True, False]

"""The analysis result: tidy DataFrames (one row per run × step × tensor) plus provenance.

`Report.to_csv(dir)` writes one CSV per table and `run.json`; `Report.load(dir)` reads them back.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from opd_dynamics.errors import InputError
from opd_dynamics.io.naming import MATRIX_GROUPS
from opd_dynamics.io.writer import atomic_dir, atomic_write_text, json_text
from opd_dynamics.schema import ID_COLUMNS, INT_COLUMNS, PER_TENSOR_TABLES, RUN_JSON, TABLES, TEXT_COLUMNS

# ID_COLUMNS, INT_COLUMNS, PER_TENSOR_TABLES and RUN_JSON live in opd_dynamics.schema; imported here, they stay
# the names this module has always offered (analysis.api and analysis.tensor import them from here)
TABLE1_METRICS = ("spectral_norm", "spectral_ratio", "effective_rank", "top1pct_norm_ratio")
#: the kind of output an analysis directory is (its marker, `io.writer.OUTPUT_MARKER`): analyze, Report.to_csv
ANALYSIS = "analysis"


@dataclass
class Report:
    """Named tidy tables (keys are CSV stems, e.g. 'module_allocation') and run metadata."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __getattr__(self, name: str) -> pd.DataFrame:
        tables = self.__dict__.get("tables", {})
        if name in tables:
            return tables[name]
        raise AttributeError(name)

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.tables[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tables and not self.tables[name].empty

    def to_csv(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write every table as CSV plus run.json into `out` (atomically; refuses an existing dir)."""
        with atomic_dir(out, ANALYSIS, overwrite=overwrite) as tmp:
            self.write_into(tmp)
        return Path(out)

    def write_into(self, directory: Path) -> None:
        for name, df in self.tables.items():
            df.to_csv(directory / f"{name}.csv", index=False)
        atomic_write_text(directory / RUN_JSON, json_text(self.meta))

    @classmethod
    def load(cls, directory: str | Path) -> Report:
        """Read the CSVs and run.json of an output directory back (any subset of tables)."""
        d = Path(directory)
        if not d.is_dir():
            raise InputError(d, "is not an analysis output directory")
        csvs = sorted(d.glob("*.csv"))
        if not csvs:
            raise InputError(d, "holds no CSV tables")
        tables = {}
        for p in csvs:
            df = read_table(p)
            for c in INT_COLUMNS:
                if c in df.columns and pd.api.types.is_numeric_dtype(df[c]):
                    df[c] = df[c].astype("Int64")
            tables[p.stem] = df
        meta = json.loads((d / RUN_JSON).read_text()) if (d / RUN_JSON).exists() else {}
        return cls(tables, meta)

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}: {len(v)} rows" for k, v in self.tables.items())
        return f"Report({parts})"


def api_command() -> str:
    """run.json's ``command`` for a call from Python: the API and the script that called it."""
    return f"opd_dynamics.analyze (Python API, in: {' '.join(sys.argv)})"


def read_table(path: Path) -> pd.DataFrame:
    """One CSV table as this package writes them: only empty cells are missing, identifiers stay text, and
    an analysis table without its identifying columns is refused rather than read as an empty one."""
    try:
        df = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype=dict.fromkeys(TEXT_COLUMNS, str))
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise InputError(path, f"is not a readable CSV table ({e.__class__.__name__})") from e
    missing = sorted({"step", "tensor"} - set(df.columns)) if path.stem in PER_TENSOR_TABLES else []
    if missing:
        raise InputError(path, f"lacks the column(s) {', '.join(missing)} of an analysis table")
    return df


def _ordered(name: str, df: pd.DataFrame) -> pd.DataFrame:
    """The table's columns in the schema's order (an unknown table: the identifiers first)."""
    t = TABLES.get(name)
    if t is not None:
        return df[t.order(df.columns)]
    return df[[c for c in ID_COLUMNS if c in df.columns] + [c for c in df.columns if c not in ID_COLUMNS]]


def _frame(name: str, rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df = _ordered(name, df)
    for c in INT_COLUMNS:
        if c in df.columns:
            df[c] = pd.array(df[c].astype("float").round(), dtype="Int64") if df[c].isna().any() else df[c]
    return df


def build_tables(rows: dict[str, list[dict]]) -> dict[str, pd.DataFrame]:
    """Turn per-table row lists into DataFrames; add energy_share and the summary table."""
    tables: dict[str, pd.DataFrame] = {}
    for name, rs in rows.items():
        if rs:
            tables[name] = _frame(name, rs)
    if "module_allocation" in tables:
        a = tables["module_allocation"]
        f2 = a["update_norm"].astype(float) ** 2
        fin = np.isfinite(f2)  # a non-finite tensor has no share and does not zero everyone else's
        total = f2.where(fin, 0.0).groupby([a["run"], a["step"]]).transform("sum")
        a["energy_share"] = (f2 / total.where(total > 0)).where(fin)
        tables["module_allocation"] = _ordered("module_allocation", a)  # energy_share at its place
        tables["summary"] = summarize(tables)
    return tables


def table1(spectrum: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table-1 aggregates per run and step (long: run, step, metric, value): the mean of
    TABLE1_METRICS over the attention and MLP matrices whose update is non-zero and finite, and their count
    (n_matrices). Unchanged matrices (frozen, or outside a LoRA's targets) have no ratios, so they are left
    out of all four means alike rather than pulling σ1 and effective rank towards 0 alone."""
    m = spectrum[spectrum["group"].isin(MATRIX_GROUPS)]
    vals = m[list(TABLE1_METRICS)].apply(pd.to_numeric, errors="coerce")
    sn = vals["spectral_norm"]
    vals = vals[(sn > 0) & np.isfinite(sn)]
    g = vals.groupby([m.loc[vals.index, "run"], m.loc[vals.index, "step"]])
    return g.mean().assign(n_matrices=g.size()).reset_index().melt(id_vars=["run", "step"], var_name="metric")


def summarize(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per run and step: the paper's Table-1 aggregates and the allocation by group and by layer (long form)."""
    a = tables["module_allocation"].copy()
    a["f2"] = a["update_norm"].astype(float) ** 2

    def allocation(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
        """update_norm (root of the summed squares) and energy_share per `keys`, long form."""
        g = rows.groupby(keys, as_index=False).agg(f2=("f2", "sum"), energy_share=("energy_share", "sum"))
        g["update_norm"] = np.sqrt(g["f2"])
        return g.melt(id_vars=keys, value_vars=["update_norm", "energy_share"], var_name="metric")

    parts = [allocation(a, ["run", "step", "group"]).assign(aggregate="group", layer=pd.NA)]
    lay = a[a["group"].isin(MATRIX_GROUPS) & a["layer"].notna()]
    if not lay.empty:
        parts.append(allocation(lay, ["run", "step", "layer", "group"]).assign(aggregate="layer"))
    s = tables.get("spectrum")
    if s is not None and not s.empty:
        parts.append(table1(s).assign(aggregate="table1", group="attention+mlp", layer=pd.NA))
    parts += trajectory_aggregates(tables)
    out = pd.concat(parts, ignore_index=True)
    out["layer"] = pd.array(out["layer"], dtype="Int64")
    return out[TABLES["summary"].names].sort_values(
        ["run", "step", "aggregate", "group", "layer", "metric"], kind="stable").reset_index(drop=True)


#: the trajectory columns averaged per group (and, for trajectory.csv's, per layer) in summary.csv
SEGMENT_METRICS = ("segment_cosine", "direction_cosine", "null_cosine", "direction_excess")
TRAJECTORY_METRICS = ("linear_r2", "linear_r2_null", "rank1_share", "rank1_share_null", "lockin_step")


def trajectory_aggregates(tables: dict[str, pd.DataFrame]) -> list[pd.DataFrame]:
    """summary.csv's `trajectory` rows: per run, step and group the mean of the segments' columns over the
    matrices that have a value; per run and group (at the last step), and per layer and group, the mean of
    linear_r2, rank1_share, their random-walk nulls and lockin_step over the matrices (lockin over those that
    locked in) and the fraction of matrices that locked in (`locked_in`); a column a table lacks (one written
    before the nulls) is left out."""
    out = []
    seg = tables.get("segments")
    if seg is not None and not seg.empty:
        g = seg.groupby(["run", "step", "group"], as_index=False)[list(SEGMENT_METRICS)].mean()
        out.append(g.melt(id_vars=["run", "step", "group"], var_name="metric").assign(aggregate="trajectory",
                                                                                        layer=pd.NA))
    tr = tables.get("trajectory")
    if tr is not None and not tr.empty:
        tr = tr.assign(locked_in=tr["lockin_step"].notna().astype(float),
                       step=tr.groupby("run")["step"].transform("max"))
        cols = [c for c in (*TRAJECTORY_METRICS, "locked_in") if c in tr.columns]
        for keys, agg in ((["run", "step", "group"], "trajectory"), (["run", "step", "layer", "group"], "layer")):
            rows = tr if "layer" not in keys else tr[tr["layer"].notna()]
            if rows.empty:
                continue
            g = rows.groupby(keys, as_index=False)[cols].mean()
            g = g.melt(id_vars=keys, var_name="metric").assign(aggregate=agg)
            out.append(g if "layer" in keys else g.assign(layer=pd.NA))
    return out

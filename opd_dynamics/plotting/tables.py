"""Getting tidy tables out of whatever the caller holds: a Report, a dict of DataFrames, a directory, or many."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from opd_dynamics.analysis.report import read_table
from opd_dynamics.errors import InputError
from opd_dynamics.schema import ALL_INT_COLUMNS, PER_RUN_TABLES, PER_TENSOR_TABLES, PROVENANCE_FILES


@dataclass
class Tables:
    """Merged tables of one or more output directories, and their provenance files: (path, parsed JSON)."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    metas: list[tuple[str, dict]] = field(default_factory=list)

    @property
    def meta(self) -> dict:
        return self.metas[0][1] if self.metas else {}

    def __contains__(self, name: str) -> bool:
        """A table is there when it was read and has rows (as for `Report`)."""
        return name in self.tables and not self.tables[name].empty


def _read_dir(d: Path) -> tuple[dict[str, pd.DataFrame], list[tuple[str, dict]]]:
    tables: dict[str, pd.DataFrame] = {}
    for p in sorted(d.glob("*.csv")):
        df = read_table(p)
        if df.empty and not len(df.columns):
            continue
        if "run" not in df.columns and p.stem in PER_RUN_TABLES:
            df.insert(0, "run", d.name)
        tables[p.stem] = df
    metas = []
    for name in PROVENANCE_FILES:
        f = d / name
        if f.exists():
            try:
                meta = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise InputError(f, f"is not valid JSON ({e.msg} at line {e.lineno})") from e
            metas.append((str(f), meta if isinstance(meta, dict) else {"content": meta}))
    return tables, metas


def load_tables(dirs: str | Path | Iterable[str | Path]) -> Tables:
    """Read the CSVs (and run.json) of each directory and of its immediate subdirectories; same-named tables
    are concatenated (so a lab's `opd/eval.csv` and `grpo/eval.csv` become one `eval` table)."""
    if isinstance(dirs, (str, Path)):
        dirs = [dirs]
    out = Tables()
    parts: dict[str, list[pd.DataFrame]] = {}
    for d in map(Path, dirs):
        if not d.is_dir():
            raise InputError(d, "is not a directory of result tables")
        found = False
        for sub in [d] + sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            tables, metas = _read_dir(sub)
            found = found or bool(tables)
            for k, v in tables.items():
                parts.setdefault(k, []).append(v)
            out.metas.extend(metas)
        if not found:
            raise InputError(d, "holds no CSV tables (neither in it nor in its immediate subdirectories)")
    out.tables = {k: _normalise(pd.concat(v, ignore_index=True).drop_duplicates(ignore_index=True))
                  for k, v in parts.items()}
    _refuse_pooled_runs(out.tables)
    return out


_ROW_KEYS = {"singular_values": ["index"]}


def _refuse_pooled_runs(tables: dict[str, pd.DataFrame]) -> None:
    """Two directories with a run of the same name (two model sizes, exact and fast …) would be averaged
    together without a word: refuse, naming the run."""
    for name in PER_TENSOR_TABLES:
        df = tables.get(name)
        if df is None or df.empty or not {"run", "step", "tensor"} <= set(df.columns):
            continue
        dup = df[df.duplicated([c for c in ("run", "step", "tensor", "expert", *_ROW_KEYS.get(name, []))
                                if c in df], keep=False)]
        if len(dup):
            raise InputError(f"{name}.csv", f"has different rows for run {dup['run'].iloc[0]!r}, step "
                                            f"{dup['step'].iloc[0]}, tensor {dup['tensor'].iloc[0]!r} in two of the "
                                            "directories given; give the runs distinct names (analyze --run NAME=DIR)")


def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for c in ALL_INT_COLUMNS:
        if c in df.columns and df[c].dtype == object:  # numbers held as text ("10"): sorted as text, 10 < 2
            num = pd.to_numeric(df[c].replace("", np.nan), errors="coerce")
            if num.notna().sum() == df[c].replace("", np.nan).notna().sum():
                df[c] = num
        if c in df.columns and pd.api.types.is_numeric_dtype(df[c]):
            df[c] = pd.array(df[c].astype("float").round(), dtype="Int64")
    if "run" in df.columns:
        df["run"] = df["run"].astype(str)
    return df


def as_tables(obj: Any) -> Tables:
    """Tables from a Report-like object (`.tables`, optional `.meta`), a dict, a path, a Tables, or a list of them."""
    if isinstance(obj, Tables):
        return obj
    if isinstance(obj, (str, Path)):
        return load_tables([obj])
    if isinstance(obj, dict):
        return Tables({k: _normalise(v) for k, v in obj.items() if isinstance(v, pd.DataFrame)})
    if hasattr(obj, "tables"):
        meta = getattr(obj, "meta", None) or {}
        return Tables({k: _normalise(v) for k, v in obj.tables.items()}, [("report", meta)] if meta else [])
    if isinstance(obj, Sequence):
        items = list(obj)
        if all(isinstance(x, (str, Path)) for x in items):
            return load_tables(items)
        merged = Tables()
        parts: dict[str, list[pd.DataFrame]] = {}
        for x in items:
            t = as_tables(x)
            merged.metas.extend(t.metas)
            for k, v in t.tables.items():
                parts.setdefault(k, []).append(v)
        merged.tables = {k: _normalise(pd.concat(v, ignore_index=True).drop_duplicates(ignore_index=True))
                         for k, v in parts.items()}
        return merged
    raise InputError(None, f"cannot read result tables from a {type(obj).__name__}; "
                           "give a Report, a dict of DataFrames or a directory")


def require_table(obj: Any, name: str, columns: Iterable[str] = ()) -> pd.DataFrame:
    """The table `name` of a Report/dict/dir, checked for `columns`; one clear error when absent."""
    t = as_tables(obj).tables.get(name)
    if t is None or t.empty:
        raise InputError(f"{name}.csv", "is absent or empty, but this figure needs it")
    missing = [c for c in columns if c not in t.columns]
    if missing:
        raise InputError(f"{name}.csv", f"lacks the column(s) {', '.join(missing)}")
    return t


def at_step(df: pd.DataFrame, step: int | None) -> pd.DataFrame:
    """Rows at `step` for every run, or at each run's last step when `step` is None."""
    if "step" not in df.columns:
        return df
    if step is None:
        last = df.groupby("run")["step"].transform("max")
        return df[df["step"] == last]
    out = df[df["step"] == step]
    missing = sorted(set(df["run"]) - set(out["run"]))
    if missing:
        raise InputError(None, f"step {step} is not in the table for run(s) {', '.join(missing)}")
    return out


def steps_of(df: pd.DataFrame) -> dict[str, int]:
    """Step per run of an at_step() slice (for titles)."""
    return {str(r): int(s) for r, s in df.groupby("run")["step"].max().items()} if "step" in df.columns else {}


def as_bool(s: pd.Series) -> pd.Series:
    """CSV booleans (True/False, 'true', 1) as bool."""
    if s.dtype == bool:
        return s
    return s.astype(str).str.strip().str.lower().isin(["true", "1", "1.0", "yes"])


def numeric(s: pd.Series) -> np.ndarray:
    return pd.to_numeric(s, errors="coerce").astype(float).to_numpy()

"""One self-contained HTML page for a set of result directories: every figure the tables allow (embedded
as base64 PNG), the key tables, and the provenance recorded in each run.json. No external CSS/JS, so it
opens offline; written under a temporary name and renamed."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from opd_dynamics._version import __version__
from opd_dynamics.effopd.summary import BASELINE, median_speedup
from opd_dynamics.errors import InputError
from opd_dynamics.io.writer import atomic_write_text, output_errors
from opd_dynamics.plotting.render import SECTIONS, available_figures
from opd_dynamics.plotting.style import GROUP_ORDER, order_runs
from opd_dynamics.plotting.tables import Tables, as_tables, numeric
from opd_dynamics.schema import TABLES

_CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Helvetica,Arial,sans-serif;margin:0 auto;
max-width:1200px;padding:1.5em 2em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #0072B2;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.4em}nav ul{columns:3;list-style:none;padding-left:0}nav li{margin:.15em 0}
a{color:#0072B2;text-decoration:none}a:hover{text-decoration:underline}
figure{margin:1.2em 0;padding:.6em;border:1px solid #e4e4e4;border-radius:6px;background:#fff}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{color:#555;font-size:.92em;margin-top:.4em}
table.tbl{border-collapse:collapse;font-size:.88em;margin:.6em 0}
table.tbl th,table.tbl td{border:1px solid #ddd;padding:.25em .6em;text-align:right}
table.tbl th{background:#f3f6fa}table.tbl td:first-child,table.tbl th:first-child{text-align:left}
code,pre{font-family:SFMono-Regular,Menlo,Consolas,monospace;font-size:.85em}
pre{background:#f6f8fa;padding:.8em;overflow:auto;max-height:30em;border-radius:4px}
.muted{color:#777}.skipped li{color:#777}
"""


#: the resolution of the report's images (the files: render.PNG_DPI). A figure is laid out in inches and its texts
#: fitted at the resolution it is drawn at (plotting._fit), so it reads the same in both; the page scales an image
#: down to its width (at most 1200 px) and never crops it
REPORT_DPI = 110


def _png_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=REPORT_DPI)
    fig.clear()
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _df_html(df: pd.DataFrame) -> str:
    return df.to_html(index=False, border=0, classes="tbl", na_rep="–", escape=True,
                      float_format=lambda x: f"{x:.4g}")


def _flat(p: pd.DataFrame, column_order=None) -> pd.DataFrame:
    """A pivot table as a plain frame: index back to columns, no column-axis name, OPD's row first."""
    if column_order is not None:
        p = p[sorted(p.columns, key=lambda c: column_order.index(c) if c in column_order else len(column_order))]
    p = p.reset_index().rename_axis(None, axis=1)
    if "run" in p.columns:
        order = {r: i for i, r in enumerate(order_runs(p["run"].unique()))}
        p = p.sort_values("run", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)
    return p


def key_tables(tables: Tables) -> list[tuple[str, pd.DataFrame]]:
    """The summary tables shown on the page (title, DataFrame), each only when its source table exists."""
    from opd_dynamics.plotting.allocation import group_values
    from opd_dynamics.plotting.direction import TABLE1_METRICS, table1_rows

    t = tables.tables
    out: list[tuple[str, pd.DataFrame]] = []

    if "summary" in tables or "spectrum" in tables:
        try:
            d = table1_rows(tables)
            p = _flat(d.pivot_table(index=["run", "step"], columns="metric", values="value"), list(TABLE1_METRICS))
            out.append(("Table 1: mean over attention and MLP matrices (last step)", p))
        except InputError:
            pass
    if "summary" in tables or "module_allocation" in tables:
        try:
            for metric, title in (("energy_share", "Energy share by group (last step)"),
                                  ("update_norm", "Update norm by group, ‖ΔW‖_F (last step)")):
                g = group_values(tables, metric)
                out.append((title, _flat(g.pivot_table(index=["run", "step"], columns="group", values="value"),
                                         list(GROUP_ORDER))))
        except InputError:
            pass
    if "eval" in tables and {"run", "step", "accuracy"} <= set(t["eval"].columns):
        rows = []
        for run, d in t["eval"].groupby("run"):
            d = d.sort_values("step")
            acc = numeric(d["accuracy"])
            row = {"run": run, "first step": int(d["step"].iloc[0]), "last step": int(d["step"].iloc[-1]),
                   "accuracy first": acc[0], "accuracy last": acc[-1], "accuracy best": np.nanmax(acc)}
            if "accuracy_sampled" in d.columns:
                row["sampled last"] = numeric(d["accuracy_sampled"])[-1]
            if "reverse_kl" in d.columns:
                kl = numeric(d["reverse_kl"])
                row["reverse KL first"], row["reverse KL last"] = kl[0], kl[-1]
            rows.append(row)
        out.append(("Evaluation during training", _flat(pd.DataFrame(rows).set_index("run"))))
    if "embedding_swap" in tables:
        e = t["embedding_swap"]
        out.append(("Embedding swap accuracy",
                    _flat(e.pivot_table(index="run", columns="variant", values="accuracy"),
                          list(dict.fromkeys(e["variant"].astype(str))))))
    if "effopd_summary" in tables:
        s = t["effopd_summary"].copy()
        # the measured values (the summary's float columns: steps to target, accuracy, seconds) get medians
        measured = [c.name for c in TABLES["effopd_summary"].columns if c.dtype == "float"]
        cols = [c for c in measured if c in s.columns]
        for c in cols:
            s[c] = numeric(s[c])
        m = s.groupby("method")[cols].median()  # medians over the seeds that have a value
        m.insert(0, "seeds", s.groupby("method")["seed"].nunique() if "seed" in s.columns else np.nan)
        if "steps_to_target" in cols:
            m.insert(1, "seeds reaching target", s.groupby("method")["steps_to_target"].count())
        if BASELINE in m.index and "steps_to_target" in cols and "seed" in s.columns:
            m[f"step speedup vs {BASELINE} (median of per-seed ratios)"] = [median_speedup(s, method)
                                                                           for method in m.index]
        m.columns = [f"median {c}" if c in cols else c for c in m.columns]
        if "tie_accepts" in s.columns:  # jumps no validation score justified (EFFOPD.md, "Ties")
            ties = pd.to_numeric(s["tie_accepts"], errors="coerce")
            m["jumps accepted on a tie (all seeds)"] = ties.groupby(s["method"]).sum()
        out.append(("EffOPD summary (median over seeds)", m.reset_index()))
    return out


def _scalar(v: Any) -> str:
    if isinstance(v, list) and v and all(isinstance(x, dict) and "step" in x for x in v):
        return "steps " + ", ".join(str(x["step"]) for x in v)
    if isinstance(v, (dict, list)):
        s = json.dumps(v, default=str)
        return s if len(s) <= 160 else s[:157] + "…"
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:12] + "…"  # a sha256: the prefix identifies it; the full value is in run.json below
    return "" if v is None else str(v)


def _records(v: Any, limit: int = 50) -> str:
    """A list of dicts (or a dict) as an HTML table; anything else as escaped text."""
    if isinstance(v, dict):
        v = [{"key": k, "value": _scalar(x)} for k, x in v.items()]
    if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        df = pd.DataFrame([{k: _scalar(x) for k, x in r.items()} for r in v[:limit]])
        more = f"<p class='muted'>… and {len(v) - limit} more</p>" if len(v) > limit else ""
        return _df_html(df) + more
    if isinstance(v, list):
        return "<p>" + html.escape(", ".join(map(str, v[:limit]))) + "</p>" if v else "<p class='muted'>none</p>"
    return f"<p>{html.escape(_scalar(v))}</p>"


def provenance_html(source: str, meta: dict) -> str:
    """One provenance file (run.json, lab.json, ...): version, command, other top-level values, inputs,
    timings, skipped and failed tensors, then the whole file."""
    parts = [f"<h3>{html.escape(source)}</h3>"]
    head = {k: meta[k] for k in ("version", "python", "torch") if k in meta}
    if head:
        parts.append("<p>" + " · ".join(f"{html.escape(k)} <code>{html.escape(str(v))}</code>"
                                          for k, v in head.items()) + "</p>")
    if "command" in meta:
        parts.append(f"<p>command: <code>{html.escape(str(meta['command']))}</code></p>")
    shown = {"version", "python", "torch", "command", "inputs", "timings_s", "timings", "device", "dtype", "tied"}
    scalars = {k: v for k, v in meta.items() if k not in shown and not isinstance(v, (dict, list))
               and "skip" not in k.lower() and "fail" not in k.lower()}
    if scalars:
        parts.append(_records(scalars))
    for run, tied in (meta.get("tied") or {}).items():  # weights stored once under two names
        parts.append(f"<p>run {html.escape(str(run))}: " + "; ".join(
            f"<code>{html.escape(n)}</code> is tied to <code>{html.escape(t)}</code> (analysed once, as it)"
            for n, t in tied.items()) + "</p>")
    for key, title in (("inputs", "Inputs"), ("timings_s", "Timings (s)"), ("timings", "Timings"),
                       ("device", "Device"), ("dtype", "Dtype")):
        if key in meta:
            parts.append(f"<h4>{title}</h4>" + _records(meta[key]))
    for key in [k for k in meta if "skip" in k.lower() or "fail" in k.lower()]:
        v = meta[key]
        n = len(v) if isinstance(v, (list, dict)) else 1
        parts.append(f"<h4>{html.escape(key.capitalize())} ({n})</h4>" + _records(v))
    parts.append("<details><summary>full run.json</summary><pre>"
                 + html.escape(json.dumps(meta, indent=2, default=str)) + "</pre></details>")
    return "\n".join(parts)


def build_html(source: Any, title: str = "opd-dynamics report") -> tuple[str, list[str], dict[str, str]]:
    """The page as a string, the names of the figures it embeds, and {figure: reason} for those skipped."""
    tables = as_tables(source)
    specs, skipped = available_figures(tables)
    figs: dict[str, list[str]] = {s: [] for s in SECTIONS}
    names = []
    for spec in specs:
        try:
            b64 = _png_base64(spec.fn(tables))
        except InputError as e:  # the tables exist but cannot feed this figure: list it as skipped
            skipped[spec.name] = str(e)
            continue
        names.append(spec.name)
        figs.setdefault(spec.section, []).append(
            f'<figure id="fig-{spec.name}" data-figure="{spec.name}">'
            f'<img src="data:image/png;base64,{b64}" alt="{html.escape(spec.name)}">'
            f"<figcaption><b>{html.escape(spec.name)}</b>: {html.escape(spec.caption_for(tables))}</figcaption>"
            "</figure>")
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p class='muted'>opd-dynamics {html.escape(__version__)} · generated {stamp} · "
            f"{len(names)} figures from {len(tables.tables)} tables: "
            + html.escape(", ".join(sorted(tables.tables))) + "</p>"]
    body.append('<nav id="contents"><h2>Figures</h2><ul>' + "".join(
        f'<li><a href="#fig-{n}" data-figure="{n}">{html.escape(n)}</a></li>' for n in names) + "</ul>")
    if skipped:
        body.append("<p class='muted'>Not drawn:</p><ul class='skipped'>" + "".join(
            f"<li>{html.escape(n)}: {html.escape(r)}</li>" for n, r in skipped.items()) + "</ul>")
    body.append("</nav>")
    for section, items in figs.items():
        if items:
            sid = section.lower().replace(" ", "-")
            body.append(f'<section id="{sid}"><h2>{html.escape(section)}</h2>' + "\n".join(items) + "</section>")
    kt = key_tables(tables)
    if kt:
        body.append('<section id="tables"><h2>Key tables</h2>' + "\n".join(
            f"<h3>{html.escape(t)}</h3>{_df_html(df)}" for t, df in kt) + "</section>")
    if tables.metas:
        body.append('<section id="provenance"><h2>Provenance</h2>' + "\n".join(
            provenance_html(src, m) for src, m in tables.metas) + "</section>")
    else:
        body.append('<section id="provenance"><h2>Provenance</h2><p class="muted">no run.json found</p></section>')
    page = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    return page, names, skipped


def render_html(report_dirs: str | Path | Iterable[Any] | Any, html_path: str | Path, overwrite: bool = False,
                *, title: str = "opd-dynamics report") -> Path:
    """Write one self-contained HTML page for `report_dirs` (directories, Reports or dicts of DataFrames;
    their tables are merged) to `html_path`; refuses an existing file unless `overwrite`."""
    path = Path(html_path)
    if path.suffix.lower() not in (".html", ".htm"):  # --overwrite must never replace a table or run.json
        raise InputError(path, "is not an .html path; the report is written only to a file named *.html")
    if path.exists() and not overwrite:
        raise InputError(path, "already exists; pass overwrite=True to replace it", ("overwrite",))
    if path.exists() and (path.is_dir() or path.is_symlink()):
        raise InputError(path, "is a directory or a link, not an HTML file path")
    page, _, _ = build_html(report_dirs, title=title)
    with output_errors(path):  # a read-only file system, a full disk …: one sentence naming the page
        atomic_write_text(path, page)
    return path

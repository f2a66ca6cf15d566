"""The HTML report: one self-contained page that parses, embeds every figure it lists as a real PNG,
shows the key tables and provenance, and never overwrites without being asked."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import base64  # noqa: E402
from html.parser import HTMLParser  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from test_plotting import make_tables, write_dirs  # noqa: E402

from opd_dynamics import plotting as P  # noqa: E402
from opd_dynamics.errors import InputError  # noqa: E402
from opd_dynamics.plotting.html import render_html  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    """Collects what the tests look at: images (by figure id), contents links, external references, headings."""

    def __init__(self):
        super().__init__()
        self.images: dict[str, str] = {}
        self.claimed: list[str] = []
        self.external: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []
        self._figure: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag in ("script", "link", "iframe"):
            self.external.append(tag)
        for key in ("src", "href"):
            v = a.get(key) or ""
            if v and not (v.startswith("data:") or v.startswith("#")):
                self.external.append(v)
        if tag == "figure":
            self._figure = a.get("data-figure")
        if tag == "img":
            self.images[self._figure or f"?{len(self.images)}"] = a["src"]
        if tag == "a" and a.get("data-figure"):
            self.claimed.append(a["data-figure"])

    def handle_endtag(self, tag):
        if tag == "figure":
            self._figure = None

    def handle_data(self, data):
        self.text.append(data)


def _parse(path) -> _Page:
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    return p


def test_report_is_self_contained_and_embeds_every_claimed_figure(tmp_path):
    dirs = write_dirs(tmp_path, make_tables())
    out = render_html(dirs, tmp_path / "report" / "index.html")
    page = _parse(out)
    assert page.external == []
    assert page.claimed == [s.name for s in P.FIGURES]
    assert set(page.images) == set(page.claimed)
    for name, src in page.images.items():
        assert src.startswith("data:image/png;base64,"), name
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data[:8] == PNG and len(data) > 5000, name
    text = " ".join(page.text)
    for heading in ("Table 1: mean over attention and MLP matrices", "Energy share by group",
                    "Evaluation during training", "EffOPD summary", "Provenance", "Inputs", "Timings (s)"):
        assert heading in text
    # provenance from run.json: command, input steps, skipped tensor with its (escaped) reason
    assert "opd-dynamics analyze --run opd=a" in text
    assert "steps 10, 20, 40" in text
    assert "not in the base <checkpoint>" in text
    assert "step speedup vs vanilla" in text
    assert str(dirs[0] / "run.json") in text and str(dirs[1] / "lab.json") in text
    assert sorted(p.name for p in out.parent.iterdir()) == ["index.html"]  # no temporary file left


def test_report_lists_skipped_figures_and_refuses_to_overwrite(tmp_path):
    tables = make_tables()
    only = {k: tables[k] for k in ("module_allocation", "summary")}
    out = render_html(only, tmp_path / "r.html")
    page = _parse(out)
    assert set(page.claimed) == {"allocation_heatmap", "allocation_heatmap_share", "layer_norms", "group_energy",
                                "table1"}  # summary.csv carries the table1 rows
    assert set(page.images) == set(page.claimed)
    text = " ".join(page.text)
    assert "scaling: scaling.csv is absent" in text and "no run.json found" in text
    before = out.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        render_html(only, out)
    assert out.read_bytes() == before
    render_html({"scaling": tables["scaling"]}, out, overwrite=True)
    assert _parse(out).claimed == ["scaling"]
    prov = tmp_path / "run.json"
    prov.write_text("{}")
    with pytest.raises(InputError, match="is not an .html path"):
        render_html(only, prov, overwrite=True)  # an input's run.json is never replaced by a page
    assert prov.read_text() == "{}"


def test_cli_plot_and_report(tmp_path):
    from opd_dynamics.cli import main

    dirs = [str(d) for d in write_dirs(tmp_path, make_tables())]
    runner = CliRunner()
    r = runner.invoke(main, ["plot", dirs[1], "--figures", str(tmp_path / "f"), "--format", "svg"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == [
        "embedding_swap.svg", "eval_curves.svg", "rank_recovery.svg", "rescale.svg", "scaling.svg",
        "step_alignment.svg"]  # the lab dir: its own tables and its sketches' alignment
    assert "skipped" in r.output and "effopd_curves" in r.output
    html = tmp_path / "r.html"
    r = runner.invoke(main, ["report", dirs[2], "--html", str(html)])
    assert r.exit_code == 0, r.output
    assert html.exists() and str(html) in r.output
    r = runner.invoke(main, ["report", dirs[2], "--html", str(html)])
    assert r.exit_code == 2 and "already exists" in r.output and len(r.output.strip().splitlines()) == 1
    r = runner.invoke(main, ["report", dirs[2], "--html", str(html), "--overwrite"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["plot", str(tmp_path / "f"), "--figures", str(tmp_path / "g")])
    assert r.exit_code == 2 and "holds no CSV tables" in r.output


def test_effopd_summary_is_the_median_of_per_seed_ratios_and_counts_misses():
    from opd_dynamics.plotting import as_tables
    from opd_dynamics.plotting.html import key_tables

    rows = [dict(seed=s, method=m, steps_to_target=v, final_accuracy=0.9, wall_s=1.0, validation_s=0.0,
                 tie_accepts=s if m == "effopd" else 0)
            for m, vals in (("vanilla", (100, 200, 300)), ("effopd", (100, 50, 300)), ("fixed", (50, None, None)))
            for s, v in zip((0, 1, 2), vals)]
    out = dict(key_tables(as_tables({"effopd_summary": pd.DataFrame(rows)})))
    t = out["EffOPD summary (median over seeds)"].set_index("method")
    speed = t["step speedup vs vanilla (median of per-seed ratios)"]
    assert speed["effopd"] == pytest.approx(1.0)  # ratios 1, 4, 1 (the ratio of medians would say 4)
    assert speed["fixed"] == pytest.approx(2.0)  # only seed 0 reached the target
    assert list(t.loc[["vanilla", "effopd", "fixed"], "seeds reaching target"]) == [3, 3, 1]
    assert list(t.loc[["vanilla", "effopd", "fixed"], "jumps accepted on a tie (all seeds)"]) == [0, 3, 0]


def test_every_figure_names_a_section_of_the_report():
    """The report's section order is defined once (`plotting.render.SECTIONS`, which the HTML page imports); a
    figure naming another section would land after every listed one, out of the order."""
    from opd_dynamics.plotting import html, render

    assert html.SECTIONS is render.SECTIONS
    stray = {s.name: s.section for s in render.FIGURES if s.section not in render.SECTIONS}
    assert not stray, f"figures naming a section not in plotting.render.SECTIONS: {stray}"

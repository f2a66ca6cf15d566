"""The demo: refuses to clobber, and (reduced setting) runs every stage into one directory with a parseable report."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pandas as pd
import pytest

from opd_dynamics.errors import InputError
from opd_dynamics.lab.demo import run_demo


def test_refuses_existing_dir_without_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="already exists"):
        run_demo(tmp_path / "out")


def test_overwrite_refuses_a_directory_that_is_not_a_demo_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(InputError, match="was not written by opd-dynamics"):
        run_demo(out, overwrite=True)
    assert (out / "precious.txt").read_text() == "keep me"


def test_a_bad_preset_leaves_the_earlier_demo_in_place(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "demo.json").write_text("{}")  # an earlier demo's output, which --overwrite may replace
    with pytest.raises(InputError, match="unknown lab preset 'smok'"):
        run_demo(out, preset="smok", overwrite=True)
    assert (out / "demo.json").read_text() == "{}"


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src", ""))


@pytest.mark.slow
# on the smoke lab's worker: both train with torch, and side by side on CI's two cores each took 3-4x as long
# (demo 20 s alone, 69-136 s beside the lab, measured when the lab trained on two threads)
@pytest.mark.xdist_group("smoke_lab")
def test_fast_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    html = run_demo(out, fast=True, log=lambda m: None)
    assert html == (out / "report.html").resolve()
    meta = json.loads((out / "demo.json").read_text())
    assert meta["status"] == "done" and meta["fast"] is True
    alloc = pd.read_csv(out / "analysis" / "module_allocation.csv")
    assert set(alloc["run"]) == {"opd", "grpo"}
    # the line probe of the vanilla run at (4, 8) gates the EffOPD and fixed runs: they ran iff it found foresight
    eff = json.loads((out / "effopd" / "effopd.json").read_text())
    probe = pd.read_csv(out / "effopd" / "probe.csv")
    assert set(zip(probe["step_from"], probe["step"])) == {(4, 8)} and eff["probe_pairs"] == [[4, 8]]
    passed = eff["probe_verdict"]["0"]["4:8"]
    ahead = probe[probe["coef"].between(0.5, 2.0)]
    assert passed == bool(ahead["passes"].any())  # the gate: a gain above two paired SEs, the KL not worse
    assert ahead["paired_se"].notna().all() and ahead["kl"].notna().all()  # per-prompt scores: the margin is known
    assert (~ahead["passes"] | (ahead["gain"] > 2 * ahead["paired_se"])).all()
    methods = set(pd.read_csv(out / "effopd" / "effopd_summary.csv")["method"])
    assert methods == ({"vanilla", "effopd", "fixed"} if passed else {"vanilla"})
    assert eff["gated_out_seeds"] == ([] if passed else [0])
    ex = pd.read_csv(out / "extrapolation" / "extrapolation.csv")  # fast: steps 5 and 10, so 5 is observed
    assert set(ex["last_observed"]) == {5} and len(ex) == 2 * 5
    pngs = sorted((out / "figures").glob("*.png"))
    assert pngs and (out / "figures" / "extrapolation.png").exists()
    p = _Images()
    p.feed(html.read_text())
    assert len(p.srcs) >= 1 and all(s.startswith("data:image/png;base64,") for s in p.srcs)

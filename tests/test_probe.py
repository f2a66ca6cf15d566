"""The line probe on planted trajectories written as real checkpoints: a straight path gives a monotone probe
with known scores; bad pairs and existing outputs are refused in one sentence; the command line works."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from opd_dynamics.cli import main
from opd_dynamics.effopd.probe import line_probe, verdict
from opd_dynamics.errors import InputError
from opd_dynamics.io.model_dir import ModelDir
from opd_dynamics.io.series import CheckpointSeries
from opd_dynamics.schema import TABLES

from builders import write_dir

Q = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"
STEPS = (4, 8, 16)
TARGET = 64.0


def _line(tmp_path):
    """W_t = W_0 + t·M for q_proj (float64, so the arithmetic is exact to rounding); the norm never moves."""
    rng = np.random.default_rng(0)
    w0, m = rng.normal(size=(16, 24)), rng.normal(size=(16, 24)) * 1e-2
    base = {Q: torch.tensor(w0), NORM: torch.ones(24, dtype=torch.float64)}
    write_dir(tmp_path / "base", base)
    for t in STEPS:
        write_dir(tmp_path / "run" / f"checkpoint-{t}", {Q: torch.tensor(w0 + t * m), NORM: base[NORM]})
    series = CheckpointSeries.discover(tmp_path / "run", base=tmp_path / "base", name="opd")
    return series, w0, m


def _distance_score(w0, m):
    """−‖W − (W_0 + 64·M)‖F: higher the closer to a point further along the line."""
    target = w0 + TARGET * m

    def score(path):
        with ModelDir(path) as d:
            return -float(np.linalg.norm(d.get(Q).numpy() - target))
    return score


def test_a_straight_line_gives_a_monotone_probe_with_known_scores(tmp_path):
    series, w0, m = _line(tmp_path)
    coefs = (-0.5, 0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
    df = line_probe(series, [(8, 16), (0, 4)], _distance_score(w0, m), coefs=coefs, out=tmp_path / "probe")
    norm = np.linalg.norm(m)
    for (s, t), d in df.groupby(["step_from", "step"]):
        d = d.sort_values("coef")
        assert list(d["coef"]) == sorted(coefs)
        expect = [-abs(TARGET - (t + c * (t - s))) * norm for c in d["coef"]]
        np.testing.assert_allclose(d["score"], expect, rtol=1e-9)
        assert np.all(np.diff(d["score"].to_numpy()) > 0)  # monotone: every step ahead is closer to the target
    assert verdict(df) == {"0:4": True, "8:16": True}
    meta = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert meta["verdict"] == {"0:4": True, "8:16": True} and meta["pairs"] == [[8, 16], [0, 4]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "probe", "run"]  # no candidate left behind


def test_going_back_is_better_when_the_target_lies_behind(tmp_path):
    series, w0, m = _line(tmp_path)
    target = w0 + 6.0 * m  # between steps 4 and 8: every c > 0 from (4, 8) moves away

    def score(path):
        with ModelDir(path) as d:
            return -float(np.linalg.norm(d.get(Q).numpy() - target))
    df = line_probe(series, [(4, 8)], score)
    assert verdict(df) == {"4:8": False}
    best = df.loc[df["score"].idxmax(), "coef"]
    assert best == -0.5


@pytest.mark.parametrize("pairs, phrase", [([(8, 4)], "first step before its second"), ([(4, 5)], "step 5 is not"),
                                           ([], "pairs is empty")])
def test_bad_pairs_are_refused_before_any_evaluation(tmp_path, pairs, phrase):
    series, w0, m = _line(tmp_path)
    calls = []
    with pytest.raises(InputError, match=phrase):
        line_probe(series, pairs, lambda p: calls.append(p) or 0.0)
    assert calls == []


def test_probe_command(tmp_path):
    series, w0, m = _line(tmp_path)
    r = CliRunner().invoke(main, ["probe", str(tmp_path / "run"), "--base", str(tmp_path / "base"), "--pairs",
                                  "8:16", "--coefs", "0,1", "--eval-cmd", "echo 0.5 #", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "no c in [0.5, 2] scores above W_t" in r.output
    again = CliRunner().invoke(main, ["probe", str(tmp_path / "run"), "--base", str(tmp_path / "base"), "--pairs",
                                      "8:16", "--eval-cmd", "echo 1", "--out", str(tmp_path / "o")])
    assert again.exit_code == 2 and "already exists; pass --overwrite" in again.output
    bad = CliRunner().invoke(main, ["probe", str(tmp_path / "run"), "--base", str(tmp_path / "base"), "--pairs",
                                    "8-16", "--eval-cmd", "echo 1", "--out", str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "--pairs '8-16' must be pairs of steps" in bad.output


def test_the_load_mode_reaches_the_candidates(tmp_path):
    """--load-mode masters on a DeepSpeed ZeRO-2 step: the candidates are W_t + c·(W_t − W_s) from the fp32 master
    weights (float32, as DeepSpeed's own reconstruction), not from the bf16 model states the step also holds."""
    from pathlib import Path

    from safetensors.torch import load_file

    ds = Path(__file__).parent / "data" / "deepspeed"  # written by DeepSpeed: data/make_deepspeed.py
    down = "model.layers.1.mlp.down_proj.weight"
    w1 = load_file(ds / "zero2" / "fp32_reference.safetensors")[down]
    w0 = load_file(ds / "base" / "model.safetensors")[down].to(torch.float32)
    series = CheckpointSeries.discover(ds / "zero2", base=ds / "base", load_mode="masters")
    seen = {}

    def score(path):
        if path.name != "global_step1":  # a candidate
            with ModelDir(path) as d:
                seen[path.name] = d.get(down)
        return 0.0

    line_probe(series, [(0, 1)], score, coefs=(0.0, 2.0), work=tmp_path)
    (cand,) = seen.values()
    assert cand.dtype == torch.float32
    assert torch.equal(cand, (w1.double() + 2.0 * (w1.double() - w0.double())).float())  # float64, rounded once


def _position_scorer(w0, m, by_position):
    """A scorer reading where a candidate lies on the line (W = W_0 + p·M) and returning by_position(p)."""
    def score(path):
        with ModelDir(path) as d:
            p = float(((d.get(Q).numpy() - w0) * m).sum() / (m * m).sum())
        return by_position(round(p, 6))
    return score


def _items(n_right: int, gained: int = 0, lost: int = 0, n: int = 500):
    """0/1 correctness of n prompts: the first n_right right, then `gained` more right, the last `lost` wrong."""
    x = np.zeros(n)
    x[: n_right + gained] = 1.0
    if lost:
        x[:lost] = 0.0
    return x


def test_the_gate_needs_a_gain_above_two_paired_standard_errors_and_a_kl_not_worse(tmp_path):
    """Pair 8:16 on 500 prompts: W_16 (position 16) gets 400 right. One prompt more at c = 1 (+0.002, the shipped
    probe's best) stays below two paired SEs (0.004); 25 more (+0.05, SE 0.0097) pass, unless the KL rises by
    more than two of its paired SEs."""
    from opd_dynamics.analysis.stats import paired_se
    from opd_dynamics.effopd.probe import ProbeScore

    series, w0, m = _line(tmp_path)
    kl_items = np.linspace(0.5, 1.5, 500)

    def run(gained_at_24, kl_shift=0.0):
        def by_position(p):
            if p == 24.0:  # c = 1 from (8, 16)
                return ProbeScore(_items(400, gained_at_24).mean(), _items(400, gained_at_24), 1.0 + kl_shift,
                                  kl_items + kl_shift)
            return ProbeScore(_items(400).mean() - (0.01 if p != 16.0 else 0.0),
                              _items(400, lost=5 if p != 16.0 else 0), 1.0, kl_items)
        return line_probe(series, [(8, 16)], _position_scorer(w0, m, by_position), coefs=(0.0, 1.0, 2.0))

    one = run(1)
    r = one[one["coef"] == 1.0].iloc[0]
    assert r["gain"] == pytest.approx(0.002) and r["paired_se"] == pytest.approx(paired_se(_items(400),
                                                                                            _items(400, 1)))
    assert r["paired_se"] == pytest.approx(0.002, rel=1e-3) and not r["passes"]
    assert verdict(one) == {"8:16": False}
    many = run(25)
    r = many[many["coef"] == 1.0].iloc[0]
    assert r["gain"] == pytest.approx(0.05) and r["paired_se"] == pytest.approx(0.00975, rel=1e-2) and r["passes"]
    assert verdict(many) == {"8:16": True}
    assert many.loc[many["coef"] == 2.0, "gain"].iloc[0] == pytest.approx(-0.01)  # 5 lost
    worse = run(25, kl_shift=0.01)  # every prompt's KL up by 0.01: its paired SE is 0, any rise is worse
    assert worse.loc[worse["coef"] == 1.0, "kl_se"].iloc[0] == pytest.approx(0.0, abs=1e-12)
    assert verdict(worse) == {"8:16": False}
    assert verdict(one.drop(columns=["gain", "paired_se", "kl", "kl_se", "passes"])) == {"8:16": True}  # old CSV


def test_a_probe_written_out_says_its_margin(tmp_path):
    series, w0, m = _line(tmp_path)
    line_probe(series, [(8, 16)], _distance_score(w0, m), coefs=(0.0, 1.0), out=tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert meta["margin"].startswith("none") and "two" not in meta["margin"]
    df = pd.read_csv(tmp_path / "p" / "probe.csv")
    assert list(df.columns) == TABLES["probe"].names and df["paired_se"].isna().all() and df["kl"].isna().all()

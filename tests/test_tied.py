"""Tied weights (issue 31): an LM head tied to the input embedding is named in describe and run.json, analysed
once, and a base that stores the head as an equal copy is recognised as tied, not listed as missing at every
step."""

from __future__ import annotations

import json

import pandas as pd
from click.testing import CliRunner

from opd_dynamics.cli import main

from builders import LLAMA_CONFIG, llama_like, perturb, write_dir

TIED = {**LLAMA_CONFIG, "tie_word_embeddings": True}
HEAD, EMB = "lm_head.weight", "model.embed_tokens.weight"


def _series(root, base_head: str | None):
    """A tied run: steps store the embedding only; the base stores no head, an equal copy, or another head."""
    sd0 = llama_like()
    base = {k: v for k, v in sd0.items() if k != HEAD}
    if base_head == "copy":
        base[HEAD] = base[EMB].clone()
    elif base_head == "other":
        base[HEAD] = sd0[HEAD]
    write_dir(root / "base", base, config=TIED)
    for step in (1, 2):
        sd = perturb({k: v for k, v in sd0.items() if k != HEAD}, 1e-3 * step, step)
        write_dir(root / "run" / f"checkpoint-{step}", sd, config=TIED)
    return root


def _cli(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


def test_a_tied_head_is_named_and_counted_once(tmp_path):
    for base_head in (None, "copy"):
        root = _series(tmp_path / str(base_head), base_head)
        code, out = _cli("describe", root / "run", "--base", root / "base")
        assert code == 0, out
        assert f"run run: {HEAD} is tied to {EMB}" in out
        assert "missing" not in out
        code, out = _cli("analyze", root / "run", "--base", root / "base", "--out", root / "out")
        assert code == 0, out
        meta = json.loads((root / "out" / "run.json").read_text())
        assert meta["tied"] == {"run": {HEAD: EMB}}
        assert not [s for s in meta["skipped"] if s["tensor"] == HEAD]
        alloc = pd.read_csv(root / "out" / "module_allocation.csv")
        assert HEAD not in set(alloc["tensor"]) and (alloc["tensor"] == EMB).sum() == 2  # once per step
        assert alloc.groupby("step")["energy_share"].sum().round(12).eq(1).all()


def test_a_head_that_differs_from_the_embedding_is_not_tied(tmp_path):
    """tie_word_embeddings in the config but a base head of its own: not an equal copy, so not tied (the steps lack
    it, and say so)."""
    root = _series(tmp_path, "other")
    code, out = _cli("describe", root / "run", "--base", root / "base")
    assert code == 0, out
    assert "is tied to" not in out
    code, out = _cli("analyze", root / "run", "--base", root / "base", "--out", root / "out")
    meta = json.loads((root / "out" / "run.json").read_text())
    assert "run" not in meta["tied"]


def test_the_report_names_tied_weights(tmp_path):
    root = _series(tmp_path, None)
    assert _cli("analyze", root / "run", "--base", root / "base", "--out", root / "out")[0] == 0
    code, out = _cli("report", root / "out", "--html", root / "report.html")
    assert code == 0, out
    assert f"<code>{HEAD}</code> is tied to <code>{EMB}</code>" in (root / "report.html").read_text()

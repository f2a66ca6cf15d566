"""The shipped lab (data/lab, default preset, seed 0) carries the teacher its OPD run was trained towards: scored
again on the 500 held-out prompts, it gives lab.json's accuracies, and student_init's reverse KL to it is step 0
of eval.csv (issue 27). The accuracies are counts and must be equal; the reverse KL is a float32 mean whose last bits
depend on the CPU's vector kernels (an AMD EPYC gives 1.6e-8 relative against the machine that wrote eval.csv), so
it is held to 1e-6."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from opd_dynamics.lab.evaluate import evaluate_model
from opd_dynamics.lab.models import load_model
from opd_dynamics.lab.task import build_tokenizer
from opd_dynamics.lab.train import splits_for

LAB = Path(__file__).resolve().parents[1] / "data" / "lab"


def test_the_shipped_teacher_is_the_one_lab_json_and_eval_csv_measured():
    meta = json.loads((LAB / "lab.json").read_text())
    assert (meta["preset"]["name"], meta["seed"]) == ("default", 0)
    tok = build_tokenizer()
    held = splits_for(meta["preset"]["name"], meta["seed"]).heldout[: meta["preset"]["n_eval"]]
    teacher, init = load_model(LAB / "teacher"), load_model(LAB / "student_init")
    t = evaluate_model(teacher, tok, held, sampled=True, seed=meta["seed"])
    assert (t["accuracy"], t["accuracy_sampled"]) == (meta["teacher"]["accuracy"], meta["teacher"]["accuracy_sampled"])
    s = evaluate_model(init, tok, held, teacher=teacher, greedy=True, sampled=True, seed=meta["seed"])
    step0 = pd.read_csv(LAB / "opd" / "eval.csv").iloc[0]
    assert step0["step"] == 0
    assert (s["accuracy"], s["accuracy_sampled"]) == (step0["accuracy"], step0["accuracy_sampled"])
    assert s["reverse_kl"] == pytest.approx(step0["reverse_kl"], rel=1e-6, abs=0)

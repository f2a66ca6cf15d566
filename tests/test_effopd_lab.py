"""The lab measurement's bookkeeping: steps to target, the summary table and the speedups (known answers)."""

from __future__ import annotations

import math

import pandas as pd

from opd_dynamics.lab.effopd import SUMMARY_COLUMNS, speedups, steps_to_target, summarize


def curves() -> pd.DataFrame:
    rows = []
    # vanilla ends at 0.8 → target 0.76, first reached at step 8; effopd reaches it at 4; fixed never
    for m, accs in {"vanilla": [0.2, 0.3, 0.5, 0.77, 0.8], "effopd": [0.2, 0.4, 0.76, 0.7, 0.82],
                    "fixed": [0.2, 0.0, 0.0, 0.1, 0.1]}.items():
        for step, a in zip([0, 2, 4, 8, 16], accs):
            rows.append({"seed": 0, "method": m, "step": step, "accuracy": a, "wall_s": step * 0.5})
    return pd.DataFrame(rows)


def test_steps_to_target():
    c = curves()
    v = c[c["method"] == "vanilla"]
    assert steps_to_target(v, 0.76) == 8
    assert steps_to_target(v, 0.2) == 0
    assert math.isnan(steps_to_target(v, 0.9))


def test_summary_and_speedup():
    c = curves()
    runs = pd.DataFrame([{"seed": 0, "method": m, "final_accuracy": f, "wall_s": w, "validation_s": v}
                         for m, f, w, v in (("vanilla", 0.8, 10.0, 0.0), ("effopd", 0.82, 12.0, 2.0),
                                            ("fixed", 0.1, 10.5, 0.0))])
    s = summarize(c, runs)
    assert list(s.columns) == SUMMARY_COLUMNS
    got = s.set_index("method")
    assert got.loc["vanilla", "steps_to_target"] == 8 and got.loc["effopd", "steps_to_target"] == 4
    assert math.isnan(got.loc["fixed", "steps_to_target"])
    assert got.loc["effopd", "validation_s"] == 2.0
    sp = speedups(s)
    assert sp["effopd"]["median"] == 2.0 and sp["fixed"]["median"] is None


def test_validation_scores_sampled_afresh_greedy_and_kl_tie_break(tmp_path):
    """The lab's EffOPD validation: sampled (as published) draws afresh per candidate and reproducibly across
    reruns; greedy is deterministic; greedy+kl is (accuracy, −reverse KL) so the KL breaks accuracy ties."""
    import pytest

    from opd_dynamics.errors import InputError
    from opd_dynamics.lab.effopd import validation_score
    from opd_dynamics.lab.models import make_model
    from opd_dynamics.lab.presets import ModelSpec
    from opd_dynamics.lab.task import build_tokenizer, make_splits

    tok = build_tokenizer()
    spec = ModelSpec(hidden=16, layers=1, heads=2, intermediate=32)
    student, teacher = make_model(spec, tok, 0), make_model(spec, tok, 1)
    teacher.save_pretrained(tmp_path / "teacher")
    probs = make_splits(2, 64, 8, 0).train[:64]
    s1, s2 = validation_score("sampled", tok, probs, tmp_path / "teacher", 3), \
        validation_score("sampled", tok, probs, tmp_path / "teacher", 3)
    first = [s1(student) for _ in range(3)]
    assert first == [s2(student) for _ in range(3)]  # reproducible
    g = validation_score("greedy", tok, probs, tmp_path / "teacher", 3)
    assert g(student) == g(student)
    kl = validation_score("greedy+kl", tok, probs, tmp_path / "teacher", 3)(student)
    assert isinstance(kl, tuple) and len(kl) == 2 and kl[1] < 0
    with pytest.raises(InputError, match="validation must be one of"):
        validation_score("best", tok, probs, tmp_path / "teacher", 3)

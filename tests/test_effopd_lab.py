"""The lab measurement's bookkeeping: steps to target, the summary table and the speedups (known answers)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

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


def _summary(vanilla_steps, effopd_steps, vanilla_final, effopd_final) -> pd.DataFrame:
    rows = []
    for seed, (vs, es, vf, ef) in enumerate(zip(vanilla_steps, effopd_steps, vanilla_final, effopd_final)):
        rows += [{"seed": seed, "method": "vanilla", "steps_to_target": vs, "final_accuracy": vf},
                 {"seed": seed, "method": "effopd", "steps_to_target": es, "final_accuracy": ef}]
    return pd.DataFrame(rows).reindex(columns=SUMMARY_COLUMNS)


def test_effopd_verdicts_under_the_one_rule():
    """Planted summaries: EffOPD twice as fast on five of five seeds is confirmed (p = 1/32); the shipped
    measurement (docs/effopd/cpu-default-5seeds: 16, 16, 16, 30, 16 against 16, 16, 20, 30, 16) is inconclusive,
    one seed slower and four tied (p = 1/2 the other way); a method that never reaches the target is not testable."""
    import pytest

    from opd_dynamics.lab.effopd import effopd_verdicts

    v = effopd_verdicts(_summary([16] * 5, [8] * 5, [0.9] * 5, [0.91, 0.92, 0.9, 0.93, 0.95]))["effopd"]
    assert v["speedup"]["verdict"] == "confirmed" and v["speedup"]["p"] == pytest.approx(1 / 32)
    assert v["speedup"]["effect"] == pytest.approx(2.0) and v["speedup"]["per_seed"] == {i: 2.0 for i in range(5)}
    assert v["final_accuracy"]["verdict"] == "inconclusive"  # four gains and a tie: p = 1/16
    assert v["final_accuracy"]["p"] == pytest.approx(1 / 16) and "sign p = 0.0625" in v["final_accuracy"]["text"]
    shipped = effopd_verdicts(_summary([16, 16, 16, 30, 16], [16, 16, 20, 30, 16], [0.982, 0.976, 0.972, 0.968, 0.968],
                                       [0.982, 0.976, 0.972, 0.976, 0.968]))["effopd"]
    sp = shipped["speedup"]
    assert sp["verdict"] == "inconclusive" and sp["p_sign_other"] == pytest.approx(0.5)
    assert (sp["n"], sp["n_agree"], sp["n_against"]) == (5, 0, 1)
    assert sp["effect"] == pytest.approx(0.8 ** 0.2)  # the geometric mean of 1, 1, 0.8, 1, 1
    assert shipped["final_accuracy"]["verdict"] == "inconclusive" and shipped["final_accuracy"]["p"] == 0.5
    never = _summary([16] * 3, [math.nan] * 3, [0.9] * 3, [0.1] * 3).replace("effopd", "fixed")
    f = effopd_verdicts(never)["fixed"]
    assert f["speedup"]["verdict"] == "not testable" and f["final_accuracy"]["verdict"] == "inconclusive"


def test_the_probe_scores_per_prompt(tmp_path):
    """The lab's probe scorer: per-prompt greedy correctness whose mean is evaluate_model's accuracy, and a
    per-prompt teacher KL on fixed samples that is 0 for the teacher itself."""
    import numpy as np

    from opd_dynamics.lab.effopd import fixed_samples, greedy_correct, kl_per_item, probe_scorer
    from opd_dynamics.lab.evaluate import evaluate_model
    from opd_dynamics.lab.models import make_model
    from opd_dynamics.lab.presets import ModelSpec
    from opd_dynamics.lab.task import build_tokenizer, make_splits

    tok = build_tokenizer()
    spec = ModelSpec(hidden=16, layers=1, heads=2, intermediate=32)
    student, teacher = make_model(spec, tok, 0), make_model(spec, tok, 1)
    probs = make_splits(2, 64, 32, 0).heldout[:32]
    items = greedy_correct(student, tok, probs)
    assert items.shape == (32,) and set(np.unique(items)) <= {0.0, 1.0}
    assert items.mean() == evaluate_model(student, tok, probs)["accuracy"]
    samples = fixed_samples(student, tok, probs, seed=3)
    kl = kl_per_item(student, teacher, samples, len(probs))
    assert kl.shape == (32,) and (kl > 0).all()
    assert np.allclose(kl_per_item(teacher, teacher, samples, len(probs)), 0.0, atol=1e-12)
    student.save_pretrained(tmp_path / "s")
    got = probe_scorer(tok, probs, teacher, samples)(tmp_path / "s")
    assert got.score == items.mean() and np.array_equal(got.items, items)
    assert got.kl == pytest.approx(kl.mean()) and np.allclose(got.kl_items, kl)

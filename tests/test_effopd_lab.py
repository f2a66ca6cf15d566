"""The lab measurement's bookkeeping: steps to target, the summary table and the speedups (known answers)."""

from __future__ import annotations

import json
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
    """The lab's probe scorer: per-prompt greedy correctness whose mean is evaluate_model's accuracy, a per-prompt
    reverse teacher KL on fixed student samples and a forward KL on fixed teacher samples, each 0 for the teacher
    itself."""
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
    assert got.forward_kl is None  # no teacher samples given
    from_teacher = fixed_samples(teacher, tok, probs, seed=4)  # the forward KL: KL(teacher ‖ model) on these
    fwd = kl_per_item(student, teacher, from_teacher, len(probs), forward=True)
    assert (fwd > 0).all() and np.allclose(kl_per_item(teacher, teacher, from_teacher, len(probs), forward=True), 0.0,
                                           atol=1e-12)
    assert not np.allclose(fwd, kl_per_item(student, teacher, from_teacher, len(probs)))  # not the reverse KL
    got = probe_scorer(tok, probs, teacher, samples, from_teacher)(tmp_path / "s")
    assert got.forward_kl == pytest.approx(fwd.mean()) and got.kl == pytest.approx(kl.mean())


def _planted(steps: dict[str, list], finals: dict[str, list]) -> pd.DataFrame:
    return pd.DataFrame([{"seed": s, "method": m, "steps_to_target": v, "final_accuracy": finals[m][s]}
                         for m, vals in steps.items() for s, v in enumerate(vals)]).reindex(columns=SUMMARY_COLUMNS)


def test_verdicts_against_vanilla_and_effopd_against_the_larger_rates():
    """Planted on five seeds: vanilla 30 steps, 3× its rate 10, 10× 6, EffOPD 15. Every method beats vanilla
    (p = 1/32), and EffOPD is slower than either larger rate on all five seeds: refuted (p = 1/32 the other way);
    the speedups' geometric means are the planted ratios. A method not run has no verdict."""
    from opd_dynamics.lab.effopd import comparisons, effopd_verdicts

    v = effopd_verdicts(_planted({"vanilla": [30] * 5, "vanilla-3x": [10] * 5, "vanilla-10x": [6] * 5,
                                  "effopd": [15] * 5},
                                 {"vanilla": [0.9] * 5, "vanilla-3x": [0.92] * 5, "vanilla-10x": [0.5] * 5,
                                  "effopd": [0.9, 0.91, 0.9, 0.9, 0.89]}))
    assert list(v) == ["vanilla-3x", "vanilla-10x", "effopd", "effopd vs vanilla-3x", "effopd vs vanilla-10x"]
    for key, ratio in (("vanilla-3x", 3.0), ("vanilla-10x", 5.0), ("effopd", 2.0)):
        assert v[key]["baseline"] == "vanilla" and v[key]["speedup"]["verdict"] == "confirmed"
        assert v[key]["speedup"]["p"] == pytest.approx(1 / 32) and v[key]["speedup"]["effect"] == pytest.approx(ratio)
    for key, ratio in (("effopd vs vanilla-3x", 10 / 15), ("effopd vs vanilla-10x", 6 / 15)):
        r = v[key]
        assert (r["method"], r["baseline"]) == ("effopd", key.split(" vs ")[1])
        assert r["speedup"]["verdict"] == "refuted" and r["speedup"]["p"] == pytest.approx(1 / 32)
        assert r["speedup"]["effect"] == pytest.approx(ratio) and r["speedup"]["n_against"] == 5
    assert v["vanilla-3x"]["final_accuracy"]["verdict"] == "confirmed"  # +0.02 on all five
    assert v["vanilla-10x"]["final_accuracy"]["verdict"] == "refuted"  # −0.4 on all five
    assert v["effopd"]["final_accuracy"]["verdict"] == "inconclusive"  # one gain, one loss, three ties
    assert v["effopd vs vanilla-10x"]["final_accuracy"]["verdict"] == "confirmed"
    assert [k for k, _, _ in comparisons(("vanilla", "vanilla-10x", "effopd"))] == [
        "vanilla-10x", "effopd", "effopd vs vanilla-10x"]


def _tiny():
    from dataclasses import replace

    from opd_dynamics.lab.presets import ModelSpec, get_preset

    return replace(get_preset("smoke"), name="tiny", n_train=400, n_heldout=40, n_eval=16,
                   student=ModelSpec(hidden=16, layers=1, heads=2, intermediate=32), student_max_steps=4,
                   student_target=1.1, sft_eval_every=2, teacher_max_steps=2, teacher_target=1.1, rl_steps=2,
                   save_steps=1, rollouts_per_step=16, grpo_generations=4)


def _seed_labs(root, p, seeds):
    """seed-K/ lab directories as `lab run --seeds` leaves them (teacher, student_init, lab.json's seed)."""
    from dataclasses import asdict

    from opd_dynamics.lab.layout import LabDir, seed_dir
    from opd_dynamics.lab.train import train_teacher_and_student

    for s in seeds:
        d = LabDir(seed_dir(root, s))
        train_teacher_and_student(d.root, p, s, log=lambda m: None)
        d.meta_path.write_text(json.dumps({"seed": s, "preset": asdict(p)}))


def test_a_root_of_seed_labs_gives_each_seed_its_own_models_rates_and_dense_steps(tmp_path):
    """--lab ROOT: seed K runs from ROOT/seed-K's teacher and student_init on its own split (effopd.json says so,
    and that the seeds are independent); vanilla-3x and vanilla-10x train at exactly 3× and 10× the base rate;
    held-out accuracy is measured at every step up to dense_until, then only at eval_every, trigger steps and the
    end; the triggers table carries held-out accuracy before and right after each trigger (equal where k = 0)."""
    from opd_dynamics.lab.effopd import METHODS, run_effopd_lab
    from opd_dynamics.lab.presets import EffOPDLabOptions

    p = _tiny()
    _seed_labs(tmp_path / "root", p, [0, 1])
    opt = EffOPDLabOptions(max_steps=6, dense_until=3, eval_every=6, n_val=8, gate=False, lr=1e-4)
    out = run_effopd_lab(tmp_path / "out", p, 2, lab=tmp_path / "root", options=opt, log=lambda m: None)
    meta = json.loads((out / "effopd.json").read_text())
    assert meta["independent_seeds"] is True
    for s in (0, 1):
        m = meta["models"][str(s)]
        assert m["teacher"] == str((tmp_path / "root" / f"seed-{s}" / "teacher").resolve())
        assert m["student_init"] == str((tmp_path / "root" / f"seed-{s}" / "student_init").resolve())
        assert m["data_seed"] == s and m["shared"] is False
    summ = pd.read_csv(out / "effopd_summary.csv")
    assert list(summ["method"].unique()) == list(METHODS)
    rate = summ.groupby("method")["lr"].unique()
    assert {k: list(x) for k, x in rate.items()} == {"vanilla": [1e-4], "vanilla-3x": [1e-4 * 3],
                                                    "vanilla-10x": [1e-4 * 10], "effopd": [1e-4], "fixed": [1e-4]}
    assert meta["lr"]["vanilla-10x"] == 1e-4 * 10 and set(meta["steps_to_target"]) == set(METHODS)
    curves = pd.read_csv(out / "effopd_curves.csv")
    for (_, _), c in curves.groupby(["seed", "method"]):
        assert sorted(c["step"]) == [0, 1, 2, 3, 4, 6]  # dense to 3, trigger 4, the end 6 (not 5)
    trig = pd.read_csv(out / "effopd_triggers.csv")
    assert sorted(set(trig["method"])) == ["effopd", "fixed"] and trig["accuracy_before"].notna().all()
    after = curves.set_index(["seed", "method", "step"])["accuracy"]
    for r in trig.itertuples():
        assert r.accuracy_after == after[(r.seed, r.method, r.step)]
        if r.k_accepted == 0:
            assert r.accuracy_after == r.accuracy_before
    assert {"effopd vs vanilla-3x", "effopd vs vanilla-10x"} <= set(meta["verdicts"])


def test_one_lab_dir_is_shared_and_said_so_and_without_a_lab_each_seed_builds_its_own(tmp_path):
    """--lab DIR (one lab): every seed starts from its teacher, and the log and effopd.json say the seeds are not
    independent; no --lab: each seed trains its own teacher and student_init (different weights); methods
    without vanilla or unknown ones are refused before anything runs."""
    from safetensors.torch import load_file

    from opd_dynamics.errors import InputError
    from opd_dynamics.lab.effopd import run_effopd_lab
    from opd_dynamics.lab.presets import EffOPDLabOptions

    p = _tiny()
    _seed_labs(tmp_path / "root", p, [0])
    opt = EffOPDLabOptions(max_steps=1, methods=("vanilla",), probe_steps=())
    lines: list[str] = []
    out = run_effopd_lab(tmp_path / "one", p, 2, lab=tmp_path / "root" / "seed-0", options=opt, log=lines.append)
    meta = json.loads((out / "effopd.json").read_text())
    assert meta["independent_seeds"] is False
    assert {meta["models"][s]["teacher"] for s in ("0", "1")} == {str((tmp_path / "root/seed-0/teacher").resolve())}
    assert any("not independent" in x for x in lines)
    out = run_effopd_lab(tmp_path / "built", p, 2, options=opt, log=lambda m: None)
    meta = json.loads((out / "effopd.json").read_text())
    assert meta["independent_seeds"] is True
    assert [meta["models"][s]["teacher"] for s in ("0", "1")] == ["models/seed-0/teacher", "models/seed-1/teacher"]
    w = [load_file(out / f"models/seed-{s}/teacher/model.safetensors") for s in (0, 1)]
    assert any(not (w[0][k] == w[1][k]).all() for k in w[0])
    for bad in (("effopd",), ("vanilla", "vanilla-2x")):
        with pytest.raises(InputError, match="methods must include vanilla"):
            run_effopd_lab(tmp_path / "bad", p, 1, options=EffOPDLabOptions(methods=bad), log=lambda m: None)
    with pytest.raises(InputError, match="seed-1"):
        run_effopd_lab(tmp_path / "bad", p, 2, lab=tmp_path / "root", options=opt, log=lambda m: None)
    assert not (tmp_path / "bad").exists()


def test_the_rate_controls_first_step_moves_exactly_3x_and_10x_as_far(tmp_path):
    """Adam's first step is lr·g/(|g| + eps) per weight: from the same init, batch and seed, vanilla-3x's and
    vanilla-10x's learning rates (method_lr) move the weights 3× and 10× as far as vanilla's."""
    import torch

    from opd_dynamics.lab.effopd import method_lr
    from opd_dynamics.lab.models import make_model
    from opd_dynamics.lab.task import build_tokenizer
    from opd_dynamics.lab.train import build_opd_trainer, save_model_dir

    p = _tiny()
    tok = build_tokenizer()
    save_model_dir(make_model(p.student, tok, 0), tok, tmp_path / "student")
    save_model_dir(make_model(p.student, tok, 1), tok, tmp_path / "teacher")
    w0 = {k: v.clone() for k, v in make_model(p.student, tok, 0).state_dict().items()}
    moved = {}
    for m in ("vanilla", "vanilla-3x", "vanilla-10x"):
        tr = build_opd_trainer(tmp_path / "student", tmp_path / "teacher", tmp_path / m, p, 0, max_steps=1,
                               save_steps=2, data_seed=0, lr=method_lr(m, 1e-4))
        tr.train()
        assert tr.args.learning_rate == method_lr(m, 1e-4)
        w1 = tr.model.state_dict()
        moved[m] = torch.sqrt(sum(((w1[k].double() - w0[k].double()) ** 2).sum() for k in w0)).item()
    assert moved["vanilla"] > 0
    assert moved["vanilla-3x"] / moved["vanilla"] == pytest.approx(3.0, rel=1e-5)
    assert moved["vanilla-10x"] / moved["vanilla"] == pytest.approx(10.0, rel=1e-5)


def test_the_steps_table_tells_never_from_not_run():
    """A run that never reached the target reads "never"; a method the gate kept from running reads "not run"."""
    from opd_dynamics.lab.effopd import steps_text

    s = pd.DataFrame([{"seed": 0, "method": "vanilla", "lr": 1e-4, "steps_to_target": 11.0},
                      {"seed": 0, "method": "vanilla-10x", "lr": 1e-3, "steps_to_target": float("nan")},
                      {"seed": 1, "method": "vanilla", "lr": 1e-4, "steps_to_target": 15.0},
                      {"seed": 1, "method": "vanilla-10x", "lr": 1e-3, "steps_to_target": 3.0},
                      {"seed": 1, "method": "effopd", "lr": 1e-4, "steps_to_target": 5.0}])
    rows = {line.split()[0]: line.split()[1:] for line in steps_text(s).splitlines()[2:]}
    assert rows == {"0": ["11", "never", "not", "run"], "1": ["15", "3", "5"]}  # split on spaces
    assert "vanilla-10x (lr 0.001)" in steps_text(s).splitlines()[0]

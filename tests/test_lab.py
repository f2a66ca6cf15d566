"""The lab: task, tokenizer, evaluation, the OPD configuration (reverse KL on student samples) and a smoke run.

The smoke run (about a minute on the 2-core machine) is made once per session by a fixture and shared.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open

from opd_dynamics.errors import InputError
from opd_dynamics.io.series import CheckpointSeries
from opd_dynamics.lab.evaluate import evaluate_model
from opd_dynamics.lab.models import load_model
from opd_dynamics.lab.run import run_lab
from opd_dynamics.lab.task import (
    build_tokenizer,
    exact_match_reward,
    has_carry,
    make_problem,
    make_splits,
    parse_answer,
)
from opd_dynamics.lab.train import build_opd_trainer, splits_for


@pytest.fixture(scope="session")  # its tests share one xdist group, so one worker builds it once
def smoke_lab(tmp_path_factory) -> Path:
    return run_lab(tmp_path_factory.mktemp("lab") / "smoke", preset="smoke", seed=0)


def test_task_problems_and_reward():
    p = make_problem(47, 85, 2)
    assert (p.prompt, p.answer) == ("47+85=", "132")
    assert make_problem(3, 4, 3).answer == "0007"
    assert has_carry(make_problem(15, 15, 2)) and has_carry(make_problem(50, 60, 2))
    assert not has_carry(make_problem(12, 34, 2))
    assert parse_answer("132</s>99") == "132"
    assert exact_match_reward(["132", "131", "1320"], answer=["132", "132", "132"]) == [1.0, 0.0, 0.0]


def test_answers_must_end_with_eos_and_hold_no_other_special_token():
    """TRL hands the reward text decoded without special tokens: '132<pad>' and '13<s>2' would read '132'."""
    from opd_dynamics.lab.evaluate import Samples, completion_texts

    tok = build_tokenizer()
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos, pad, bos = tok.eos_token_id, tok.pad_token_id, tok.bos_token_id
    ids = [enc("132") + [eos], enc("132") + [pad], enc("13") + [bos] + enc("2") + [eos], enc("132")]
    texts = [tok.decode(i, skip_special_tokens=True) for i in ids]
    assert texts == ["132"] * 4  # what the reward function sees
    assert exact_match_reward(texts, answer=["132"] * 4, completion_ids=ids) == [1.0, 0.0, 0.0, 0.0]
    width = max(map(len, ids))
    padded = torch.tensor([i + [pad] * (width - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    got = completion_texts(tok, Samples(torch.zeros(4, 1, dtype=torch.long), padded, mask))
    assert got == ["132", None, None, None]
    a, b = make_splits(2, 500, 100, seed=3), make_splits(2, 500, 100, seed=3)
    assert a == b and len(a.train) == 500 and len(a.heldout) == 100
    assert not {q.prompt for q in a.train} & {q.prompt for q in a.heldout}


def test_tokenizer_is_character_level_with_bos_and_left_padding(tmp_path):
    tok = build_tokenizer()
    ids = tok("12+34=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 7
    assert tok.convert_ids_to_tokens(ids[1:]) == list("12+34=")
    assert tok.decode(ids[1:] + [tok.eos_token_id], skip_special_tokens=True) == "12+34="
    assert tok.padding_side == "left" and tok.pad_token_id != tok.eos_token_id
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path)("12+34=")["input_ids"] == ids


@pytest.mark.slow
@pytest.mark.xdist_group("smoke_lab")
def test_smoke_layout_and_lab_json(smoke_lab):
    meta = json.loads((smoke_lab / "lab.json").read_text())
    assert meta["preset"]["name"] == "smoke" and meta["seed"] == 0
    assert meta["teacher"]["accuracy"] >= 0.9
    assert meta["teacher"]["accuracy"] > meta["student_init"]["accuracy"]
    assert 0.1 <= meta["student_init"]["accuracy"] <= meta["teacher"]["accuracy"] - 0.1  # weak but not empty
    assert not list(smoke_lab.parent.glob(".smoke.tmp-*"))
    every, last = meta["preset"]["save_steps"], meta["preset"]["rl_steps"]
    for run in ("opd", "grpo"):
        steps = CheckpointSeries.discover(smoke_lab / run, base=smoke_lab / "student_init").steps
        assert [s for s, _ in steps] == list(range(every, last + 1, every))
        for _, path in steps:
            assert (path / "config.json").exists()
            assert not (path / "optimizer.pt").exists()  # weights only
            with safe_open(str(path / "model.safetensors"), "pt") as f:
                t = f.get_tensor("model.layers.0.mlp.down_proj.weight")
                assert t.dtype == torch.float32
        df = pd.read_csv(smoke_lab / run / "eval.csv")
        assert list(df.columns) == ["run", "step", "accuracy", "accuracy_sampled", "reverse_kl"]
        assert df["step"].tolist() == list(range(0, last + 1, every)) and set(df["run"]) == {run}


@pytest.mark.slow
@pytest.mark.xdist_group("smoke_lab")
def test_teacher_is_the_students_architecture_and_lab_json_has_pass_at_k_and_grpo_groups(smoke_lab):
    meta = json.loads((smoke_lab / "lab.json").read_text())
    t = json.loads((smoke_lab / "teacher" / "config.json").read_text())
    s = json.loads((smoke_lab / "student_init" / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        assert t[key] == s[key]
    assert meta["teacher"]["method"] == "sft_from_student_init"
    k = meta["preset"]["pass_k"]
    init = meta["student_init"]
    assert 0.0 <= init[f"pass_at_{k}_carry"] <= init[f"pass_at_{k}"] + 1.0 and init["n_carry"] > 0
    assert init[f"pass_at_{k}"] >= init["accuracy_sampled"] - 0.1  # k samples find at least what one finds, ± noise
    assert meta["teacher"][f"pass_at_{k}"] >= 0.9
    g = pd.read_csv(smoke_lab / "grpo" / "grpo_groups.csv")
    assert list(g.columns) == ["step", "nonzero_var_groups", "reward"]
    assert g["step"].tolist() == list(range(1, meta["preset"]["rl_steps"] + 1))  # one row per optimizer step
    assert g["nonzero_var_groups"].between(0, 1).all() and g["reward"].between(0, 1).all()
    assert meta["grpo_groups"]["steps"] == len(g)
    assert meta["grpo_groups"]["nonzero_var_groups_mean"] == pytest.approx(g["nonzero_var_groups"].mean())


@pytest.mark.slow
@pytest.mark.xdist_group("smoke_lab")
def test_pass_at_k_counts_prompts_with_any_correct_sample(smoke_lab):
    from opd_dynamics.lab.evaluate import pass_at_k

    tok = build_tokenizer()
    held = splits_for("smoke", 0).heldout[:64]
    student = load_model(smoke_lab / "student_init")
    p1, p8 = pass_at_k(student, tok, held, 1, seed=3), pass_at_k(student, tok, held, 8, seed=3)
    assert pass_at_k(student, tok, held, 8, seed=3) == p8  # seeded: reproducible
    assert p8 >= p1 and 0 < p8 <= 1
    # pass@1 is one sampled answer per prompt: evaluate_model's sampled accuracy, same seed, same draws
    assert p1 == evaluate_model(student, tok, held, greedy=False, sampled=True, seed=3)["accuracy_sampled"]
    with pytest.raises(ValueError, match="k must be"):
        pass_at_k(student, tok, held, 0)


@pytest.mark.slow
@pytest.mark.xdist_group("smoke_lab")
def test_opd_raises_accuracy_and_lowers_reverse_kl(smoke_lab):
    df = pd.read_csv(smoke_lab / "opd" / "eval.csv")
    first, last = df.iloc[0], df.iloc[-1]
    assert last["accuracy"] > first["accuracy"] + 0.1
    assert last["reverse_kl"] < 0.7 * first["reverse_kl"]
    g = pd.read_csv(smoke_lab / "grpo" / "eval.csv")
    assert g.iloc[0].drop("run").tolist() == first.drop("run").tolist()  # one shared student_init


@pytest.mark.slow
@pytest.mark.xdist_group("smoke_lab")
def test_series_is_readable_by_the_analysis(smoke_lab):
    from opd_dynamics.io.series import CheckpointSeries

    s = CheckpointSeries.discover(smoke_lab / "opd", base=smoke_lab / "student_init", name="opd")
    assert [step for step, _ in s.steps] == list(range(20, 61, 20))


@pytest.mark.slow
@pytest.mark.xdist_group("smoke_lab")
def test_reverse_kl_of_a_model_to_itself_is_zero(smoke_lab):
    tok = build_tokenizer()
    teacher = load_model(smoke_lab / "teacher")
    held = splits_for("smoke", 0).heldout[:64]
    r = evaluate_model(teacher, tok, held, teacher=teacher)
    assert r["reverse_kl"] == pytest.approx(0.0, abs=1e-12)
    again = evaluate_model(teacher, tok, held, teacher=teacher)
    assert again == r  # seeded sampling: reproducible


@pytest.mark.slow
@pytest.mark.xdist_group("smoke_lab")
def test_opd_trainer_is_on_policy_reverse_kl(smoke_lab, tmp_path):
    """DistillationTrainer as configured: student samples at T=1, loss = mean per-token KL(student || teacher)."""
    tr = build_opd_trainer(smoke_lab / "student_init", smoke_lab / "teacher", tmp_path / "opd", "smoke", 0)
    assert tr.beta == 1.0 and tr.temperature == 1.0 and tr.args.temperature == 1.0
    g = tr.generation_config
    assert g.do_sample and g.temperature == 1.0 and g.top_p == 1.0 and not g.top_k
    assert g.max_new_tokens == 4
    tr.model.eval()  # eval mode: the loss is the mean over this batch's completion tokens
    prompts = [{"prompt": q.prompt} for q in splits_for("smoke", 0).train[:16]]
    torch.manual_seed(0)
    inputs = tr._generate_and_score_completions(prompts)  # completions sampled by tr.model, the student
    with torch.no_grad():
        loss = tr.compute_loss(tr.model, inputs).double().item()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    p, c = inputs["prompt_ids"].size(1), inputs["completion_ids"].size(1)
    with torch.no_grad():
        ls = tr.model(input_ids=ids, attention_mask=att).logits[:, p - 1 : p + c - 1].double()
        lt = tr.teacher_model(input_ids=ids, attention_mask=att).logits[:, p - 1 : p + c - 1].double()
    log_ps, log_pt = ls.log_softmax(-1), lt.log_softmax(-1)
    kl = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    m = inputs["completion_mask"].double()
    expected = float((kl * m).sum() / m.sum())
    assert expected > 0.01
    assert loss == pytest.approx(expected, rel=1e-4)
    fwd = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    assert abs(float((fwd * m).sum() / m.sum()) - loss) > 1e-3  # and not the forward KL


#: what lab.json may differ in between two runs of one seed: wall times and the command line
_CLOCK = ("timings", "command", "seconds")


def _measured(meta: dict) -> dict:
    """lab.json without its wall times and command line: the numbers a run measured."""
    return {k: _measured(v) if isinstance(v, dict) else v for k, v in meta.items() if k not in _CLOCK}


@pytest.mark.slow
@pytest.mark.xdist_group("smoke_lab")
def test_a_second_smoke_run_of_one_seed_is_bit_identical(smoke_lab, tmp_path):
    """Issue 27: one machine, one seed, one lab. A second smoke run (its global RNGs and thread count disturbed
    first: run_lab must set them itself) gives the same tensors, names and bytes in every model it writes
    (student_init, teacher, each checkpoint of both runs), the same eval tables and GRPO group statistics, and a
    lab.json that differs only in wall times and the command."""
    import random

    from safetensors.torch import load_file

    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        again = run_lab(tmp_path / "again", preset="smoke", seed=0, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)

    def models(lab: Path) -> list[str]:
        return sorted(str(f.parent.relative_to(lab)) for f in lab.rglob("model.safetensors"))

    steps = [f"{r}/checkpoint-{s}" for r in ("grpo", "opd") for s in (20, 40, 60)]
    assert models(smoke_lab) == models(again) == sorted(["student_init", "teacher", *steps])
    for d in models(smoke_lab):
        a, b = load_file(smoke_lab / d / "model.safetensors"), load_file(again / d / "model.safetensors")
        assert sorted(a) == sorted(b), d
        differ = [n for n in a if a[n].dtype != b[n].dtype or not torch.equal(a[n], b[n])]
        assert not differ, f"{d}: {differ}"
        for name in ("model.safetensors", "config.json"):
            assert (smoke_lab / d / name).read_bytes() == (again / d / name).read_bytes(), f"{d}/{name}"
    for f in ("opd/eval.csv", "grpo/eval.csv", "grpo/grpo_groups.csv", "sketch_alignment.csv"):
        assert (smoke_lab / f).read_bytes() == (again / f).read_bytes(), f
    first, second = (json.loads((d / "lab.json").read_text()) for d in (smoke_lab, again))
    assert _measured(first) == _measured(second)
    assert second["teacher"]["accuracy"] == first["teacher"]["accuracy"] and second["final"] == first["final"]
    assert second["cpu"]["threads"] == second["preset"]["threads"]


def test_run_lab_refuses_an_existing_directory(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(InputError, match="already exists"):
        run_lab(tmp_path / "x", preset="smoke")
    with pytest.raises(InputError, match="unknown lab preset"):
        run_lab(tmp_path / "y", preset="huge")


@pytest.mark.slow
@pytest.mark.xdist_group("smoke_lab")
def test_ship_copies_the_asked_subset_byte_for_byte_and_refuses_a_missing_step(smoke_lab, tmp_path):
    from opd_dynamics.lab.ship import export_subset

    out = export_subset(smoke_lab, tmp_path / "ship", [20, 60], include_teacher=True)
    want = {"student_init", "teacher", "opd/checkpoint-20", "opd/checkpoint-60", "grpo/checkpoint-20",
            "grpo/checkpoint-60"}
    got = {str(p.parent.relative_to(out)) for p in out.rglob("model.safetensors")}
    assert got == want
    for d in want:
        for name in ("model.safetensors", "config.json"):
            assert (out / d / name).read_bytes() == (smoke_lab / d / name).read_bytes()
    assert (out / "lab.json").read_bytes() == (smoke_lab / "lab.json").read_bytes()
    assert (out / "opd" / "eval.csv").exists() and (out / "grpo" / "eval.csv").exists()
    assert (out / "sketch_alignment.csv").read_bytes() == (smoke_lab / "sketch_alignment.csv").read_bytes()
    assert not (out / "opd" / "sketch").exists()  # the sketch series stay behind
    s = CheckpointSeries.discover(out / "opd", base=out / "student_init")
    assert [step for step, _ in s.steps] == [20, 60]
    with pytest.raises(InputError, match="checkpoint-30.*has no model.safetensors"):
        export_subset(smoke_lab, tmp_path / "bad", [30])
    assert not (tmp_path / "bad").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ship"]  # no temporary left behind


def test_rl_from_a_lab_student_keeps_the_lab_split_whatever_its_own_seed(tmp_path):
    """Training the shipped lab's student (seed 0) with run seed 1 must not train on seed 0's held-out problems."""
    from opd_dynamics.lab.train import build_grpo_trainer

    lab = Path(__file__).resolve().parents[1] / "data" / "lab"
    preset = json.loads((lab / "lab.json").read_text())["preset"]["name"]
    trainer = build_grpo_trainer(lab / "student_init", tmp_path / "grpo", preset, seed=1, max_steps=1)
    prompts = set(trainer.train_dataset["prompt"])
    lab_split = splits_for(preset, json.loads((lab / "lab.json").read_text())["seed"])
    assert prompts == {p.prompt for p in lab_split.train}
    assert not prompts & {p.prompt for p in lab_split.heldout}


def test_teacher_by_grpo_from_student_init_and_a_bad_teacher_method(tmp_path):
    """teacher_method='grpo' trains the teacher from student_init with the lab's GRPO (as the paper's teacher is),
    stopping at teacher_target or teacher_grpo_max_steps; a bad method is refused before anything is trained."""
    from dataclasses import replace

    from opd_dynamics.lab.presets import ModelSpec, get_preset
    from opd_dynamics.lab.train import train_teacher_and_student

    tiny = replace(get_preset("smoke"), name="tiny", n_train=400, n_heldout=40, n_eval=16,
                   student=ModelSpec(hidden=16, layers=1, heads=2, intermediate=32), student_max_steps=4,
                   student_target=1.1, sft_eval_every=2, teacher_method="grpo", teacher_grpo_max_steps=2,
                   teacher_target=1.1, rollouts_per_step=16, grpo_generations=4)
    info = train_teacher_and_student(tmp_path / "lab", tiny, 0, log=lambda m: None)
    assert info["teacher_sft"]["method"] == "grpo_from_student_init" and info["teacher_sft"]["steps"] == 2
    t = json.loads((tmp_path / "lab" / "teacher" / "config.json").read_text())
    s = json.loads((tmp_path / "lab" / "student_init" / "config.json").read_text())
    assert (t["hidden_size"], t["num_hidden_layers"]) == (s["hidden_size"], s["num_hidden_layers"]) == (16, 1)
    assert not (tmp_path / "lab" / ".teacher-grpo").exists()
    with pytest.raises(InputError, match="teacher_method"):
        train_teacher_and_student(tmp_path / "bad", replace(tiny, teacher_method="ppo"), 0, log=lambda m: None)
    assert not (tmp_path / "bad").exists()


def _tiny_preset(**kw):
    from dataclasses import replace

    from opd_dynamics.lab.presets import ModelSpec, get_preset

    return replace(get_preset("smoke"), name="tiny", n_train=400, n_heldout=40, n_eval=16,
                   student=ModelSpec(hidden=16, layers=1, heads=2, intermediate=32), student_max_steps=4,
                   student_target=1.1, sft_eval_every=2, teacher_max_steps=2, teacher_target=1.1, rl_steps=2,
                   save_steps=1, rollouts_per_step=16, grpo_generations=4, **kw)


def test_student_sft_stops_on_the_sampled_accuracy_it_was_asked_for():
    """stop_on='sampled' checks one T = 1 sample per held-out prompt (generator seed 0): with target 0 it stops at
    the first check and reports exactly that sampled accuracy; an unknown rule is refused before training."""
    from opd_dynamics.lab.models import make_model
    from opd_dynamics.lab.train import train_sft

    p = _tiny_preset()
    tok = build_tokenizer()
    sp = splits_for(p, 0)
    held = sp.heldout[:16]
    m = make_model(p.student, tok, 1)
    r = train_sft(m, tok, sp.train, held, steps=6, lr=1e-3, batch=8, seed=1, target=0.0, eval_every=2,
                  stop_on="sampled", log=lambda s: None)
    assert r["steps"] == 2
    assert r["accuracy"] == evaluate_model(m, tok, held, greedy=False, sampled=True, seed=0)["accuracy_sampled"]
    with pytest.raises(InputError, match="stop_on must be one of"):
        train_sft(m, tok, sp.train, held, steps=2, lr=1e-3, batch=8, seed=1, target=0.0, eval_every=2,
                  stop_on="beam")


def test_lab_run_seeds_writes_one_lab_per_seed_and_keeps_finished_ones(tmp_path):
    from opd_dynamics.lab.layout import seed_dirs
    from opd_dynamics.lab.run import run_lab_seeds

    p = _tiny_preset()
    quiet = dict(log=lambda m: None)
    dirs = run_lab_seeds(tmp_path / "runs", preset=p, seeds=2, **quiet)
    assert [d.name for d in dirs] == ["seed-0", "seed-1"]
    found = seed_dirs(tmp_path / "runs")
    assert list(found) == [0, 1] and all(found[s].meta()["seed"] == s for s in found)
    stamp = (dirs[0] / "lab.json").stat().st_mtime_ns
    dirs2 = run_lab_seeds(tmp_path / "runs", preset=p, seeds=3, **quiet)  # seeds 0, 1 kept; seed 2 run
    assert [d.name for d in dirs2] == ["seed-0", "seed-1", "seed-2"]
    assert (dirs[0] / "lab.json").stat().st_mtime_ns == stamp
    assert list(seed_dirs(dirs[1])) == [1]  # a lab directory itself is its own seed
    with pytest.raises(InputError, match="holds no lab run"):
        seed_dirs(tmp_path)


@pytest.mark.slow
@pytest.mark.xdist_group("smoke_lab")
def test_lab_claims_values_are_the_analysis_numbers(smoke_lab, tmp_path):
    """Every claims_seeds value recomputed in float64 from the analysis CSVs and eval.csv it came from; one seed
    gives no verdict; bad input is refused before anything is written."""
    import numpy as np

    from opd_dynamics.lab.claims import CLAIMS, lab_claims

    out = lab_claims(smoke_lab, tmp_path / "claims", log=lambda m: None)
    v = pd.read_csv(out / "claims_seeds.csv").set_index(["claim", "run"])["value"]
    name = {c.key: c.name for c in CLAIMS}
    an = out / "analysis" / "seed-0"
    a = pd.read_csv(an / "module_allocation.csv")
    sp = pd.read_csv(an / "spectrum.csv")
    seg = pd.read_csv(an / "segments.csv")
    meta = json.loads((smoke_lab / "lab.json").read_text())
    assert v[(name["teacher"], "teacher")] == meta["teacher"]["accuracy"]
    for run in ("opd", "grpo"):
        e = pd.read_csv(smoke_lab / run / "eval.csv").sort_values("step")
        assert v[(name["grpo_gain"], run)] == pytest.approx(e["accuracy"].iloc[-1] - e["accuracy"].iloc[0], abs=1e-12)
        early = e[(e["step"] > 0) & (e["step"] <= 20)]  # smoke: steps 20, 40, 60; 20 % of 60 is 12: step 20
        every = pd.read_csv(smoke_lab / run / "early_eval.csv")  # and each of the first 10 steps
        assert every["step"].tolist() == list(range(11)) and every["accuracy"].between(0, 1).all()
        assert every["accuracy"].iloc[0] == e["accuracy"].iloc[0]  # step 0: the same model, problems and rule
        lowest = min(early["accuracy"].min(), every["accuracy"].iloc[1:].min())
        assert v[(name["opd_dip"], run)] == pytest.approx(lowest - e["accuracy"].iloc[0], abs=1e-12)
        last = a[(a["run"] == run) & (a["step"] == 60)]
        f2 = last["update_norm"].to_numpy(np.float64) ** 2
        grp = last["group"].to_numpy()
        mat = np.isin(grp, ["attention", "mlp"])
        mid = mat & np.isin(last["layer"].to_numpy(), [1, 2])  # 4 layers: the middle third is 1, 2
        assert v[(name["low_utility"], run)] == pytest.approx(f2[np.isin(grp, ["embedding", "lm_head", "norm"])].sum()
                                                              / f2.sum(), rel=1e-9)
        assert v[(name["mlp_share"], run)] == pytest.approx(f2[grp == "mlp"].sum() / f2[mat].sum(), rel=1e-9)
        assert v[(name["middle_share"], run)] == pytest.approx(f2[mid].sum() / f2[mat].sum(), rel=1e-9)
        s = sp[(sp["run"] == run) & (sp["step"] == 60) & sp["group"].isin(["attention", "mlp"])]
        assert v[(name["spectral_ratio"], run)] == pytest.approx(s["spectral_ratio"].mean(), rel=1e-9)
        assert v[(name["effective_rank"], run)] == pytest.approx(s["effective_rank"].mean(), rel=1e-9)
        g = seg[(seg["run"] == run) & (seg["step"] == 20) & seg["group"].isin(["attention", "mlp"])]
        want = (g["direction_cosine"] - g["null_cosine"]).mean()  # the null from the run's own segment norms
        assert v[(name[f"{run}_above_null"], run)] == pytest.approx(want, rel=1e-9)
        tr = pd.read_csv(an / "trajectory.csv")
        tr = tr[(tr["run"] == run) & tr["group"].isin(["attention", "mlp"])]
        assert v[(name[f"{run}_rank1_null"], run)] == pytest.approx((tr["rank1_share"] - tr["rank1_share_null"]).mean(),
                                                                    rel=1e-9)
    steps = pd.read_csv(out / "claims_seeds.csv").set_index(["claim", "run"])["step"]
    assert steps[(name["spectral_ratio"], "opd")] == 60 and steps[(name["opd_above_null"], "opd")] == 20
    assert {steps[(name["spectral_ratio@norm"], r)] for r in ("opd", "grpo")} >= {60}  # the run behind keeps 60
    t = pd.read_csv(out / "claims.csv")
    assert set(t["verdict"]) <= {"inconclusive", "not testable", "confirmed", "refuted", "holds", "fails"}
    assert (t.loc[~t["claim"].str.startswith("precondition"), "verdict"] != "confirmed").all()  # one seed
    assert (out / "claims.md").read_text().startswith("| claim |")
    with pytest.raises(InputError, match="holds no lab run"):
        lab_claims(tmp_path, tmp_path / "bad")
    with pytest.raises(InputError, match="is not an EffOPD measurement"):
        lab_claims(smoke_lab, tmp_path / "bad", effopd=smoke_lab)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
@pytest.mark.xdist_group("smoke_lab")
def test_lab_extrapolation_rows_against_float64_and_the_eval_tables(smoke_lab, tmp_path):
    """Each method from the first 40 % and 70 % of the smoke runs (steps 20; 20, 40 of 60): the linear
    prediction's weight error against a float64 numpy prediction, accuracies tied to eval.csv, EffOPD's nominal
    step from its accepted k and anchor, RELEX refused with one observed step; bad input writes nothing."""
    import numpy as np
    from safetensors.numpy import load_file

    from opd_dynamics.io.naming import MATRIX_GROUPS, is_selected
    from opd_dynamics.lab.extrapolation import lab_extrapolation

    out = lab_extrapolation(smoke_lab, tmp_path / "x", fractions=(0.4, 0.7), n_eval=32, log=lambda m: None)
    df = pd.read_csv(out / "extrapolation.csv")
    assert len(df) == 2 * 2 * 5 and (out / "extrapolation.png").stat().st_size > 0
    w = {s: load_file(smoke_lab / "opd" / f"checkpoint-{s}" / "model.safetensors") for s in (20, 60)}
    w0 = load_file(smoke_lab / "student_init" / "model.safetensors")
    names = [n for n in w0 if is_selected(n, w0[n].shape, MATRIX_GROUPS, True)]
    num = sum(((w0[n].astype(np.float64) + 3 * (w[20][n].astype(np.float64) - w0[n]) - w[60][n]) ** 2).sum()
              for n in names)
    den = sum(((w[60][n].astype(np.float64) - w[20][n]) ** 2).sum() for n in names)
    row = df[(df["run"] == "opd") & (df["fraction"] == 0.4) & (df["method"] == "linear")].iloc[0]
    assert row["weight_error"] == pytest.approx(np.sqrt(num / den), rel=1e-6)  # float32 weights written
    for run in ("opd", "grpo"):
        e = pd.read_csv(smoke_lab / run / "eval.csv").set_index("step")["accuracy"]
        r = df[df["run"] == run]
        assert (r["init_accuracy"] == e[0]).all() and (r["final_accuracy"] == e[60]).all()
        assert (r.loc[r["fraction"] == 0.7, "observed_accuracy"] == e[40]).all()
    ok = df["accuracy"].notna()
    np.testing.assert_allclose(df.loc[ok, "gain_recovered"], (df["accuracy"] - df["init_accuracy"])[ok]
                               / (df["final_accuracy"] - df["init_accuracy"])[ok], rtol=1e-12)
    relex = df[df["method"] == "relex"].set_index(["run", "fraction"])
    assert relex["accuracy"].isna()[("opd", 0.4)] and "needs 2 observed steps" in relex.loc[("opd", 0.4), "note"]
    assert relex["accuracy"].notna()[("opd", 0.7)]
    eff = df[df["method"] == "effopd"].set_index(["run", "fraction"])
    k = eff["k"].astype(int)
    assert ((k >= 0) & (k <= 5)).all()
    assert eff.loc[("opd", 0.4), "nominal_step"] == 20 + 2 * k[("opd", 0.4)] * 20  # anchor: the base
    assert eff.loc[("opd", 0.7), "nominal_step"] == 40 + 2 * k[("opd", 0.7)] * 20  # anchor: step 20
    expo = df[df["method"] == "expo"]
    assert (expo["nominal_step"] == 1.5 * expo["last_observed"]).all()
    with pytest.raises(InputError, match="leaves no observed step"):
        lab_extrapolation(smoke_lab, tmp_path / "bad", fractions=(0.1,), log=lambda m: None)
    with pytest.raises(InputError, match="is not one of"):
        lab_extrapolation(smoke_lab, tmp_path / "bad", methods=("ties",), log=lambda m: None)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
@pytest.mark.xdist_group("smoke_lab")
def test_the_lab_records_sketches_that_agree_with_its_checkpoints(smoke_lab):
    """Each run's sketch series holds every step of its first fifth, then every fifth step; at the steps both
    hold, the sketch's norms and top singular values equal the checkpoints' (float64 exact spectra), and
    sketch_alignment.csv is the sketch analysis' alignment table."""
    from opd_dynamics import SketchSeries, analyze
    from opd_dynamics.lab.layout import SKETCH_K

    meta = json.loads((smoke_lab / "lab.json").read_text())
    last = meta["preset"]["rl_steps"]
    dense = round(0.2 * last)
    sk_al = pd.read_csv(smoke_lab / "sketch_alignment.csv")
    for run in ("opd", "grpo"):
        s = SketchSeries(smoke_lab / run / "sketch", name=run)
        assert s.steps == [t for t in range(1, last + 1) if t <= dense or t % 5 == 0]
        sk = analyze(s)
        ck = analyze(CheckpointSeries.discover(smoke_lab / run, base=smoke_lab / "student_init", name=run),
                     progress=False, n_singular_values=SKETCH_K)
        m = sk["module_allocation"].merge(ck["module_allocation"], on=["step", "tensor"], suffixes=("", "_ck"))
        assert set(m["step"]) == set(range(meta["preset"]["save_steps"], last + 1, meta["preset"]["save_steps"]))
        np.testing.assert_allclose(m["update_norm"], m["update_norm_ck"], rtol=1e-12)
        sv = sk["singular_values"].merge(ck["singular_values"], on=["step", "tensor", "index"], suffixes=("", "_ck"))
        np.testing.assert_allclose(sv["sigma"], sv["sigma_ck"], rtol=1e-6)  # float32 storage of the sketch
        mine = sk_al[sk_al["run"] == run]
        np.testing.assert_allclose(mine["subspace_overlap_u"].to_numpy(),
                                   sk["alignment"]["subspace_overlap_u"].to_numpy(), rtol=1e-12)


@pytest.mark.slow
@pytest.mark.xdist_group("smoke_lab")
def test_early_eval_backfilled_for_an_older_lab_equals_the_one_written_in_training(smoke_lab, tmp_path):
    """A lab made before early_eval.csv existed gets it by training the first steps again (the lab is
    bit-identical on one machine): the same table, value for value, as the run wrote while training."""
    import shutil

    from opd_dynamics.lab.early import backfill

    old = tmp_path / "old"
    shutil.copytree(smoke_lab, old)
    for run in ("opd", "grpo"):
        (old / run / "early_eval.csv").unlink()
    written = backfill(old, log=lambda m: None)
    assert sorted(p.parent.name for p in written) == ["grpo", "opd"]
    for run in ("opd", "grpo"):
        pd.testing.assert_frame_equal(pd.read_csv(old / run / "early_eval.csv"),
                                      pd.read_csv(smoke_lab / run / "early_eval.csv"))

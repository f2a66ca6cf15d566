"""EffOPDCallback inside a real (tiny) TRL DistillationTrainer run, and the ready scorers."""

from __future__ import annotations

import copy

import datasets
import pandas as pd
import pytest
import torch
from transformers import TrainerCallback
from trl import DistillationConfig, DistillationTrainer

from opd_dynamics.effopd.callback import (
    EffOPDCallback,
    completion_mask,
    reverse_kl_scorer,
    reward_scorer,
    sample_validation,
)
from opd_dynamics.effopd.search import select_parameters
from opd_dynamics.lab.models import ModelSpec, make_model
from opd_dynamics.lab.task import build_tokenizer, make_problem, make_splits

SPEC = ModelSpec(hidden=16, layers=1, heads=2, intermediate=32)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Probe(TrainerCallback):
    """Records weights, optimizer state and LR at every on_step_end (placed before or after EffOPD)."""

    def __init__(self):
        self.weights, self.opt, self.lr = {}, {}, {}
        self.initial = None

    def on_train_begin(self, args, state, control, model=None, **kw):
        if self.initial is None:
            self.initial = snapshot(model)

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
        s = state.global_step
        self.weights[s] = snapshot(model)
        self.opt[s] = [{k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
                       for st in optimizer.state.values()]
        self.lr[s] = list(lr_scheduler.get_last_lr())


def test_callback_in_real_distillation_trainer(tmp_path, tok):
    torch.manual_seed(0)
    teacher, student = make_model(SPEC, tok, 1), make_model(SPEC, tok, 2)
    splits = make_splits(2, 64, 8, 0)
    ds = datasets.Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in splits.train])
    val = sample_validation(ds, n=8, seed=0)
    cb = EffOPDCallback(reverse_kl_scorer(teacher, tok, val, max_new_tokens=4))
    before, after = Probe(), Probe()
    args = DistillationConfig(output_dir=str(tmp_path / "run"), max_steps=5, per_device_train_batch_size=4,
                              learning_rate=1e-2, max_completion_length=4, report_to=[], logging_steps=1,
                              save_strategy="no", bf16=False, gradient_checkpointing=False, use_cpu=True,
                              disable_tqdm=True, seed=0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                                  processing_class=tok, callbacks=[before, cb, after])
    cb.bind(trainer)
    trainer.train()

    recs = cb.records
    assert [r.step for r in recs] == [1, 2, 4]
    selected = set(select_parameters(student))
    assert selected and all(".self_attn." in n or ".mlp." in n or "post_attention_layernorm" in n
                            for n in selected)  # EffOPD's name rule: attention and MLP names
    anchor = before.initial
    for step in range(1, 6):
        wt, post = before.weights[step], after.weights[step]
        rec = next((r for r in recs if r.step == step), None)
        for n in wt:
            if rec is None or n not in selected:  # non-trigger steps and unselected tensors: bit-identical
                assert torch.equal(post[n], wt[n]), (step, n)
            else:  # W_t + coef·(W_t − anchor), against a float64 reference
                ref = wt[n].double() + rec.coef * (wt[n].double() - anchor[n].double())
                torch.testing.assert_close(post[n].double(), ref, rtol=1e-6, atol=1e-6)
        if rec is not None:
            anchor = post  # the accepted weights become the anchor
            # the acceptance rule read back from the logged scores ('>=': keep going while not worse)
            best, k = rec.scores[0], 0
            for i, s in enumerate(rec.scores[1:], start=1):
                if s < best:
                    break
                best, k = s, i
            assert rec.k_accepted == k and rec.coef == 2 * k
            assert len(rec.scores) == min(k + 2, 6)
        # optimizer state and LR schedule untouched
        assert before.lr[step] == after.lr[step]
        for a, b in zip(before.opt[step], after.opt[step], strict=True):
            assert a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key]))
                                                for key in a)

    hist = trainer.state.log_history
    assert [h["step"] for h in hist if "effopd/k" in h] == [1, 2, 4]
    assert [h["effopd/k"] for h in hist if "effopd/k" in h] == [float(r.k_accepted) for r in recs]
    assert [h["step"] for h in hist if "loss" in h] == [1, 2, 3, 4, 5]  # the trainer's own logs are not lost
    csv = pd.read_csv(tmp_path / "run" / "effopd_triggers.csv")
    assert list(csv["step"]) == [1, 2, 4] and list(csv["k_accepted"]) == [r.k_accepted for r in recs]


def test_resume_keeps_the_anchor_and_the_trigger_log(tmp_path, tok):
    """Stop at step 3 (checkpoint-3 saved), resume to step 4: the step-4 jump is taken from the anchor set at
    step 2's trigger, as in an uninterrupted run, and the triggers at 1 and 2 stay in the CSV."""
    torch.manual_seed(0)
    teacher = make_model(SPEC, tok, 1)
    splits = make_splits(2, 64, 8, 0)
    ds = datasets.Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in splits.train])

    def run(max_steps: int, probes, resume=None):
        cb = EffOPDCallback(None, fixed_k=1)  # always jumps: W_t + 2(W_t − anchor)
        args = DistillationConfig(output_dir=str(tmp_path / "run"), max_steps=max_steps, save_steps=3,
                                  per_device_train_batch_size=4, learning_rate=1e-2, max_completion_length=4,
                                  report_to=[], logging_steps=1, bf16=False, gradient_checkpointing=False,
                                  use_cpu=True, disable_tqdm=True, seed=0)
        trainer = DistillationTrainer(model=make_model(SPEC, tok, 2), teacher_model=teacher, args=args,
                                      train_dataset=ds, processing_class=tok, callbacks=[probes[0], cb, probes[1]])
        trainer.train(resume_from_checkpoint=resume)
        return cb

    first = (Probe(), Probe())
    run(3, first)
    assert (tmp_path / "run" / "checkpoint-3" / "effopd_anchor.safetensors").exists()
    second = (Probe(), Probe())
    cb = run(4, second, resume=str(tmp_path / "run" / "checkpoint-3"))
    assert [r.step for r in cb.records] == [4]
    anchor = first[1].weights[2]  # the weights accepted at step 2's trigger
    wt, post = second[0].weights[4], second[1].weights[4]
    for n in select_parameters(cb.effopd.model):
        ref = wt[n].double() + 2 * (wt[n].double() - anchor[n].double())
        torch.testing.assert_close(post[n].double(), ref, rtol=1e-6, atol=1e-6)
    assert not torch.equal(post[n], wt[n])  # a real jump
    csv = pd.read_csv(tmp_path / "run" / "effopd_triggers.csv")
    assert list(csv["step"]) == [1, 2, 4] and list(csv["k_accepted"]) == [1, 1, 1]


def test_reverse_kl_scorer_is_zero_against_itself_and_negative_otherwise(tok):
    student = make_model(SPEC, tok, 3)
    prompts = [make_problem(a, b, 2).prompt for a, b in ((12, 34), (99, 1), (5, 50))]
    assert reverse_kl_scorer(copy.deepcopy(student), tok, prompts, max_new_tokens=4)(student) == 0.0
    other = make_model(SPEC, tok, 4)
    s = reverse_kl_scorer(other, tok, prompts, max_new_tokens=4, batch_size=2)(student)
    assert s < 0
    # sampled completions from a fixed seed give the same score twice and leave the global RNG alone
    sc = reverse_kl_scorer(other, tok, prompts, max_new_tokens=4, do_sample=True, seed=7)
    state = torch.random.get_rng_state()
    assert sc(student) == sc(student)
    assert torch.equal(state, torch.random.get_rng_state())


def test_reward_scorer_passes_aligned_columns(tok):
    model = make_model(SPEC, tok, 5)
    rows = [{"prompt": make_problem(a, b, 2).prompt, "answer": make_problem(a, b, 2).answer, "w": w}
            for a, b, w in ((1, 2, 1.0), (30, 40, 0.5), (7, 70, 0.25))]

    def reward(completions, prompts, answer, w, **_):
        assert len(completions) == len(prompts) == len(answer) == len(w)
        return [wi if make_problem(int(p[:2]), int(p[3:5]), 2).answer == a else -100.0
                for p, a, wi in zip(prompts, answer, w)]

    assert reward_scorer(tok, rows, reward, max_new_tokens=4, batch_size=2)(model) == pytest.approx(1.75 / 3)


def test_reward_scorer_gives_the_reward_the_ids_so_an_unended_answer_is_wrong(tok, monkeypatch):
    """The decoded text skips special tokens, so '003' reads the same whether the model ended it with EOS,
    put BOS inside it, or ran out of tokens; the lab's exact-match reward decides by the ids the scorer
    passes, as TRL passes them in training."""
    from opd_dynamics.effopd import callback
    from opd_dynamics.lab.task import exact_match_reward

    d3, d0, eos, bos, pad = tok.convert_tokens_to_ids("3"), tok.convert_tokens_to_ids("0"), 2, 1, 0
    comp = torch.tensor([[d0, d0, d3, eos, pad],    # ended: correct
                         [d0, d0, d3, d3, d3],      # '00333': wrong text
                         [d0, d0, d3, d0, d0],      # '00300': wrong text
                         [d0, bos, d0, d3, eos],    # BOS inside: reads '003', is not an answer
                         [d0, d0, d3, pad, pad]])   # no EOS: reads '003', did not end
    monkeypatch.setattr(callback, "generate_completions", lambda *a: (None, None, comp))
    rows = [{"prompt": make_problem(1, 2, 2).prompt, "answer": "003"}] * 5
    seen = []

    def reward(completions, completion_ids, **kw):
        seen.extend(completion_ids)
        return exact_match_reward(completions, completion_ids=completion_ids, **kw)

    assert reward_scorer(tok, rows, reward, max_new_tokens=5)(torch.nn.Linear(1, 1)) == pytest.approx(1 / 5)
    assert seen[0] == [d0, d0, d3, eos] and seen[4] == [d0, d0, d3, pad, pad]


@pytest.mark.parametrize("kw, message", [({"k_max": -1}, "k_max and fixed_k must be >= 0"),
                                         ({"schedule": "every-other"}, "schedule"),
                                         ({"score_fn": None}, "needs a score_fn")])
def test_a_bad_callback_option_fails_when_the_callback_is_made(kw, message):
    """Not minutes later at on_train_begin, after the trainer and its models are built."""
    with pytest.raises(ValueError, match=message):
        EffOPDCallback(**{"score_fn": lambda m: 0.0, **kw})


def test_completion_mask_and_validation_sample():
    comp = torch.tensor([[5, 2, 0, 0], [5, 5, 5, 5], [2, 0, 0, 0]])
    assert completion_mask(comp, 2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    rows = [{"prompt": str(i)} for i in range(64)]
    a, b = sample_validation(rows, 50, seed=1), sample_validation(rows, 50, seed=1)
    assert a == b and len({r["prompt"] for r in a}) == 50
    assert sample_validation(rows[:10], 50) == rows[:10]


def test_reward_scorer_samples_afresh_per_candidate_reproducibly_and_greedy_on_request(tok):
    """As the authors validate: one sample at T = 1 per prompt, drawn afresh for every candidate (call), yet
    the same sequence of draws in a rerun, and the training RNG untouched; greedy when asked."""
    model = make_model(SPEC, tok, 6)
    rows = [{"prompt": make_problem(a, b, 2).prompt} for a, b in ((1, 2), (30, 40), (7, 70), (12, 21))] * 4
    seen: list[list[str]] = []

    def reward(completions, **_):
        seen.append(list(completions))
        return [0.0] * len(completions)

    state = torch.random.get_rng_state()
    sampled = reward_scorer(tok, rows, reward, max_new_tokens=4)
    sampled(model), sampled(model)
    again = reward_scorer(tok, rows, reward, max_new_tokens=4)
    again(model)
    assert torch.equal(state, torch.random.get_rng_state())
    assert seen[0] != seen[1] and seen[2] == seen[0]
    greedy = reward_scorer(tok, rows, reward, max_new_tokens=4, do_sample=False)
    greedy(model), greedy(model)
    assert seen[3] == seen[4] and seen[3][:4] * 4 == seen[3]  # one answer per prompt, whatever the call

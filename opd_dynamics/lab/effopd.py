"""The lab's EffOPD measurement: vanilla OPD at 1×, 3× and 10× a base rate vs EffOPD (adaptive) vs a fixed
coefficient, same seeds and budget.

Per seed, up to five real OPD runs (TRL DistillationTrainer, the lab's preset; ``methods`` chooses them, vanilla
always among them) start from the seed's student_init with its teacher, the same train prompts, optimizer steps
and run seed; they differ only in the learning rate (``lr``, default the preset's opd_lr) and in what happens at
the trigger steps 1, 2, 4, 8, …:

- ``vanilla``: nothing, at the base rate; ``vanilla-3x``, ``vanilla-10x``: nothing, at 3× and 10× it (does a
  larger step do what a jump does?);
- ``effopd``: the published adaptive search at the base rate (K = 5 candidates W_t + 2kΔ, accept while the
  validation score — by default sampled accuracy on 50 prompts sampled from the training prompts, drawn afresh
  per candidate — is strictly above the best so far);
- ``fixed``: always jump with a fixed k (default 2, i.e. W_t + 4Δ, the middle of the published range), no
  validation — what the adaptive choice adds over a blind jump.

**Seeds.** ``lab=ROOT`` holding ``seed-K/`` lab directories (`lab run --seeds N --out ROOT`): seed K runs from
ROOT/seed-K's teacher and student_init on that lab's split (its lab.json seed), so seeds are independent. No
``lab``: each seed trains its own (`train_teacher_and_student` with that seed, kept under ``models/seed-K``).
``lab=DIR``, one lab directory: every seed shares it and the seeds are *not independent* (the log says so;
effopd.json: ``independent_seeds`` false). effopd.json's ``models`` records each seed's lab, teacher, init and
split seed.

Held-out greedy accuracy is measured at step 0, at every step up to ``dense_until``, then at every trigger step,
every ``eval_every`` steps and at the end (one evaluation of the default preset's 500 prompts: 1.0–1.6 s on one
thread of the 2-core machine, an OPD step 0.8–1.1 s); that measurement is excluded from ``wall_s`` (training
wall-clock, EffOPD's own validation included, reported separately as ``validation_s``). At each trigger of effopd
and fixed the held-out accuracy is taken before the search as well, so effopd_triggers has it before and right
after every jump. ``steps_to_target`` is the first measured step whose held-out accuracy is ≥ 95 % of vanilla's
(base-rate) final held-out accuracy for that seed, for every method.

Before EffOPD and fixed run for a seed, its vanilla run is probed at the early probe steps (W_t + c·(W_t − W_{t/2})
on the held-out problems, `opd_dynamics.effopd.probe`): greedy correctness per held-out prompt, and the per-token
KL(candidate ‖ teacher) per prompt on completions sampled once from W_t (seeded), both paired across the pair's
candidates. Where no c in the gate's range gains on W_t by more than two paired standard errors with the KL not
worse, they are not run ("no foresight in this regime"; `gate=False` runs them anyway). The rate controls always
run.

**Verdicts** (`effopd_verdicts`, the one rule of `opd_dynamics.analysis.stats`): per method against vanilla, and
effopd against vanilla-3x and vanilla-10x (`comparisons`), over the paired seeds: the step speedup (the baseline's
steps to target over the method's) by the sign test against 1 with its geometric mean and 95 % t interval, and
the final held-out accuracy (method − baseline) by the sign test against 0 with its mean and interval;
effopd.json holds them with the steps-to-target table, and the log prints both."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import TrainerCallback

from opd_dynamics.analysis.stats import GREATER, NOT_TESTABLE, RULE, paired_test, ratio_test
from opd_dynamics.analysis.stats import summary as test_summary
from opd_dynamics.effopd.callback import EffOPDCallback, model_device, sample_validation, token_reverse_kl
from opd_dynamics.effopd.options import is_power_of_two
from opd_dynamics.effopd.probe import GATE_TEXT, ProbeScore, best_gain, gate_text, line_probe, pair_label, verdict
from opd_dynamics.effopd.summary import per_seed_speedups
from opd_dynamics.errors import InputError
from opd_dynamics.io.series import CheckpointSeries
from opd_dynamics.lab.evaluate import completion_texts, evaluate_model, generate
from opd_dynamics.lab.layout import LabDir, seed_dir
from opd_dynamics.lab.models import load_model
from opd_dynamics.lab.presets import EFFOPD_METHODS, VALIDATIONS, EffOPDLabOptions, LabPreset, get_preset
from opd_dynamics.lab.task import build_tokenizer
from opd_dynamics.lab.train import build_opd_trainer, splits_for, train_teacher_and_student
from opd_dynamics.schema import EFFOPD_JSON, TABLES

METHODS = tuple(EFFOPD_METHODS)
#: the methods that jump (run only where the line probe's gate opens); the others are plain OPD
JUMPS = ("effopd", "fixed")
#: the larger rates EffOPD is compared with besides vanilla: does a jump beat a larger step?
RATE_CONTROLS = ("vanilla-3x", "vanilla-10x")
# the columns of effopd_summary.csv, effopd_curves.csv and effopd_triggers.csv: opd_dynamics.schema.TABLES
# (the summary's also under their old name)
SUMMARY_COLUMNS = TABLES["effopd_summary"].names


class _Curve(TrainerCallback):
    """Held-out accuracy at chosen steps; its own time is kept out of the training wall-clock."""

    def __init__(self, tok, heldout, eval_every: int, max_steps: int, log: Callable[[str], None], label: str,
                 dense_until: int = 0):
        self.tok, self.heldout, self.eval_every, self.max_steps = tok, heldout, eval_every, max_steps
        self.dense_until = dense_until
        self.rows: list[dict] = []
        self.eval_s = 0.0
        self.t0 = 0.0
        self.log, self.label = log, label

    def accuracy(self, model) -> float:
        """Held-out accuracy of ``model`` now, its time kept out of the training wall-clock."""
        t = time.perf_counter()
        acc = evaluate_model(model, self.tok, self.heldout)["accuracy"]  # the model's train/eval mode is kept
        self.eval_s += time.perf_counter() - t
        return acc

    def _measure(self, model, step: int) -> None:
        wall = time.perf_counter() - self.t0 - self.eval_s
        acc = self.accuracy(model)
        self.rows.append({"step": step, "accuracy": acc, "wall_s": wall})
        if step % (self.eval_every * 5) == 0 or step == self.max_steps:
            self.log(f"  {self.label} step {step}: held-out accuracy {acc:.3f} (train wall {wall:.0f}s)")

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.t0 = time.perf_counter()
        self._measure(model, 0)

    def on_step_end(self, args, state, control, model=None, **kw):
        s = state.global_step
        if s <= self.dense_until or s % self.eval_every == 0 or is_power_of_two(s) or s == self.max_steps:
            self._measure(model, s)
        return control


class _BeforeJump(TrainerCallback):
    """Held-out accuracy at each trigger step before EffOPD moves the weights (placed before its callback)."""

    def __init__(self, curve: _Curve, eff: EffOPDCallback):
        self.curve, self.eff, self.accuracy = curve, eff, {}

    def on_step_end(self, args, state, control, model=None, **kw):
        if self.eff.effopd is not None and self.eff.effopd.should_trigger(state.global_step):
            self.accuracy[state.global_step] = self.curve.accuracy(model)
        return control


class _Snapshots(TrainerCallback):
    """Saves the model at the probe steps (and their halves), for the line probe after the run."""

    def __init__(self, steps: set[int], root: Path, curve: _Curve):
        self.steps, self.root, self.saved, self.curve = steps, root, {}, curve

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step in self.steps:
            t = time.perf_counter()
            d = self.root / f"checkpoint-{state.global_step}"
            model.save_pretrained(d)
            self.saved[state.global_step] = d
            self.curve.eval_s += time.perf_counter() - t  # kept out of the training wall-clock, as evaluation is
        return control


def probe_pairs(probe_steps, max_steps: int) -> list[tuple[int, int]]:
    """(t/2, t) for each probe step t within the run (t ≥ 2)."""
    return [(t // 2, t) for t in sorted(set(probe_steps)) if 2 <= t <= max_steps]


def steps_to_target(curve: pd.DataFrame, target: float) -> float:
    """First measured step with accuracy ≥ target (NaN if never)."""
    hit = curve[curve["accuracy"] >= target - 1e-12].sort_values("step")
    return float(hit["step"].iloc[0]) if len(hit) else float("nan")


def is_single_lab(lab: Path) -> bool:
    """``--lab`` names one lab directory (student_init/ or lab.json in it), not a root of seed-K/ labs."""
    return LabDir(lab).student_init.is_dir() or LabDir(lab).meta_path.exists()


def lab_models(lab: Path, seed: int) -> dict:
    """Seed ``seed``'s models from ``--lab``: a root's ``seed-K/`` lab (its own teacher, student_init and split
    seed), or the one lab directory every seed shares. {lab, teacher, student_init, data_seed, shared}."""
    shared = is_single_lab(lab)
    d = LabDir(lab) if shared else LabDir(seed_dir(lab, seed))
    if not shared and not d.root.is_dir():
        raise InputError(lab, f"is neither a lab directory nor a root holding {d.root.name}/ (seed {seed})")
    d.require(teacher=True)
    return {"lab": str(d.root), "teacher": str(d.teacher), "student_init": str(d.student_init),
            "data_seed": d.split_seed(0 if shared else seed), "shared": shared}


def built_models(work: Path, p: LabPreset, seed: int, log) -> dict:
    """Seed ``seed``'s own teacher and student_init, trained here as `lab run` does with that seed (split seed
    ``seed``), under ``work/seed-K``."""
    d = LabDir(seed_dir(work, seed))
    log(f"[effopd] seed {seed}: no lab given: training its own student_init and teacher (lab SFT, seed {seed})")
    train_teacher_and_student(d.root, p, seed, log=log)
    return {"lab": None, "teacher": str(d.teacher), "student_init": str(d.student_init), "data_seed": seed,
            "shared": False}


def validation_score(kind: str, tok, probs, teacher_dir: Path, seed: int, **eval_kw):
    """EffOPD's score function on the validation problems (see EffOPDLabOptions.validation); ``eval_kw`` go to
    `evaluate_model` (a pretrained base's ``stop_ids`` and ``batch_size``)."""
    calls = iter(range(1 << 62))
    if kind == "sampled":  # a fresh draw for every candidate, reproducible across reruns
        return lambda model: evaluate_model(model, tok, probs, greedy=False, sampled=True,
                                            seed=1_000_003 * seed + next(calls), **eval_kw)["accuracy_sampled"]
    if kind == "greedy":
        return lambda model: evaluate_model(model, tok, probs, **eval_kw)["accuracy"]
    if kind == "greedy+kl":
        teacher = load_model(teacher_dir)

        def score(model) -> tuple[float, float]:
            r = evaluate_model(model, tok, probs, teacher=teacher, seed=seed, **eval_kw)
            return r["accuracy"], -r["reverse_kl"]
        return score
    raise InputError(None, f"validation must be one of {VALIDATIONS}, not {kind!r}", ("validation",))


def base_lr(opt: EffOPDLabOptions, p: LabPreset) -> float:
    """The base OPD learning rate: the option, else the preset's opd_lr."""
    return opt.lr or p.opd_lr


def method_lr(method: str, base: float) -> float:
    """A method's learning rate: ``base`` times its multiple (`EFFOPD_METHODS`)."""
    return base * EFFOPD_METHODS[method]


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """The methods to run, in the measurement's order; vanilla must be among them (it defines the target)."""
    bad = [m for m in methods if m not in EFFOPD_METHODS]
    if bad or "vanilla" not in methods:
        raise InputError(None, f"methods must include vanilla and be among {', '.join(EFFOPD_METHODS)}"
                         + (f"; unknown: {', '.join(bad)}" if bad else ""), ("methods",))
    return tuple(m for m in EFFOPD_METHODS if m in methods)


def _one_run(method: str, seed: int, teacher: Path, student: Path, data_seed: int, p: LabPreset,
             opt: EffOPDLabOptions, work: Path, log, pairs: Sequence[tuple[int, int]] = ()
             ) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    tok = build_tokenizer()
    sp = splits_for(p, data_seed)
    held = sp.heldout[: p.n_eval]
    steps = run_steps(opt, p)
    curve = _Curve(tok, held, opt.eval_every, steps, log, f"seed {seed} {method}", opt.dense_until)
    callbacks: list = []
    eff = before = None
    if method in JUMPS:
        val = {r["prompt"] for r in sample_validation(({"prompt": q.prompt, "answer": q.answer} for q in sp.train),
                                                       opt.n_val, seed)}
        probs = [q for q in sp.train if q.prompt in val]

        score = validation_score(opt.validation, tok, probs, teacher, seed) if method == "effopd" else None

        eff = EffOPDCallback(score, opt.effopd,
                             fixed_k=opt.fixed_k if method == "fixed" else None, max_step=steps,
                             csv_path=work / f"{method}-{seed}-triggers.csv")
        before = _BeforeJump(curve, eff)
        callbacks += [before, eff]
    callbacks.append(curve)  # after EffOPD: the curve sees the weights training continues from
    snaps = None
    if method == "vanilla" and pairs:
        snaps = _Snapshots({x for pair in pairs for x in pair if x > 0}, work / f"probe-{seed}", curve)
        callbacks.append(snaps)
    out_dir = work / f"{method}-{seed}"
    trainer = build_opd_trainer(student, teacher, out_dir, p, seed, callbacks, max_steps=steps,
                                save_steps=steps + 1, data_seed=data_seed, lr=method_lr(method, base_lr(opt, p)))
    from transformers.trainer_callback import ProgressCallback

    trainer.remove_callback(ProgressCallback)
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    shutil.rmtree(out_dir, ignore_errors=True)
    c = pd.DataFrame(curve.rows).assign(seed=seed, method=method)[TABLES["effopd_curves"].names]
    recs = eff.records if eff is not None else []
    after = dict(zip(c["step"], c["accuracy"]))
    trig = pd.DataFrame([{"seed": seed, "method": method, "step": r.step, "k_accepted": r.k_accepted,
                          "coef": r.coef, "tie": r.tie, "scores": json.dumps(r.scores),
                          "accuracy_before": before.accuracy.get(r.step, np.nan),
                          "accuracy_after": after.get(r.step, np.nan)} for r in recs],
                        columns=TABLES["effopd_triggers"].names)
    ties = sum(r.tie for r in recs)
    info = {"lr": float(trainer.args.learning_rate), "wall_s": total - curve.eval_s,
            "validation_s": sum(r.validation_s for r in recs),
            "final_accuracy": float(c.sort_values("step")["accuracy"].iloc[-1]), "tie_accepts": ties}
    jumps = [f"{r.step}: k={r.k_accepted} {before.accuracy.get(r.step, np.nan):.3f} → {after.get(r.step, np.nan):.3f}"
             for r in recs if r.k_accepted > 0]
    log(f"[effopd] seed {seed} {method} (lr {info['lr']:g}): final accuracy {info['final_accuracy']:.3f}, wall "
        f"{info['wall_s']:.0f}s (validation {info['validation_s']:.0f}s)"
        + (f", k per trigger {[r.k_accepted for r in recs]}" if recs else "")
        + (f"; held-out accuracy before → after each accepted jump: {', '.join(jumps)}" if jumps else "")
        + (f"; {ties} of them accepted on a tie (see the warnings above)" if ties else ""))
    if snaps is not None:
        info["probe"] = _probe(seed, student, teacher, snaps.saved, pairs, tok, held, log, work)
    return c, trig, info


def run_steps(opt: EffOPDLabOptions, p: LabPreset) -> int:
    """Optimizer steps per run: the option, else the preset's rl_steps."""
    return opt.max_steps or p.rl_steps


def _by_length(tok, problems) -> list[tuple[np.ndarray, torch.Tensor, list[str]]]:
    """The problems grouped by prompt length: (their indices, prompt ids, answers) per group."""
    ids = tok([p.prompt for p in problems])["input_ids"]
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(ids):
        groups.setdefault(len(row), []).append(i)
    return [(np.asarray(ix), torch.tensor([ids[i] for i in ix]), [problems[i].answer for i in ix])
            for ix in groups.values()]


@torch.no_grad()
def greedy_correct(model, tok, problems) -> np.ndarray:
    """Per problem, 1.0 when the greedy completion is the exact answer (the lab's held-out accuracy, per item)."""
    model.eval()
    out = np.zeros(len(problems))
    for ix, prompt_ids, answers in _by_length(tok, problems):
        s = generate(model, prompt_ids, max(len(a) for a in answers) + 1, tok.eos_token_id, greedy=True)
        out[ix] = [float(t == a) for t, a in zip(completion_texts(tok, s), answers, strict=True)]
    return out


@torch.no_grad()
def fixed_samples(model, tok, problems, seed: int) -> list[tuple[np.ndarray, object]]:
    """One completion per problem sampled at T = 1 from ``model`` (a seeded generator): the fixed contexts the
    probe's KL is measured on."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    return [(ix, generate(model, prompt_ids, max(len(a) for a in answers) + 1, tok.eos_token_id, greedy=False,
                          generator=gen)) for ix, prompt_ids, answers in _by_length(tok, problems)]


@torch.no_grad()
def kl_per_item(model, teacher, samples, n: int, forward: bool = False) -> np.ndarray:
    """Per problem, the mean over its completion tokens (up to and including the first EOS) of
    KL(p_model ‖ p_teacher) (``forward``: KL(p_teacher ‖ p_model)), float64, on the fixed ``samples``."""
    model.eval()
    teacher.eval()
    out = np.zeros(n)
    for ix, s in samples:
        seq = torch.cat([s.prompt_ids, s.completion_ids], dim=1)
        p, c = s.prompt_ids.size(1), s.completion_ids.size(1)
        ls = model(input_ids=seq.to(model_device(model)), use_cache=False).logits[:, p - 1: p + c - 1]
        lt = teacher(input_ids=seq.to(model_device(teacher)), use_cache=False).logits[:, p - 1: p + c - 1]
        ls, lt = ls.double().cpu(), lt.double().cpu()
        kl = token_reverse_kl(lt, ls) if forward else token_reverse_kl(ls, lt)
        m = s.mask.double()
        out[ix] = ((kl * m).sum(1) / m.sum(1).clamp(min=1)).numpy()
    return out


def probe_scorer(tok, held, teacher, samples, teacher_samples=None) -> Callable[[Path], ProbeScore]:
    """The lab's probe score of a model directory: held-out greedy accuracy with its per-prompt values, the
    reverse teacher KL per prompt on the fixed student ``samples`` (the gate's paired noise margins) and, with
    ``teacher_samples``, the forward KL on those (reported)."""
    def score(path: Path) -> ProbeScore:
        model = load_model(path)
        items = greedy_correct(model, tok, held)
        kl = kl_per_item(model, teacher, samples, len(held))
        fwd = None if teacher_samples is None else \
            float(kl_per_item(model, teacher, teacher_samples, len(held), forward=True).mean())
        return ProbeScore(float(items.mean()), items, float(kl.mean()), kl, fwd)
    return score


def _probe(seed: int, student: Path, teacher_dir: Path, saved: dict[int, Path], pairs, tok, held, log,
           work: Path) -> pd.DataFrame:
    """The line probe of a vanilla run at its early pairs: held-out greedy accuracy per prompt, the reverse teacher
    KL on completions sampled once from W_t and the forward KL on completions sampled once from the teacher, for
    every candidate of the pair."""
    series = CheckpointSeries.from_list(sorted(saved.items()), base=student, name=f"seed{seed}")
    teacher = load_model(teacher_dir)
    from_teacher = fixed_samples(teacher, tok, held, seed=1_000_003 * seed)  # the forward KL's contexts, once
    frames = []
    for s_, t_ in pairs:
        samples = fixed_samples(load_model(saved[t_]), tok, held, seed=1_000_003 * seed + t_)
        frames.append(line_probe(series, [(s_, t_)], probe_scorer(tok, held, teacher, samples, from_teacher),
                                 work=work))
    df = pd.concat(frames, ignore_index=True)
    ok, best = verdict(df), best_gain(df)
    for (s_, t_), d in df.groupby(["step_from", "step"]):
        pair = pair_label(s_, t_)
        scores = ", ".join(f"c={c:g} {v:.3f}" for c, v in zip(d["coef"], d["score"]))
        b = best.get(pair)
        margin = "" if b is None else (f"; best {GATE_TEXT}: c={b['coef']:g} gain {b['gain']:+.3f} ± "
                                       f"{b['paired_se']:.3f} (paired SE)")
        log(f"[effopd] seed {seed} probe {pair}: {scores}{margin}" +
            ("" if ok[pair] else "  (the gate stays closed)"))
    return df


def comparisons(methods: Sequence[str] = METHODS) -> list[tuple[str, str, str]]:
    """(key, method, baseline) of every comparison among ``methods``: each one against vanilla (key: the
    method), and effopd against each larger rate (key: "effopd vs vanilla-3x" …)."""
    out = [(m, m, "vanilla") for m in METHODS[1:] if m in methods]
    if "effopd" in methods:
        out += [(f"effopd vs {b}", "effopd", b) for b in RATE_CONTROLS if b in methods]
    return out


def effopd_verdicts(summary: pd.DataFrame) -> dict:
    """Every comparison (`comparisons`) over the paired seeds of the methods in ``summary`` (module docstring):
    the step speedup (baseline's steps to target over the method's) and the final held-out accuracy (method −
    baseline), each with its test under the one rule (`analysis.stats`)."""
    out: dict = {}
    for key, m, b in comparisons(set(summary["method"])):
        rows = summary[summary["method"] == m].set_index("seed")
        base = summary[summary["method"] == b].set_index("seed")
        ratio = per_seed_speedups(summary, m, b).dropna()
        acc = (rows["final_accuracy"].astype(float) - base["final_accuracy"].astype(float)).dropna()
        res: dict = {"method": m, "baseline": b}
        for what, vals, test in (("speedup", ratio, ratio_test), ("final_accuracy", acc, paired_test)):
            if vals.empty:
                res[what] = {"verdict": NOT_TESTABLE, "n": 0, "note": "no seed where both runs reached the target"
                             if what == "speedup" else "no paired seed"}
                continue
            t = test(vals.to_numpy(), GREATER)
            res[what] = {**t.as_dict(), "per_seed": {int(k): float(v) for k, v in vals.items()},
                         "text": test_summary(t, ratio=what == "speedup")}
        out[key] = res
    return out


def run_effopd_lab(out: str | Path, preset: str | LabPreset = "smoke", seeds: int | Sequence[int] = 5, *,
                   lab: str | Path | None = None, options: EffOPDLabOptions | None = None, overwrite: bool = False,
                   log: Callable[[str], None] | None = None) -> Path:
    """Run the measurement into ``out``: effopd_summary.csv, effopd_curves.csv, effopd_triggers.csv,
    effopd.png and effopd.json (options, models per seed, steps to target, speedups, verdicts, timings). Written
    under a temporary name, then renamed."""
    from opd_dynamics.io.writer import atomic_dir, json_text

    p = get_preset(preset)
    opt = options or EffOPDLabOptions()
    if opt.eval_every is None:
        opt = replace(opt, eval_every=2 if p.name == "smoke" else 10)
    methods = check_methods(opt.methods)
    log = log or (lambda m: print(m, flush=True))
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    out = Path(out).resolve()
    lab_dir = Path(lab).resolve() if lab is not None else None
    sources = {s: lab_models(lab_dir, s) for s in seed_list} if lab_dir else {}  # refused before anything runs
    independent = lab_dir is None or not is_single_lab(lab_dir)
    if not independent:
        log(f"[effopd] --lab {lab_dir} is one lab directory: every seed shares its teacher and student_init, so the "
            "seeds are not independent (they differ only in the run seed: data order and sampling)")
    with atomic_dir(out, "effopd-lab", overwrite=overwrite, inputs=[lab_dir] if lab_dir else []) as tmp:
        torch.set_num_threads(p.threads)
        t_all = time.perf_counter()
        curves, trigs, rows, probes, gate = [], [], [], [], {}
        pairs = probe_pairs(opt.probe_steps, run_steps(opt, p))
        if opt.gate and not pairs:
            log(f"[effopd] no probe step of {list(opt.probe_steps)} lies within the {run_steps(opt, p)}-step runs: "
                "the gate is not applied")
        for seed in seed_list:
            if lab_dir is None:
                sources[seed] = built_models(tmp / "models", p, seed, log)
            src = sources[seed]
            log(f"[effopd] seed {seed}: teacher {src['teacher']}, student_init {src['student_init']}, split seed "
                f"{src['data_seed']}")
            for method in methods:
                if method in JUMPS and opt.gate and pairs and not any(gate[seed].values()):
                    log(f"[effopd] seed {seed}: {method} not run: no foresight in this regime (the line probe at "
                        f"{', '.join(gate[seed])}: no {GATE_TEXT} gains on W_t by more than two paired standard "
                        "errors with the teacher KL not worse; see probe.csv)")
                    continue
                log(f"[effopd] seed {seed}: {method} ({run_steps(opt, p)} steps at lr "
                    f"{method_lr(method, base_lr(opt, p)):g}, preset {p.name})")
                c, t, info = _one_run(method, seed, Path(src["teacher"]), Path(src["student_init"]),
                                      src["data_seed"], p, opt, tmp, log, pairs)
                if "probe" in info:
                    pr = info.pop("probe")
                    probes.append(pr)
                    gate[seed] = verdict(pr)
                curves.append(c)
                trigs.append(t)
                rows.append({"seed": seed, "method": method, **info})
        curves_df = pd.concat(curves, ignore_index=True)
        trig_df = pd.concat(trigs, ignore_index=True)
        summary = summarize(curves_df, pd.DataFrame(rows), opt.target_fraction)
        verdicts = effopd_verdicts(summary)
        summary.to_csv(tmp / "effopd_summary.csv", index=False)
        curves_df.to_csv(tmp / "effopd_curves.csv", index=False)
        trig_df.to_csv(tmp / "effopd_triggers.csv", index=False)
        if probes:
            pd.concat(probes, ignore_index=True).to_csv(tmp / TABLES["probe"].file, index=False)
        for line in verdict_lines(verdicts, summary, opt.target_fraction):
            log(line)
        if not verdicts:
            log("[effopd] no verdict: only vanilla ran (the gate closed on every seed, or no other method was asked)")
        probe_df = pd.concat(probes, ignore_index=True) if probes else None
        for src in sources.values():  # the models built here, relative to the output
            if src["lab"] is None:
                src.update({k: str(Path(src[k]).relative_to(tmp)) for k in ("teacher", "student_init")})
        meta = {"preset": p.name, "seeds": seed_list, "independent_seeds": independent,
                "models": {str(k): v for k, v in sources.items()}, "lab": str(lab_dir) if lab_dir else None,
                "options": asdict(opt), "steps": run_steps(opt, p),
                "lr": {m: method_lr(m, base_lr(opt, p)) for m in methods},
                "steps_to_target": {m: {str(int(k)): (None if pd.isna(v) else float(v)) for k, v in col.items()}
                                    for m, col in steps_table(summary, lr=False).items()},
                "speedup": speedups(summary, methods), "verdicts": verdicts, "verdict_rule": RULE,
                "probe_pairs": pairs, "probe_verdict": {str(k): v for k, v in gate.items()},
                "probe_gate": gate_text(probe_df) if probe_df is not None else None,
                "probe_best_gain": {str(int(k)): best_gain(d) for k, d in probe_df.groupby(
                    probe_df["run"].str.removeprefix("seed"))} if probe_df is not None else {},
                "gated_out_seeds": [k for k, v in gate.items() if opt.gate and not any(v.values())],
                "total_s": round(time.perf_counter() - t_all, 1)}
        (tmp / EFFOPD_JSON).write_text(json_text(meta))
        plot(curves_df, summary, tmp / "effopd.png", opt.target_fraction)
        for f in tmp.glob("*-triggers.csv"):
            f.unlink()
        for d in tmp.glob("probe-*"):
            shutil.rmtree(d)
    log(f"[effopd] wrote {out}")
    return out


def verdict_lines(verdicts: dict, summary: pd.DataFrame, target_fraction: float) -> list[str]:
    """What the log says of a measurement: the steps to target per seed (`steps_text`), then each comparison's
    speedup and final-accuracy verdict (`effopd_verdicts`), a line each."""
    return [f"[effopd] steps to target ({target_fraction:.0%} of vanilla's final held-out accuracy) per seed:\n"
            + steps_text(summary)] + [
        f"[effopd] {res['method']} vs {res['baseline']}, {what.replace('_', ' ')}: "
        + res[what].get("text", res[what]["verdict"])
        for res in verdicts.values() for what in ("speedup", "final_accuracy")]


def steps_table(summary: pd.DataFrame, lr: bool = True) -> pd.DataFrame:
    """Steps to target per seed (rows) and method (columns, in the measurement's order; headed by the method's
    learning rate when ``lr``): "vanilla lr, vanilla 3× lr, vanilla 10× lr, EffOPD lr"."""
    t = summary.pivot(index="seed", columns="method", values="steps_to_target")
    t = t[[m for m in METHODS if m in t.columns]]
    if lr:
        rate = summary.groupby("method")["lr"].first()
        t.columns = [f"{m} (lr {rate[m]:g})" for m in t.columns]
    return t


def steps_text(summary: pd.DataFrame) -> str:
    """`steps_table` as the log prints it: "never" where a run did not reach the target, "not run" where the method
    did not run for the seed (the gate closed)."""
    never = steps_table(summary.assign(steps_to_target=summary["steps_to_target"].fillna(-1.0)))
    return never.map(lambda v: "not run" if v != v else "never" if v == -1.0 else f"{v:g}").to_string()


def summarize(curves: pd.DataFrame, runs: pd.DataFrame, target_fraction: float = 0.95) -> pd.DataFrame:
    """effopd_summary rows: steps to target = first step with held-out accuracy ≥ fraction × vanilla's final."""
    rows = []
    for (seed, method), c in curves.groupby(["seed", "method"], sort=False):
        v = curves[(curves["seed"] == seed) & (curves["method"] == "vanilla")]
        target = target_fraction * float(v.sort_values("step")["accuracy"].iloc[-1]) if len(v) else float("nan")
        r = runs[(runs["seed"] == seed) & (runs["method"] == method)].iloc[0]
        rows.append({"seed": seed, "method": method, "lr": float(r.get("lr", np.nan)),
                     "steps_to_target": steps_to_target(c, target), "final_accuracy": float(r["final_accuracy"]),
                     "wall_s": float(r["wall_s"]),
                     "validation_s": float(r["validation_s"]), "tie_accepts": int(r.get("tie_accepts", 0))})
    return pd.DataFrame(rows, columns=TABLES["effopd_summary"].names)


def speedups(summary: pd.DataFrame, methods: Sequence[str] = METHODS) -> dict:
    """Median over seeds of the baseline's steps to target divided by the method's, and per-seed values, for every
    comparison among ``methods`` (keys as `comparisons`), for effopd.json (the rule: opd_dynamics.effopd.summary,
    which the HTML report uses too)."""
    out: dict = {}
    for key, m, b in comparisons(methods):
        ratio = per_seed_speedups(summary, m, b)
        median = ratio.median()  # over the seeds with a ratio
        out[key] = {"per_seed": {int(k): float(x) for k, x in ratio.items()},
                  "median": None if pd.isna(median) else float(median),
                  "seeds_with_a_ratio": int(ratio.notna().sum())}  # gated-out seeds and missed targets have none
    return out


def plot(curves: pd.DataFrame, summary: pd.DataFrame, path: Path, target_fraction: float) -> None:
    """The project's EffOPD figure (accuracy vs steps and vs wall-clock), as a PNG."""
    from opd_dynamics.plotting import plot_effopd_curves

    fig = plot_effopd_curves({"effopd_curves": curves, "effopd_summary": summary}, target_fraction=target_fraction)
    fig.savefig(path, dpi=130, bbox_inches="tight")

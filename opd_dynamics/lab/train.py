"""Lab training: SFT (plain torch loop) for the student init and the teacher; OPD and GRPO with TRL.

The student init is SFT on all problems stopped early (weak but reachable); the teacher has the same
architecture and continues SFT from it (the stand-in for the paper's RL-tuned teacher of the same base).
OPD is TRL's ``DistillationTrainer`` with ``beta=1.0`` (per-token reverse KL(student || teacher)
over the full vocabulary) at ``temperature=1.0`` on completions the student samples itself
(the trainer always generates on-policy). GRPO is TRL's ``GRPOTrainer`` with the exact-match
reward and no reference-model KL (``beta=0.0``); it logs every step, and the share of its sample groups with
non-zero reward variance goes to ``grpo_groups.csv``. Both start from the same student directory,
read the same train prompts, run the same number of optimizer steps with the same number of
sampled completions per step (learning rates per method, see presets), and save weights-only float32 checkpoints
(``checkpoint-N/model.safetensors`` + ``config.json``).
"""

from __future__ import annotations

import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from opd_dynamics.errors import InputError
from opd_dynamics.lab.evaluate import evaluate_model
from opd_dynamics.lab.layout import LabDir
from opd_dynamics.lab.models import load_model, make_model
from opd_dynamics.lab.presets import STOP_RULES, LabPreset, get_preset
from opd_dynamics.lab.task import Problem, TaskSplits, build_tokenizer, exact_match_reward, make_splits
from opd_dynamics.schema import TABLES


def _no_checkpointing() -> dict:
    """TRL turns activation checkpointing on by default; the lab's tiny models do not need it. transformers
    5.x renamed the option (the old name still works, with a FutureWarning per trainer)."""
    from transformers import TrainingArguments

    new = "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    return {"activation_checkpointing" if new else "gradient_checkpointing": False}


_NO_CHECKPOINTING = _no_checkpointing()
# TRL asks the model `is_gradient_checkpointing`, which transformers 5.x deprecates with a warning per
# trainer step that logs; it is TRL's to change, not the lab's, so the lab does not repeat it.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) and ask torch for deterministic kernels, so that a lab run on one
    machine is a function of its preset and seed (issue 27; tests/test_lab.py runs the smoke lab twice).

    The rest of a run's determinism is fixed where it is used: torch's thread count by the preset (`_ensure_threads`:
    a float sum's order, hence its last bits, follows the thread count), every sampler by its own seeded generator
    (SFT batches, evaluation, pass@k) or by TRL's ``seed``/``data_seed`` (data order, on-policy sampling), dropout off
    (the lab's models have none; TRL's ``disable_dropout``). No result depends on python's hash seed or the clock.
    Across CPUs (an AVX2 against an AVX-512 host: lab.json's ``cpu``) or torch builds the last bits may differ."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # CPU kernels are deterministic already; on CUDA, cuBLAS needs a fixed workspace (read when its handle is made,
    # hence set before the first GPU matmul) and cuDNN must not pick kernels by timing. warn_only: an op without a
    # deterministic CUDA kernel warns rather than stopping a long run.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def device() -> torch.device:
    """cuda when available, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def split_seed(student_dir, default: int) -> int:
    """The seed of the split a lab student was trained on: its lab's (see `LabDir.split_seed`), else `default`.
    RL from that student must use the same split, whatever its own run seed, or held-out problems would be
    trained on."""
    return LabDir.of_student(student_dir).split_seed(default)


def splits_for(preset: str | LabPreset, seed: int) -> TaskSplits:
    """The train/held-out problems a preset and seed define (identical for every caller)."""
    p = get_preset(preset)
    return make_splits(p.digits, p.n_train, p.n_heldout, seed)


def _encode(tokenizer, problems: Sequence[Problem]) -> tuple[torch.Tensor, int]:
    ids = tokenizer([p.prompt + p.answer for p in problems])["input_ids"]
    plen = len(tokenizer(problems[0].prompt)["input_ids"])
    lens = {len(r) for r in ids}
    if len(lens) != 1:
        raise InputError(None, "SFT needs fixed-width problems (all prompt+answer token lengths equal)")
    return torch.tensor([r + [tokenizer.eos_token_id] for r in ids]), plen


def _held_out_accuracy(model, tokenizer, heldout: Sequence[Problem], kind: str) -> float:
    if kind == "sampled":
        return evaluate_model(model, tokenizer, heldout, greedy=False, sampled=True, seed=0)["accuracy_sampled"]
    return evaluate_model(model, tokenizer, heldout)["accuracy"]


def train_sft(model, tokenizer, train: Sequence[Problem], heldout: Sequence[Problem], *, steps: int, lr: float,
              batch: int, seed: int, target: float, eval_every: int, stop_on: str = "greedy",
              warmup_frac: float = 0.05, log: Callable[[str], None] = print) -> dict:
    """Supervised fine-tuning on answer tokens (+eos), stopping early once held-out accuracy >= target.

    ``stop_on``: the accuracy checked, "greedy" or "sampled" (one sample per prompt at T = 1, generator seed 0,
    so the check is reproducible). Cosine schedule with warmup over ``steps``; returns {'steps', 'accuracy'} at stop.
    """
    if stop_on not in STOP_RULES:
        raise InputError(None, f"stop_on must be one of {STOP_RULES}, not {stop_on!r}")
    dev = device()
    model.to(dev).train()
    x_all, plen = _encode(tokenizer, train)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, int(warmup_frac * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    acc = 0.0
    step = 0
    t0 = time.time()
    for step in range(1, steps + 1):
        b = x_all[torch.randint(0, len(x_all), (batch,), generator=g)].to(dev)
        logits = model(input_ids=b, use_cache=False).logits[:, plen - 1 : -1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), b[:, plen:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            acc = _held_out_accuracy(model, tokenizer, heldout, stop_on)
            model.train()
            if step % (eval_every * 8) == 0 or acc >= target:
                log(f"  sft step {step}: loss {loss.item():.4f} held-out {stop_on} accuracy {acc:.3f} "
                    f"({time.time() - t0:.0f}s)")
            if acc >= target:
                break
    model.eval()
    return {"steps": step, "accuracy": acc}


def save_model_dir(model, tokenizer, out: Path) -> Path:
    """save_pretrained in float32 safetensors, plus the tokenizer."""
    out = Path(out)
    model.to("cpu").save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _common_args(p: LabPreset, out_dir: Path, seed: int, max_steps: int, save_steps: int, lr: float) -> dict:
    return dict(
        output_dir=str(out_dir),
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_only_model=True,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_completion_length=p.digits + 2,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        bf16=False,
        fp16=False,
        **_NO_CHECKPOINTING,
        gradient_accumulation_steps=1,
        disable_dropout=True,
        logging_steps=max(1, save_steps),
        report_to="none",
        seed=seed,
        data_seed=seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def _check_out(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise InputError(out_dir, "already exists and is not empty; pass overwrite=True to replace it",
                             ("overwrite",))
        shutil.rmtree(out_dir)


def _prompt_dataset(problems: Sequence[Problem]):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [p.prompt for p in problems], "answer": [p.answer for p in problems]})


def _rl_prompts(p: LabPreset, student_dir, seed: int, data_seed: int | None):
    """Both RL trainers' prompts: the train split the student was made from (see `split_seed`) unless
    `data_seed` names another."""
    return _prompt_dataset(splits_for(p, split_seed(student_dir, seed) if data_seed is None else data_seed).train)


def _rl_setup(preset, seed: int, max_steps: int | None, save_steps: int | None):
    """What both RL trainers start from: the preset, seeds and threads set, step budget, tokenizer."""
    p = get_preset(preset)
    seed_everything(seed)
    _ensure_threads(p)
    return p, max_steps or p.rl_steps, save_steps or p.save_steps, build_tokenizer()


def build_opd_trainer(student_dir, teacher_dir, out_dir, preset: str | LabPreset = "smoke", seed: int = 0,
                      callbacks: Iterable = (), max_steps: int | None = None, save_steps: int | None = None,
                      data_seed: int | None = None, lr: float | None = None):
    """The lab's OPD trainer (TRL DistillationTrainer, on-policy reverse KL), ready to ``.train()``.

    Its prompts are the train split of ``data_seed`` (default: the student's, see `split_seed`): a run seed
    that differs from the seed the student was trained with must not change the split. ``lr`` overrides the
    preset's ``opd_lr`` (the sweep).
    """
    from trl import DistillationConfig, DistillationTrainer

    p, max_steps, save_steps, tok = _rl_setup(preset, seed, max_steps, save_steps)
    student = load_model(student_dir)
    teacher = load_model(teacher_dir)
    args = DistillationConfig(
        **_common_args(p, Path(out_dir), seed, max_steps, save_steps, lr or p.opd_lr),
        per_device_train_batch_size=p.rollouts_per_step,
        beta=1.0,  # generalized JSD with beta=1 is the reverse KL(student || teacher)
    )
    return DistillationTrainer(
        model=student, teacher_model=teacher, args=args,
        train_dataset=_rl_prompts(p, student_dir, seed, data_seed), processing_class=tok,
        callbacks=list(callbacks),
    )


def train_opd(student_dir, teacher_dir, out_dir, preset: str | LabPreset = "smoke", seed: int = 0,
              callbacks: Iterable = (), max_steps: int | None = None, save_steps: int | None = None,
              *, overwrite: bool = False, data_seed: int | None = None, lr: float | None = None) -> Path:
    """On-policy distillation of ``student_dir`` towards ``teacher_dir`` with TRL's DistillationTrainer.

    Writes ``out_dir/checkpoint-N`` every ``save_steps`` (default: the preset's) up to ``max_steps``
    (default: the preset's ``rl_steps``). Extra ``transformers.TrainerCallback``s are passed to the
    trainer (e.g. EffOPD's extrapolation callback). Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    _check_out(out_dir, overwrite)
    trainer = build_opd_trainer(student_dir, teacher_dir, out_dir, preset, seed, callbacks, max_steps, save_steps,
                                data_seed, lr)
    trainer.train()
    return out_dir


#: TRL's GRPOTrainer metric (trl/trainer/grpo_trainer.py, TRL 1.16): the share of completions whose group of
#: `num_generations` samples has zero reward std. Groups are equal-sized, so it is also the share of groups.
ZERO_STD_KEY = "frac_reward_zero_std"


def group_stats_callback():
    """A TrainerCallback that keeps, per logged step, the share of GRPO groups with non-zero reward variance
    (1 − TRL's `frac_reward_zero_std`) and the mean reward; `rows` holds them. GRPO logs every step in the
    lab (logging_steps=1), so each row is one optimizer step's generation batch."""
    from transformers import TrainerCallback

    class GroupStats(TrainerCallback):
        def __init__(self) -> None:
            self.rows: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and logs.get(ZERO_STD_KEY) is not None:
                self.rows.append({"step": state.global_step, "nonzero_var_groups": 1.0 - float(logs[ZERO_STD_KEY]),
                                  "reward": float(logs.get("reward", float("nan")))})

    return GroupStats()


def _quiet_progress(every: int):
    """TRL's progress bar, printing the logged metrics only every ``every`` steps (GRPO logs every step so that
    its group statistics are per step; printing each would flood the log). A ProgressCallback subclass, so
    ``remove_callback(ProgressCallback)`` still removes it."""
    from transformers.trainer_callback import ProgressCallback

    class QuietProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.global_step % every == 0 or state.global_step >= state.max_steps:
                super().on_log(args, state, control, logs=logs, **kwargs)

    return QuietProgress()


def build_grpo_trainer(student_dir, out_dir, preset: str | LabPreset = "smoke", seed: int = 0,
                       callbacks: Iterable = (), max_steps: int | None = None, save_steps: int | None = None,
                       data_seed: int | None = None, lr: float | None = None):
    """The lab's RL trainer (TRL GRPOTrainer, exact-match reward, no KL penalty), ready to ``.train()``;
    prompts as in `build_opd_trainer`. It logs every step (see `group_stats_callback`); ``lr`` overrides the
    preset's ``grpo_lr`` (the sweep)."""
    from transformers.trainer_callback import ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    p, max_steps, save_steps, tok = _rl_setup(preset, seed, max_steps, save_steps)
    student = load_model(student_dir)
    args = GRPOConfig(
        **{**_common_args(p, Path(out_dir), seed, max_steps, save_steps, lr or p.grpo_lr), "logging_steps": 1},
        per_device_train_batch_size=p.rollouts_per_step,
        num_generations=p.grpo_generations,
        beta=0.0,
    )
    trainer = GRPOTrainer(
        model=student, reward_funcs=[exact_match_reward], args=args,
        train_dataset=_rl_prompts(p, student_dir, seed, data_seed), processing_class=tok,
        callbacks=list(callbacks),
    )
    if any(type(cb) is ProgressCallback for cb in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_quiet_progress(save_steps))
    return trainer


def train_grpo(student_dir, out_dir, preset: str | LabPreset = "smoke", seed: int = 0, callbacks: Iterable = (),
               max_steps: int | None = None, save_steps: int | None = None, *, overwrite: bool = False,
               data_seed: int | None = None, lr: float | None = None) -> Path:
    """GRPO of ``student_dir`` with the exact-match reward (TRL GRPOTrainer); checkpoints as in train_opd, and
    ``out_dir/grpo_groups.csv``: per step, the share of groups with non-zero reward variance and the mean
    reward (from TRL's logged metrics)."""
    import pandas as pd

    out_dir = Path(out_dir)
    _check_out(out_dir, overwrite)
    stats = group_stats_callback()
    trainer = build_grpo_trainer(student_dir, out_dir, preset, seed, [*callbacks, stats], max_steps, save_steps,
                                 data_seed, lr)
    trainer.train()
    groups = TABLES["grpo_groups"]
    pd.DataFrame(stats.rows, columns=groups.names).to_csv(out_dir / groups.file, index=False)
    return out_dir


def evaluate_run(run: str, run_dir, student_init_dir, teacher, tokenizer, heldout: Sequence[Problem], *,
                 seed: int = 0, log: Callable[[str], None] = print):
    """Evaluate step 0 (student_init) and every checkpoint of a run → tidy DataFrame (eval.csv schema)."""
    import pandas as pd

    from opd_dynamics.io.series import CheckpointSeries

    rows = []
    steps = CheckpointSeries.discover(run_dir, base=student_init_dir).steps
    for step, path in [(0, Path(student_init_dir)), *steps]:
        model = load_model(path, device())
        r = evaluate_model(model, tokenizer, heldout, teacher=teacher, greedy=True, sampled=True, seed=seed)
        rows.append({"run": run, "step": step, **r})
        log(f"  {run} step {step}: accuracy {r['accuracy']:.3f} sampled {r['accuracy_sampled']:.3f} "
            f"reverse KL {r['reverse_kl']:.4f}")
        del model
    return pd.DataFrame(rows, columns=TABLES["eval"].names)


def _ensure_threads(p: LabPreset) -> None:
    """The preset's torch thread count (part of a run's determinism: see `seed_everything`)."""
    torch.set_num_threads(p.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _stop_at_callback(tokenizer, held: Sequence[Problem], target: float, every: int, log: Callable[[str], None]):
    """A TrainerCallback that evaluates held-out greedy accuracy every ``every`` steps and stops training once it
    reaches ``target`` (the RL teacher's counterpart of `train_sft`'s early stop); ``result`` holds the last."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def __init__(self) -> None:
            self.result = {"steps": 0, "accuracy": float("nan")}

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0 or state.global_step >= state.max_steps:
                acc = evaluate_model(model, tokenizer, held)["accuracy"]
                self.result = {"steps": state.global_step, "accuracy": acc}
                if acc >= target or state.global_step % (every * 8) == 0:
                    log(f"  grpo teacher step {state.global_step}: held-out accuracy {acc:.3f}")
                if acc >= target:
                    control.should_training_stop = True
            return control

    return StopAt()


def _teacher_by_grpo(out: Path, p: LabPreset, seed: int, held: Sequence[Problem], log: Callable[[str], None]) -> dict:
    """GRPO from student_init (the preset's GRPO batch, ``teacher_grpo_lr``) until held-out greedy accuracy
    reaches ``teacher_target`` or ``teacher_grpo_max_steps``; the model is saved as the teacher."""
    from transformers.trainer_callback import ProgressCallback

    tok = build_tokenizer()
    lab = LabDir(out)
    work = lab.root / ".teacher-grpo"
    stop = _stop_at_callback(tok, held, p.teacher_target, p.sft_eval_every, log)
    trainer = build_grpo_trainer(lab.student_init, work, p, seed, [stop], max_steps=p.teacher_grpo_max_steps,
                                 save_steps=p.teacher_grpo_max_steps + 1, data_seed=seed, lr=p.teacher_grpo_lr)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    save_model_dir(trainer.model, tok, lab.teacher)
    shutil.rmtree(work, ignore_errors=True)
    return dict(stop.result)


def train_teacher_and_student(out: Path, p: LabPreset, seed: int, log: Callable[[str], None] = print) -> dict:
    """Train the weak student init, then the teacher *from it*; save both under ``out``.

    Student init: SFT on all training problems, stopped early once held-out accuracy (``student_stop``: greedy
    or sampled) reaches ``student_target`` (it has learnt the format and some carrying, so RL's samples hold
    rewards). Teacher: the same architecture, trained from ``student_init`` until ``teacher_target``: by SFT
    (``teacher_method="sft"``, the default: the stand-in for the paper's teacher, the RL-tuned version of the
    student's own base, "pattern-aligned") or by GRPO (``"grpo"``, as in the paper).
    """
    if p.teacher_method not in ("sft", "grpo"):
        raise InputError(None, f"teacher_method must be 'sft' or 'grpo', got {p.teacher_method!r}")
    _ensure_threads(p)
    tok = build_tokenizer()
    sp = splits_for(p, seed)
    held = sp.heldout[: p.n_eval]
    info: dict = {}
    seed_everything(seed)
    t0 = time.time()
    log(f"[lab] student SFT on all problems, stopped at held-out {p.student_stop} accuracy {p.student_target} "
        f"({p.student})")
    student = make_model(p.student, tok, seed + 1)
    info["student_sft"] = train_sft(student, tok, sp.train, held, steps=p.student_max_steps, lr=p.student_lr,
                                    batch=p.sft_batch, seed=seed + 1, target=p.student_target,
                                    eval_every=p.sft_eval_every, stop_on=p.student_stop, log=log)
    info["student_sft"]["stop_accuracy"] = info["student_sft"].pop("accuracy")
    save_model_dir(student, tok, LabDir(out).student_init)
    info["student_sft"]["seconds"] = time.time() - t0
    t0 = time.time()
    log(f"[lab] teacher: {p.teacher_method.upper()} from student_init to held-out accuracy {p.teacher_target}")
    if p.teacher_method == "grpo":
        info["teacher_sft"] = _teacher_by_grpo(out, p, seed, held, log)
    else:
        teacher = load_model(LabDir(out).student_init)
        info["teacher_sft"] = train_sft(teacher, tok, sp.train, held, steps=p.teacher_max_steps, lr=p.teacher_lr,
                                        batch=p.sft_batch, seed=seed + 2, target=p.teacher_target,
                                        eval_every=p.sft_eval_every, log=log)
        save_model_dir(teacher, tok, LabDir(out).teacher)
    info["teacher_sft"]["stop_accuracy"] = info["teacher_sft"].pop("accuracy")
    info["teacher_sft"]["method"] = f"{p.teacher_method}_from_student_init"
    info["teacher_sft"]["seconds"] = time.time() - t0
    return info

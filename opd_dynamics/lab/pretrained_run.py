"""The lab on a real pretrained base (`lab run --preset smollm2`): staged, resumable, each stage's wall time logged.

::

    OUT/student_init/        the base (converted from its GGUF, `opd_dynamics.lab.pretrained`): the student init
    OUT/teacher/             the base GRPO-tuned on the task (the paper's teacher: the RL-tuned version of its base)
    OUT/.teacher-grpo/       the teacher's GRPO work: resumable checkpoints (weights, optimizer, RNG), kept ≤ 2
    OUT/teacher_progress.csv per evaluated step: validation and held-out greedy accuracy, mean reward, distance
    OUT/teacher_movement.csv per step: ‖W_t − W_{t−1}‖/‖W_{t−1}‖ and ‖W_t − B‖/‖B‖ over attention and MLP matrices
    OUT/stages/NAME.json     a finished stage's results (a stage that has one is not run again)
    OUT/timings.csv          wall time of each stage run: finished, stopped (Ctrl-C or kill) or failed; a resumed
                             stage has a row per run
    OUT/summary.json         what the finished stages say, keyed like lab.json (preset, seed, student_init, teacher)

Stages, in order: ``base`` (fetch, verify and convert the base; copy it to student_init/), ``base_eval`` (held-out,
validation and transfer accuracy, pass@k), ``teacher`` (GRPO from the base until validation accuracy ≥ the base's
+ ``teacher_gain``, or ``teacher_max_steps``; a rerun resumes from the last checkpoint), ``teacher_eval`` (the
teacher's accuracies, ‖T − B‖/‖B‖, the base's reverse KL to the teacher). The series from the base, OPD and GRPO
(``opd``, ``grpo``; issue 29) and OPD at 3× and 10× its rate (``opd_3x``, ``opd_10x``: the rate controls a jump
ahead must beat), keep their optimizer state in their newest checkpoint while they train, so a stopped
series resumes from it (`resume_point`); a finished one keeps weights only.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from opd_dynamics.effopd.options import ANCHOR_FILE
from opd_dynamics.errors import InputError
from opd_dynamics.lab.presets import EFFOPD_METHODS, PretrainedPreset, get_pretrained_preset

#: OPD from the base at these multiples of ``opd_lr``: the rate controls a jump ahead must beat (issue 27), the
#: EffOPD measurement's ("vanilla-3x", "vanilla-10x")
RATE_MULTIPLES = tuple(int(x) for m, x in EFFOPD_METHODS.items() if m.startswith("vanilla-"))
#: the series from the base: OPD and GRPO at their rates (the tiny lab's `layout.RUNS`), the rate controls, and OPD
#: at ``opd_lr`` with EffOPD's jumps ahead (the authors' settings: `EffOPDOptions`, sampled validation accuracy)
RL_RUNS = ("opd", "grpo", *(f"opd_{m}x" for m in RATE_MULTIPLES), "effopd")
STAGES = ("base", "base_eval", "teacher", "teacher_eval", *RL_RUNS)
#: the checkpoint steps of an OPD or GRPO series: powers of two up to 64, then every 8th, and the last
EARLY_SAVES = (1, 2, 4, 8, 16, 32, 64)
#: the kind of output a pretrained lab directory is (`io.writer.mark_output`)
KIND = "lab"
PROGRESS = "teacher_progress.csv"
MOVEMENT = "teacher_movement.csv"
EVAL_FIELDS = ("run", "step", "accuracy", "accuracy_sampled", "reverse_kl", "transfer_accuracy")
PROGRESS_FIELDS = ("step", "val_accuracy", "heldout_accuracy", "reward_mean", "rel_distance_attn_mlp", "elapsed_s")
MOVEMENT_FIELDS = ("step", "rel_step_attn_mlp", "rel_distance_attn_mlp", "rel_distance_all")


@dataclass(frozen=True)
class PretrainedLabDir:
    """Paths of a pretrained lab directory (see the module docstring)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def student_init(self) -> Path:
        return self.root / "student_init"

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def teacher_work(self) -> Path:
        return self.root / ".teacher-grpo"

    def stage(self, name: str) -> Path:
        return self.root / "stages" / f"{name}.json"

    def done(self, name: str) -> dict | None:
        p = self.stage(name)
        return json.loads(p.read_text()) if p.is_file() else None

    def finish(self, name: str, result: dict) -> dict:
        p = self.stage(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".json.part")
        tmp.write_text(json.dumps(result, indent=2, sort_keys=True, default=_plain) + "\n")
        tmp.replace(p)
        return result


def _plain(x):
    try:
        return x.item()
    except AttributeError:
        return str(x)


def _append_csv(path: Path, fields: Sequence[str], row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in fields})


def _truncate_csv(path: Path, max_step: int) -> None:
    """Drop the rows after ``max_step`` (a resumed run repeats the steps after its last checkpoint)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
        fields = rows[0].keys() if rows else None
    if fields is None:
        return
    keep = [r for r in rows if int(r["step"]) <= max_step]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        w.writeheader()
        w.writerows(keep)


def _threads(p: PretrainedPreset) -> None:
    import torch

    torch.set_num_threads(p.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _device():
    from opd_dynamics.lab.train import device

    return device()


def load_base(path, device=None):
    """(model, tokenizer) of a pretrained lab model directory: float32, eval mode, left padding (TRL's on-policy
    trainers need it), the few-shot stop tokens set as the generation's end tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_dynamics.lab.fewshot import stop_ids

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.generation_config.eos_token_id = [tok.eos_token_id, *stop_ids(tok)]
    model.generation_config.pad_token_id = tok.pad_token_id
    if device is not None:
        model.to(device)
    return model.eval(), tok


def splits(p: PretrainedPreset, seed: int):
    """(train, val, heldout, transfer) problems: the task's held-out split (``n_heldout``), ``n_val`` validation
    problems taken from the rest (never trained on), the rest train; the transfer task's held-out split."""
    from opd_dynamics.lab.fewshot import make_fewshot_splits

    sp = make_fewshot_splits(p.task, p.n_heldout, seed)
    if p.n_val >= len(sp.train):
        raise InputError(None, f"task {p.task} leaves {len(sp.train)} problems after the held-out split, too few for "
                               f"{p.n_val} validation problems and a train split", ("n_val",))
    transfer = make_fewshot_splits(p.transfer, p.n_heldout, seed).heldout
    return sp.train[p.n_val:], sp.train[: p.n_val], sp.heldout, transfer


def _relative(model, base: dict) -> tuple[float, float]:
    """(‖W − B‖/‖B‖ over attention and MLP matrices, the same over every parameter)."""
    import torch

    num_am = den_am = num = den = 0.0
    with torch.no_grad():
        for name, w in model.named_parameters():
            b = base[name]
            d2, b2 = float((w.detach().float() - b).pow(2).sum()), float(b.pow(2).sum())
            num, den = num + d2, den + b2
            if _attn_mlp(name, w):
                num_am, den_am = num_am + d2, den_am + b2
    return (num_am / den_am) ** 0.5, (num / den) ** 0.5


def _attn_mlp(name: str, w) -> bool:
    return w.ndim == 2 and (".self_attn." in name or ".mlp." in name)


def movement_callback(path: Path, base: dict):
    """A TrainerCallback writing, every optimizer step, the step's relative movement ‖W_t − W_{t−1}‖/‖W_{t−1}‖ and
    the distance from the base ‖W_t − B‖/‖B‖ over the attention and MLP matrices (and the distance over every
    parameter) to ``path``."""
    import torch
    from transformers import TrainerCallback

    class Movement(TrainerCallback):
        def __init__(self) -> None:
            self.prev: dict | None = None

        def _snap(self, model) -> dict:
            return {n: w.detach().float().clone() for n, w in model.named_parameters() if _attn_mlp(n, w)}

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if self.prev is None:
                self.prev = self._snap(model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            num = den = 0.0
            with torch.no_grad():
                for n, w in model.named_parameters():
                    if n in self.prev:
                        num += float((w.detach().float() - self.prev[n]).pow(2).sum())
                        den += float(self.prev[n].pow(2).sum())
                        self.prev[n].copy_(w.detach())
            am, every = _relative(model, base)
            _append_csv(path, MOVEMENT_FIELDS, {"step": state.global_step, "rel_step_attn_mlp": (num / den) ** 0.5,
                                                "rel_distance_attn_mlp": am, "rel_distance_all": every})

    return Movement()


def progress_callback(lab: PretrainedLabDir, tok, val, heldout, target: float, every: int, base: dict,
                      log: Callable[[str], None]):
    """A TrainerCallback evaluating greedy validation accuracy every ``every`` steps (held-out accuracy every
    ``5 * every`` and at the end; a row of teacher_progress.csv) and stopping training once validation accuracy
    ≥ ``target``; ``result`` holds the last."""
    from transformers import TrainerCallback

    from opd_dynamics.lab.evaluate import evaluate_model
    from opd_dynamics.lab.fewshot import stop_ids

    stops = stop_ids(tok)

    class Progress(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = time.time()
            self.rewards: list[float] = []
            self.result: dict = {"steps": 0, "val_accuracy": float("nan"), "reached": False}

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                self.rewards.append(float(logs["reward"]))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            if step % every and step < state.max_steps:
                return control
            v = evaluate_model(model, tok, val, stop_ids=stops)["accuracy"]
            last = v >= target or step >= state.max_steps
            # held-out every fifth evaluation and at the end: it is what teacher_eval reports, not the stop rule
            h = evaluate_model(model, tok, heldout, stop_ids=stops)["accuracy"] \
                if last or step % (5 * every) == 0 else float("nan")
            am, _ = _relative(model, base)
            reward = sum(self.rewards) / len(self.rewards) if self.rewards else float("nan")
            self.rewards = []
            _append_csv(lab.root / PROGRESS, PROGRESS_FIELDS, {
                "step": step, "val_accuracy": v, "heldout_accuracy": h, "reward_mean": reward,
                "rel_distance_attn_mlp": am, "elapsed_s": round(time.time() - self.t0, 1)})
            log(f"[teacher] step {step}: validation {v:.3f} (target {target:.3f}), held-out {h:.3f}, mean reward "
                f"{reward:.3f}, ‖T−B‖/‖B‖ {am:.2e} ({time.time() - self.t0:.0f}s this run)")
            self.result = {"steps": step, "val_accuracy": v, "heldout_accuracy": h, "reached": v >= target}
            if v >= target:
                control.should_training_stop = True
            return control

    return Progress()


def build_teacher_trainer(lab: PretrainedLabDir, p: PretrainedPreset, seed: int, train, callbacks=()):
    """TRL's GRPOTrainer from the base on the task's train prompts: the few-shot reward, no KL penalty, constant
    ``teacher_lr``, resumable checkpoints (weights and optimizer) every ``teacher_save_every`` steps."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from opd_dynamics.lab.fewshot import fewshot_reward
    from opd_dynamics.lab.train import _NO_CHECKPOINTING

    model, tok = load_base(lab.student_init)
    longest = max(len(tok(q.answer)["input_ids"]) for q in train)
    args = GRPOConfig(
        output_dir=str(lab.teacher_work), max_steps=p.teacher_max_steps, save_strategy="steps",
        save_steps=p.teacher_save_every, save_only_model=False, save_total_limit=2,
        learning_rate=p.teacher_lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, max_completion_length=longest + 1, temperature=1.0, top_p=1.0, top_k=0,
        bf16=False, fp16=False, **_NO_CHECKPOINTING, gradient_accumulation_steps=1, disable_dropout=True,
        logging_steps=1, report_to="none", seed=seed, data_seed=seed, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=True,
        per_device_train_batch_size=p.rollouts_per_step, num_generations=p.grpo_generations, beta=0.0,
    )
    data = Dataset.from_dict({"prompt": [q.prompt for q in train], "answer": [q.answer for q in train]})
    return GRPOTrainer(model=model, reward_funcs=[fewshot_reward], args=args, train_dataset=data,
                       processing_class=tok, callbacks=list(callbacks))


def _state_dict(path) -> dict:
    from safetensors.torch import load_file

    sd = load_file(str(Path(path) / "model.safetensors"))
    if "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return {k: v.float() for k, v in sd.items()}


def _copy_model_dir(src: Path, dst: Path) -> None:
    """Copy a model directory (hard links where the file system allows), through a temporary name."""
    tmp = dst.with_name(f".{dst.name}.part")
    shutil.rmtree(tmp, ignore_errors=True)

    def link_or_copy(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, tmp, copy_function=link_or_copy)
    tmp.rename(dst)


def saves_at(step: int, last: int) -> bool:
    """Whether an OPD or GRPO series keeps a checkpoint at ``step`` (`EARLY_SAVES`, every 8th, the last)."""
    return step in EARLY_SAVES or step % 8 == 0 or step == last


#: what a checkpoint holds only to resume training (Trainer's names, and EffOPD's anchor: a second copy of the
#: weights it moves): dropped from all but the newest
RESUME_FILES = ("optimizer.pt", "scheduler.pt", "rng_state*.pth", ANCHOR_FILE)


def _checkpoints(out: Path) -> dict[int, Path]:
    """A series' ``checkpoint-N`` directories by step."""
    from opd_dynamics.lab.layout import numbered

    return numbered(out, "checkpoint")


def resume_point(out: Path) -> tuple[int, Path] | None:
    """The step and newest checkpoint of a series that a stopped run can resume from: one Trainer finished saving
    with its optimizer state (``trainer_state.json`` is written last), or None."""
    full = [(s, d) for s, d in _checkpoints(out).items()
            if (d / "optimizer.pt").is_file() and (d / "trainer_state.json").is_file()]
    return full[-1] if full else None


def _drop_resume_files(ckpt: Path) -> None:
    for pattern in RESUME_FILES:
        for f in ckpt.glob(pattern):
            f.unlink()


def resume_files_callback(out: Path):
    """A TrainerCallback keeping the optimizer state (`RESUME_FILES`) in the newest checkpoint only, and in none
    once training ends: the series' checkpoints are then weights, as the analysis reads them."""
    from transformers import TrainerCallback

    class ResumeFiles(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            newest = out / f"checkpoint-{state.global_step}"
            for d in _checkpoints(out).values():
                if d != newest:
                    _drop_resume_files(d)

        def on_train_end(self, args, state, control, **kwargs):
            for d in _checkpoints(out).values():
                _drop_resume_files(d)

    return ResumeFiles()


def schedule_callback():
    """A TrainerCallback that saves a checkpoint exactly at the `saves_at` steps (save_strategy is "no")."""
    from transformers import TrainerCallback

    class Schedule(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if saves_at(state.global_step, state.max_steps):
                control.should_save = True
            return control

    return Schedule()


#: RUN/step_eval.csv: held-out greedy accuracy at every early step (a series made before it held validation accuracy)
STEP_EVAL_FIELDS = ("step", "heldout_accuracy")


def early_eval_callback(path: Path, tok, heldout, until: int, batch_size: int = 64):
    """A TrainerCallback writing held-out greedy accuracy at every step up to ``until`` (``RUN/step_eval.csv``):
    the early steps, between the checkpoints that `saves_at` keeps, where steps to a target are read (the held-out
    set, not the validation set EffOPD chooses its jumps on)."""
    from transformers import TrainerCallback

    from opd_dynamics.lab.evaluate import evaluate_model
    from opd_dynamics.lab.fewshot import stop_ids

    stops = stop_ids(tok)

    class EarlyEval(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step <= until:
                acc = evaluate_model(model, tok, heldout, stop_ids=stops, batch_size=batch_size)["accuracy"]
                _append_csv(path, STEP_EVAL_FIELDS, {"step": state.global_step, "heldout_accuracy": acc})
            return control

    return EarlyEval()


def _rl_args(p: PretrainedPreset, out_dir: Path, seed: int, steps: int, lr: float, completion_tokens: int) -> dict:
    """The arguments OPD and GRPO share: checkpoints at the `saves_at` steps (with the optimizer state, which
    `resume_files_callback` keeps in the newest only), constant rate, float32, ``rollouts_per_step`` completions
    per step, logging every step."""
    import torch

    from opd_dynamics.lab.train import _NO_CHECKPOINTING

    return dict(
        output_dir=str(out_dir), max_steps=steps, save_strategy="no", save_only_model=False, learning_rate=lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_completion_length=completion_tokens, temperature=1.0, top_p=1.0, top_k=0, bf16=False, fp16=False,
        **_NO_CHECKPOINTING, gradient_accumulation_steps=1, disable_dropout=True, logging_steps=1, report_to="none",
        seed=seed, data_seed=seed, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        disable_tqdm=True, per_device_train_batch_size=p.rollouts_per_step,
    )


def run_lr(p: PretrainedPreset, run: str) -> float:
    """The rate of the series ``run`` (`RL_RUNS`): ``grpo_lr`` for GRPO, else ``opd_lr``, times M for "opd_Mx"."""
    kind, _, times = run.partition("_")
    return (p.grpo_lr if kind == "grpo" else p.opd_lr) * (int(times.removesuffix("x")) if times else 1)


def build_rl_trainer(run: str, lab: PretrainedLabDir, p: PretrainedPreset, seed: int, train, callbacks=(),
                     steps: int | None = None, lr: float | None = None):
    """The series ``run`` (`RL_RUNS`) from the base, into ``lab.root / run``: OPD, its rate controls and EffOPD (TRL
    DistillationTrainer, per-token reverse KL to the teacher on the student's own samples, ``rollouts_per_step``
    prompts × 1; EffOPD's callback among ``callbacks``) or "grpo"
    (TRL GRPOTrainer, the few-shot reward, no KL penalty, ``rollouts_per_step / grpo_generations`` prompts ×
    ``grpo_generations``); same prompts, steps and completions per step; at `run_lr` unless ``lr``."""
    from datasets import Dataset

    from opd_dynamics.lab.fewshot import fewshot_reward

    model, tok = load_base(lab.student_init)
    longest = max(len(tok(q.answer)["input_ids"]) for q in train)
    steps = steps or p.rl_steps
    data = Dataset.from_dict({"prompt": [q.prompt for q in train], "answer": [q.answer for q in train]})
    if run not in RL_RUNS:
        raise InputError(None, f"unknown run {run!r}; choose one of {', '.join(RL_RUNS)}")
    callbacks = [schedule_callback(), resume_files_callback(lab.root / run), *callbacks]
    lr = lr or run_lr(p, run)
    if run != "grpo":
        from trl import DistillationConfig, DistillationTrainer

        teacher, _ = load_base(lab.teacher)
        args = DistillationConfig(**_rl_args(p, lab.root / run, seed, steps, lr, longest + 1), beta=1.0)
        return DistillationTrainer(model=model, teacher_model=teacher, args=args, train_dataset=data,
                                   processing_class=tok, callbacks=callbacks)
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(**_rl_args(p, lab.root / run, seed, steps, lr, longest + 1),
                      num_generations=p.grpo_generations, beta=0.0)
    return GRPOTrainer(model=model, reward_funcs=[fewshot_reward], args=args, train_dataset=data,
                       processing_class=tok, callbacks=callbacks)


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """While the lab runs, SIGTERM (``kill PID``) exits through Python (SystemExit), so that the stage's wall time
    is still written to timings.csv (as "stopped") and its lock released; only in the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _ours(root: Path) -> bool:
    """Whether ``root`` carries the marker of a lab output this toolkit wrote (`io.writer.mark_output`)."""
    from opd_dynamics.io.writer import output_marker

    mark = output_marker(root)
    return mark is not None and mark.get("kind") == KIND


@contextlib.contextmanager
def _run_lock(root: Path) -> Iterator[None]:
    """Hold ``root/.lock`` (an exclusive flock) while this process runs the lab: two runs of one directory would
    train the same teacher twice and interleave its files; the second is refused in one sentence."""
    import fcntl

    f = open(root / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise InputError(root, f"is being run by another process right now (pid {holder}); wait for it, or stop it "
                               "and run again to resume") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()


class PretrainedLab:
    """One seed's pretrained lab run (see the module docstring); `run` runs the stages not yet finished."""

    def __init__(self, out, preset: str | PretrainedPreset = "smollm2", seed: int = 0, *, wheel=None, cache=None,
                 source=None, log: Callable[[str], None] | None = None) -> None:
        """``wheel``: an already-downloaded wheel of the base; ``cache``: the base's cache directory (default
        `pretrained.cache_root`); ``source``: a `PretrainedSource` in place of the preset's (tests)."""
        self.p = get_pretrained_preset(preset)
        self.source = source
        self.seed = seed
        self.lab = PretrainedLabDir(Path(out).resolve())
        self.wheel, self.cache = wheel, cache
        self.log = log or (lambda m: print(m, flush=True))

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def _timed(self, name: str, fn: Callable[[], dict]) -> dict:
        t0, started = time.time(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.log(f"[{self.p.name}] stage {name} ({self.lab.root})")
        status = "failed"
        try:
            result = fn()
            status = "finished"
            return result
        except (KeyboardInterrupt, SystemExit):
            status = "stopped"  # Ctrl-C, or kill (SIGTERM, see `_stop_on_sigterm`): a rerun resumes
            raise
        finally:
            _append_csv(self.lab.root / "timings.csv", ("stage", "seconds", "status", "started", "host", "pid"),
                        {"stage": name, "seconds": round(time.time() - t0, 1), "status": status, "started": started,
                         "host": socket.gethostname(), "pid": os.getpid()})

    def _check_preset(self) -> None:
        """A resumed directory must have been started with the same preset and seed."""
        p = self.lab.root / "preset.json"
        want = {"preset": self.p.to_dict(), "seed": self.seed}
        if p.is_file():
            had = json.loads(p.read_text())
            now = json.loads(json.dumps(want))
            # fields added to the preset since the run started are taken as they are now; any other difference
            # means another run
            same = had["seed"] == now["seed"] and all(had["preset"][k] == now["preset"].get(k, had["preset"][k])
                                                      for k in had["preset"])
            if not same:
                raise InputError(self.lab.root, f"was started with preset {had['preset']['name']} and seed "
                                                f"{had['seed']} (or other settings), not {self.p.name} and seed "
                                                f"{self.seed}; resume it with those or choose another --out")
        else:
            p.write_text(json.dumps(want, indent=2) + "\n")

    # -- stages --------------------------------------------------------------------------------------------
    def stage_base(self) -> dict:
        from opd_dynamics.lab.pretrained import SOURCES, pretrained_base

        source = self.source or SOURCES[self.p.base]
        src = pretrained_base(source, cache=self.cache, wheel=self.wheel, log=self.log)
        if not (self.lab.student_init / "model.safetensors").is_file():
            _copy_model_dir(src, self.lab.student_init)
        info = json.loads((src / "source.json").read_text())
        return {"source": source.to_dict(), "cache": str(src), "n_params": info.get("n_params")}

    def stage_base_eval(self) -> dict:
        return self._evaluate(self.lab.student_init)

    def _evaluate(self, model_dir: Path) -> dict:
        """Held-out greedy and sampled accuracy, validation and transfer accuracy, pass@k of a model directory."""
        from opd_dynamics.lab.evaluate import evaluate_model, pass_at_k
        from opd_dynamics.lab.fewshot import stop_ids

        _threads(self.p)
        model, tok = load_base(model_dir, _device())
        stops = stop_ids(tok)
        _, val, held, transfer = splits(self.p, self.seed)
        kw = dict(stop_ids=stops, batch_size=self.p.eval_batch)
        out: dict = {}
        t0 = time.time()
        r = evaluate_model(model, tok, held, sampled=True, seed=self.seed, **kw)
        out.update(accuracy=r["accuracy"], accuracy_sampled=r["accuracy_sampled"], n_heldout=len(held))
        out["val_accuracy"] = evaluate_model(model, tok, val, **kw)["accuracy"]
        out["transfer_accuracy"] = evaluate_model(model, tok, transfer, **kw)["accuracy"]
        few = held[: self.p.n_pass]  # k samples per prompt: the costliest measurement here
        out[f"pass_at_{self.p.pass_k}"] = pass_at_k(model, tok, few, self.p.pass_k, seed=self.seed, **kw)
        out["n_pass"] = len(few)
        out["eval_seconds"] = round(time.time() - t0, 1)
        self.log(f"[{self.p.name}] {model_dir.name}: held-out {out['accuracy']:.3f} (sampled "
                 f"{out['accuracy_sampled']:.3f}, pass@{self.p.pass_k} {out[f'pass_at_{self.p.pass_k}']:.3f}), "
                 f"validation {out['val_accuracy']:.3f}, transfer ({self.p.transfer}) {out['transfer_accuracy']:.3f}")
        return out

    def stage_teacher(self) -> dict:
        from transformers.trainer_utils import get_last_checkpoint

        _threads(self.p)
        base_eval = self.lab.done("base_eval")
        target = min(1.0, base_eval["val_accuracy"] + self.p.teacher_gain + self.p.teacher_margin)
        train, val, held, _ = splits(self.p, self.seed)
        work = self.lab.teacher_work
        work.mkdir(parents=True, exist_ok=True)
        last = get_last_checkpoint(str(work))
        start = int(Path(last).name.split("-")[1]) if last else 0
        for f in (PROGRESS, MOVEMENT):
            _truncate_csv(self.lab.root / f, start)
        base = _state_dict(self.lab.student_init)
        _, tok = load_base(self.lab.student_init)
        prog = progress_callback(self.lab, tok, val, held, target, self.p.teacher_eval_every, base, self.log)
        move = movement_callback(self.lab.root / MOVEMENT, base)
        trainer = build_teacher_trainer(self.lab, self.p, self.seed, train, [prog, move])
        self.log(f"[teacher] GRPO from the base, lr {self.p.teacher_lr}, {self.p.rollouts_per_step} completions per "
                 f"step, until validation accuracy ≥ {target:.3f} or step {self.p.teacher_max_steps}"
                 + (f"; resuming from {last}" if last else ""))
        trainer.train(resume_from_checkpoint=last)
        from opd_dynamics.lab.pretrained import write_model_dir

        tmp = self.lab.teacher.with_name(".teacher.part")
        shutil.rmtree(tmp, ignore_errors=True)
        write_model_dir(trainer.model, tok, tmp)
        shutil.rmtree(self.lab.teacher, ignore_errors=True)
        tmp.rename(self.lab.teacher)
        res = {**prog.result, "target_val_accuracy": target, "lr": self.p.teacher_lr,
               "resumed_from_step": start, "max_steps": self.p.teacher_max_steps}
        self.log(f"[teacher] stopped at step {res['steps']}: validation {res['val_accuracy']:.3f} "
                 f"({'reached' if res['reached'] else 'did not reach'} {target:.3f})")
        return res

    def stage_teacher_eval(self) -> dict:
        from opd_dynamics.lab.evaluate import evaluate_model
        from opd_dynamics.lab.fewshot import stop_ids

        out = self._evaluate(self.lab.teacher)
        base, t = _state_dict(self.lab.student_init), _state_dict(self.lab.teacher)
        num_am = den_am = num = den = 0.0
        for k, b in base.items():
            if k == "lm_head.weight":
                continue  # tied to the embedding: counted once
            d2, b2 = float((t[k] - b).pow(2).sum()), float(b.pow(2).sum())
            num, den = num + d2, den + b2
            if b.ndim == 2 and (".self_attn." in k or ".mlp." in k):
                num_am, den_am = num_am + d2, den_am + b2
        out["rel_distance_all"] = (num / den) ** 0.5
        out["rel_distance_attn_mlp"] = (num_am / den_am) ** 0.5
        student, tok = load_base(self.lab.student_init, _device())
        teacher, _ = load_base(self.lab.teacher, _device())
        _, _, held, _ = splits(self.p, self.seed)
        r = evaluate_model(student, tok, held, teacher=teacher, greedy=False, seed=self.seed,
                           stop_ids=stop_ids(tok), batch_size=self.p.eval_batch)
        out["student_reverse_kl"] = r["reverse_kl"]
        self.log(f"[{self.p.name}] teacher: ‖T−B‖/‖B‖ {out['rel_distance_all']:.3e} (attention+MLP "
                 f"{out['rel_distance_attn_mlp']:.3e}); the base's reverse KL to it {r['reverse_kl']:.4f} nats/token")
        return out

    def _stage_rl(self, run: str) -> dict:
        """OPD or GRPO from the base: checkpoints at `saves_at` steps, per-step movement (``RUN/movement.csv``),
        held-out accuracy at every early step (``RUN/step_eval.csv``), the recorder at every step
        (``RUN/sketch/``), then every checkpoint evaluated (``RUN/eval.csv``: held-out
        greedy and sampled accuracy, reverse KL to the teacher, transfer accuracy). A stopped series resumes from
        its `resume_point` (the rows and sketch steps after it are redone); without one it starts again from the
        base. ``train_s`` in the result is the last run's training time (timings.csv has every run's)."""
        import pandas as pd

        from opd_dynamics.lab.evaluate import evaluate_model
        from opd_dynamics.lab.fewshot import stop_ids
        from opd_dynamics.record import DynamicsCallback, DynamicsRecorder

        _threads(self.p)
        out = self.lab.root / run
        start, resume = (resume_point(out) if out.is_dir() else None) or (0, None)
        if resume is None:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
        else:
            for name in ("movement.csv", "step_eval.csv"):
                _truncate_csv(out / name, start)
        train, val, held, transfer = splits(self.p, self.seed)
        base = _state_dict(self.lab.student_init)
        _, tok0 = load_base(self.lab.student_init)
        cbs = [movement_callback(out / "movement.csv", base),
               early_eval_callback(out / "step_eval.csv", tok0, held, self.p.eval_every_step_until, self.p.eval_batch)]
        if run == "effopd":  # first: the movement, evaluations and recorder see the weights training continues from
            from opd_dynamics.effopd.callback import EffOPDCallback
            from opd_dynamics.lab.effopd import validation_score

            score = validation_score("sampled", tok0, val, self.lab.teacher, self.seed, stop_ids=stop_ids(tok0),
                                     batch_size=self.p.eval_batch)
            cbs.insert(0, EffOPDCallback(score, max_step=self.p.rl_steps, csv_path=out / "effopd_triggers.csv"))
        if self.p.record:
            cbs.append(DynamicsCallback(DynamicsRecorder(out / "sketch", k=16, resume=resume is not None)))
        t0 = time.time()
        trainer = build_rl_trainer(run, self.lab, self.p, self.seed, train, callbacks=cbs)
        lr = run_lr(self.p, run)
        self.log(f"[{run}] {self.p.rl_steps} steps from the base, lr {lr}"
                 + (f"; resumed from {resume.name}" if resume else ""))
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        train_s = time.time() - t0
        del trainer
        t0 = time.time()
        teacher, tok = load_base(self.lab.teacher, _device())
        kw = dict(stop_ids=stop_ids(tok), batch_size=self.p.eval_batch)
        ckpts = _checkpoints(out)
        steps = list(ckpts)
        rows = []
        for step in [0, *steps]:
            model, _ = load_base(ckpts.get(step, self.lab.student_init), _device())
            r = evaluate_model(model, tok, held, teacher=teacher, greedy=True, sampled=True, seed=self.seed, **kw)
            r["transfer_accuracy"] = evaluate_model(model, tok, transfer, **kw)["accuracy"]
            rows.append({"run": run, "step": step, **r})
            self.log(f"[{run}] step {step}: held-out {r['accuracy']:.3f} (sampled {r['accuracy_sampled']:.3f}), "
                     f"reverse KL {r['reverse_kl']:.4f}, transfer {r['transfer_accuracy']:.3f}")
        ev = pd.DataFrame(rows, columns=list(EVAL_FIELDS))
        ev.to_csv(out / "eval.csv", index=False)
        move = pd.read_csv(out / "movement.csv")
        return {"steps": steps, "lr": lr, "resumed_from_step": start,
                "train_s": round(train_s, 1), "eval_s": round(time.time() - t0, 1),
                "final": rows[-1], "rel_step_attn_mlp_median": float(move["rel_step_attn_mlp"].median()),
                "rel_step_attn_mlp_max": float(move["rel_step_attn_mlp"].max()),
                "rel_distance_attn_mlp_last": float(move["rel_distance_attn_mlp"].iloc[-1])}

    # -- driver --------------------------------------------------------------------------------------------
    def run(self, until: str = STAGES[-1]) -> dict:
        if until not in STAGES:
            raise InputError(None, f"unknown stage {until!r}; choose one of {', '.join(STAGES)}")
        root = self.lab.root
        if root.exists() and not root.is_dir():
            raise InputError(root, "is not a directory; choose another --out")
        if root.is_dir() and any(root.iterdir()) and not (root / "preset.json").is_file() and not _ours(root):
            raise InputError(root, "exists and holds no pretrained lab run (no preset.json), so nothing is written "
                                   "into it; choose another --out")
        if not root.is_dir():
            from opd_dynamics.io.writer import mark_output

            root.mkdir(parents=True)
            mark_output(root, KIND)
        with _run_lock(root), _stop_on_sigterm():
            return self._run(until)

    def _run(self, until: str) -> dict:
        self._check_preset()
        for name in STAGES[: STAGES.index(until) + 1]:
            if self.lab.done(name) is not None:
                self.log(f"[{self.p.name}] stage {name}: finished earlier, kept")
                continue
            stage = (lambda run=name: self._stage_rl(run)) if name in RL_RUNS else getattr(self, f"stage_{name}")
            result = self._timed(name, stage)
            self.lab.finish(name, result)
            self.write_summary()
        summary = self.write_summary()
        return summary

    def write_summary(self) -> dict:
        """summary.json: lab.json's keys where the finished stages fill them."""
        from opd_dynamics.lab.run import _versions

        timings: dict[str, float] = {}
        tpath = self.lab.root / "timings.csv"
        if tpath.exists():
            with open(tpath, newline="") as f:
                for r in csv.DictReader(f):
                    timings[f"{r['stage']}_s"] = timings.get(f"{r['stage']}_s", 0.0) + float(r["seconds"])
        base_eval, teacher, teacher_eval = (self.lab.done(s) for s in ("base_eval", "teacher", "teacher_eval"))
        summary = {
            "preset": self.p.to_dict(), "seed": self.seed, "base": self.lab.done("base"),
            "stages_finished": [s for s in STAGES if self.lab.done(s) is not None],
            "timings": {k: round(v, 1) for k, v in timings.items()},
            "student_init": base_eval,
            "teacher": None if teacher is None else {**(teacher_eval or {}), "grpo": teacher},
            "final": {r: self.lab.done(r)["final"] for r in RL_RUNS if self.lab.done(r) is not None},
            "runs": {r: self.lab.done(r) for r in RL_RUNS if self.lab.done(r) is not None},
            "command": " ".join(sys.argv), "versions": _versions(),
        }
        tmp = self.lab.root / "summary.json.part"
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True, default=_plain) + "\n")
        tmp.replace(self.lab.root / "summary.json")
        return summary


def run_pretrained_lab(out, preset: str | PretrainedPreset = "smollm2", seed: int = 0, *, wheel=None, cache=None,
                       until: str = STAGES[-1], source=None, log: Callable[[str], None] | None = None) -> Path:
    """Run (or resume) a pretrained lab into ``out``; see the module docstring. Returns ``out``."""
    lab = PretrainedLab(out, preset, seed, wheel=wheel, cache=cache, source=source, log=log)
    lab.run(until)
    return lab.lab.root


#: the small files of a pretrained lab run that `export_summaries` copies (data/smollm2/seed-K/)
SUMMARY_FILES = ("summary.json", "timings.csv", "stages/base_eval.json", "stages/teacher.json",
                 "stages/teacher_eval.json", PROGRESS, MOVEMENT,
                 *(f"{run}/{f}" for run in RL_RUNS for f in ("eval.csv", "movement.csv", "step_eval.csv")),
                 "effopd/effopd_triggers.csv")


def export_summaries(run_dir, dest) -> list[Path]:
    """Copy a pretrained lab run's small files (`SUMMARY_FILES` that exist, a series' only once its stage has
    finished; never its models) into ``dest``, flat (``opd/eval.csv`` becomes ``opd_eval.csv``), with the home
    directory written ``~`` so that no machine path is committed. Returns the files written."""
    run_dir, dest = Path(run_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    home = str(Path.home())
    written = []
    for name in SUMMARY_FILES:
        src = run_dir / name
        series = name.split("/")[0]
        if not src.is_file() or (series in RL_RUNS and not PretrainedLabDir(run_dir).stage(series).is_file()):
            continue
        out = dest / Path(name).name if name.startswith("stages/") else dest / name.replace("/", "_")
        text = src.read_text()
        if src.suffix == ".json":
            text = text.replace(home, "~")
        tmp = out.with_name(out.name + ".part")
        tmp.write_text(text)
        tmp.replace(out)
        written.append(out)
    return written


def export_lab(root, dest) -> list[Path]:
    """``dest`` (data/smollm2/) from a multi-seed root (`lab run --preset smollm2 --seeds N --out ROOT`): each
    seed's small files in ``dest/seed-K/`` (`export_summaries`), and ``dest/lab.json``: the lowest seed's summary
    (the tiny lab's lab.json keys, and the per-step movement, the base's and the teacher's accuracies), with
    ``seeds`` naming every seed exported. Returns the files written."""
    from opd_dynamics.lab.layout import SEED_PREFIX, numbered, seed_dir

    seeds = numbered(root, SEED_PREFIX)
    if not seeds:
        raise InputError(Path(root), "holds no seed-K/ directories of a pretrained lab run")
    written = [f for k, d in seeds.items() for f in export_summaries(d, seed_dir(dest, k))]
    first = seed_dir(dest, min(seeds)) / "summary.json"
    lab = {**json.loads(first.read_text()), "seeds": list(seeds)}
    out = Path(dest) / "lab.json"
    tmp = out.with_name(out.name + ".part")
    tmp.write_text(json.dumps(lab, indent=2, sort_keys=True) + "\n")
    tmp.replace(out)
    return [*written, out]

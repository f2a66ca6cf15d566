"""EffOPD inside a transformers `Trainer` (TRL's `DistillationTrainer` included), and ready validation scorers.

The callback runs the search at `on_step_end`, i.e. after the optimizer step, the LR-scheduler step and
`global_step += 1`, and before the trainer logs, evaluates or saves — so a checkpoint written at a trigger
step holds the extrapolated weights. Optimizer state and LR schedule are left as they are. Every checkpoint
also gets the anchor (`effopd_anchor.safetensors`, in the parameters' dtype, which holds it exactly), so a
run resumed from it continues with the same anchor and keeps the trigger log written before.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, TrainerCallback

from opd_dynamics.effopd.options import ANCHOR_FILE, EffOPDOptions
from opd_dynamics.effopd.search import EffOPD, ScoreFn, TriggerRecord
from opd_dynamics.io.trainer_log import log_metrics

Rows = Sequence[Mapping[str, Any]]
_log = logging.getLogger(__name__)


def sample_validation(rows: Iterable[Mapping[str, Any]], n: int = 50, seed: int = 0) -> list[dict[str, Any]]:
    """The default validation set: `n` rows sampled (without replacement, seeded) from the training prompts."""
    rows = [dict(r) for r in rows]
    if n >= len(rows):
        return rows
    return random.Random(seed).sample(rows, n)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's (first) parameters live."""
    return next(model.parameters()).device


def token_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_student ‖ p_teacher) per position (the OPD loss), in the logits' dtype."""
    ls, lt = torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1)
    return (ls.exp() * (ls - lt)).sum(-1)


def _batches(rows: Rows, size: int):
    for i in range(0, len(rows), size):
        yield rows[i:i + size]


def generate_completions(model, tokenizer, prompts: list[str], max_new_tokens: int, do_sample: bool,
                         temperature: float):
    """(prompt_ids with left padding, prompt mask, completion ids) for a batch of text prompts."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    dev = model_device(model)
    ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample,
                           temperature=temperature if do_sample else None, top_p=None, top_k=None,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           bos_token_id=tokenizer.bos_token_id)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
    return ids, mask, out[:, ids.shape[1]:]


def reward_scorer(tokenizer, rows: Rows, reward_fn: Callable[..., list[float]], *, max_new_tokens: int,
                  batch_size: int = 64, prompt_key: str = "prompt", do_sample: bool = True,
                  temperature: float = 1.0, seed: int | None = 0) -> ScoreFn:
    """Mean reward of one completion per held-out prompt (accuracy when the reward is exact match).

    As the authors' code validates: one completion *sampled* at temperature 1 per prompt, drawn afresh for every
    candidate (call i samples from seed + i, in a forked RNG, so training randomness is untouched and a run is
    reproducible; ``seed=None`` draws from the global RNG). ``do_sample=False`` scores greedy completions.
    `reward_fn(completions=…, prompts=…, completion_ids=…, **columns)` follows TRL's reward-function
    convention: every other column of `rows` is passed as a list aligned with the completions, and
    `completion_ids` holds each completion's tokens up to and including its first end-of-sequence token,
    so a reward can tell what the decoded text (special tokens skipped) cannot: whether the answer ended.
    """
    rows = [dict(r) for r in rows]
    if not rows:
        raise ValueError("reward_scorer needs at least one validation row")
    calls = iter(range(1 << 62))

    @torch.no_grad()
    def score(model: torch.nn.Module) -> float:
        model.eval()
        total = 0.0
        dev = model_device(model)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed + next(calls))
            for batch in _batches(rows, batch_size):
                prompts = [r[prompt_key] for r in batch]
                _, _, comp = generate_completions(model, tokenizer, prompts, max_new_tokens, do_sample, temperature)
                texts = tokenizer.batch_decode(comp, skip_special_tokens=True)
                keep = completion_mask(comp, tokenizer.eos_token_id).bool() if tokenizer.eos_token_id is not None \
                    else torch.ones_like(comp, dtype=torch.bool)
                ids = [row[k].tolist() for row, k in zip(comp, keep)]
                cols = {k: [r[k] for r in batch] for k in batch[0] if k != prompt_key}
                total += float(sum(reward_fn(completions=texts, prompts=prompts, completion_ids=ids, **cols)))
        return total / len(rows)

    return score


def completion_mask(comp: torch.Tensor, eos_token_id: int | Sequence[int]) -> torch.Tensor:
    """1 for completion tokens up to and including the first end-of-sequence token, 0 after it."""
    eos = torch.isin(comp, torch.as_tensor(eos_token_id, device=comp.device).reshape(-1))
    before = torch.cumsum(eos.int(), dim=1) - eos.int()
    return (before == 0).to(torch.long)


def reverse_kl_scorer(teacher: torch.nn.Module, tokenizer, prompts: Sequence[str] | Rows, *, max_new_tokens: int,
                      batch_size: int = 64, do_sample: bool = False, temperature: float = 1.0, seed: int = 0,
                      prompt_key: str = "prompt") -> ScoreFn:
    """−(mean per-token reverse KL(student ‖ teacher)) on the student's own completions; needs no labels.

    Completions are greedy by default; with `do_sample=True` they are sampled from a fixed seed (the global
    RNG is forked, so training randomness is untouched) so that every candidate sees the same noise.
    """
    prompts = [p[prompt_key] if isinstance(p, Mapping) else p for p in prompts]
    if not prompts:
        raise ValueError("reverse_kl_scorer needs at least one validation prompt")
    teacher.eval()

    @torch.no_grad()
    def score(model: torch.nn.Module) -> float:
        model.eval()
        kl_sum, n_tok = 0.0, 0
        dev = model_device(model)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            for batch in _batches(prompts, batch_size):
                ids, mask, comp = generate_completions(model, tokenizer, list(batch), max_new_tokens, do_sample,
                                                       temperature)
                cmask = completion_mask(comp, tokenizer.eos_token_id)
                seq = torch.cat([ids, comp], dim=1)
                att = torch.cat([mask, cmask], dim=1)
                p = ids.shape[1]
                s_logits = model(input_ids=seq, attention_mask=att).logits[:, p - 1:-1].float() / temperature
                tdev = model_device(teacher)
                t_logits = teacher(input_ids=seq.to(tdev), attention_mask=att.to(tdev)).logits[:, p - 1:-1]
                t_logits = t_logits.to(dev).float() / temperature
                kl_sum += float((token_reverse_kl(s_logits, t_logits) * cmask).sum())
                n_tok += int(cmask.sum())
        return -kl_sum / max(n_tok, 1)

    return score


class EffOPDCallback(TrainerCallback):
    """Run EffOPD at the trigger steps of any transformers `Trainer` (TRL's `DistillationTrainer` included).

    Every trigger is appended to the trainer's `state.log_history` (keys `effopd/k`, `effopd/coef`,
    `effopd/score_k0` …, plus `step`) — through `Trainer.log` when the trainer is bound with `bind(trainer)`,
    so loggers such as wandb see it too — and to a CSV (`csv_path`, default `<output_dir>/effopd_triggers.csv`).
    `options` (and keyword `fields` of `EffOPDOptions`, which replace its values) say what EffOPD does.
    """

    def __init__(self, score_fn: ScoreFn | None, options: EffOPDOptions | None = None, *,
                 csv_path: str | os.PathLike | None = None, log_prefix: str = "effopd/", **fields):
        self.score_fn = score_fn
        self.options = replace(options or EffOPDOptions(), **fields)  # checked now, not when training starts
        self.options.check_scorer(score_fn)
        self.csv_path = csv_path
        self.log_prefix = log_prefix
        self.effopd: EffOPD | None = None
        self.trainer = None
        self._earlier = None  # trigger rows logged before a resume

    @property
    def records(self) -> list[TriggerRecord]:
        return [] if self.effopd is None else self.effopd.records

    def bind(self, trainer) -> EffOPDCallback:
        """Log through `trainer` (its base `Trainer.log`, which leaves TRL's pending training metrics alone)."""
        self.trainer = trainer
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("EffOPDCallback: the trainer passed no model to on_train_begin")
        self.effopd = EffOPD(model, self.score_fn, self.options)  # anchor = the weights training starts from
        if self.csv_path is None:
            self.csv_path = Path(args.output_dir) / "effopd_triggers.csv"
        self._earlier = None
        if state.global_step > 0:  # resumed: the trainer has loaded the checkpoint's weights already
            self._resume(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)

    def _resume(self, ckpt: Path, step: int) -> None:
        """Restore the anchor saved with the checkpoint, and keep the triggers logged up to it."""
        from safetensors.torch import load_file

        if (ckpt / ANCHOR_FILE).exists():
            saved = load_file(str(ckpt / ANCHOR_FILE))
            self.effopd.load_anchor(saved)
        else:
            _log.warning("EffOPD: %s has no %s; the anchor restarts at the resumed weights (step %d), so the "
                         "next trigger's update is shorter than in an uninterrupted run", ckpt, ANCHOR_FILE, step)
        if Path(self.csv_path).exists():
            import pandas as pd

            earlier = pd.read_csv(self.csv_path)
            self._earlier = earlier[earlier["step"] <= step]

    def on_save(self, args, state, control, **kwargs):
        if self.effopd is None or not state.is_world_process_zero:
            return control
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            from opd_dynamics.io.writer import atomic_file, save_safetensors

            with atomic_file(ckpt / ANCHOR_FILE) as tmp:
                save_safetensors(self.effopd.anchor_state(), tmp)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.effopd is None:
            return control
        rec = self.effopd.after_step(state.global_step)
        if rec is not None:
            self._log(rec, state, control)
            if state.is_world_process_zero:
                self._write_csv()
        return control

    def _log(self, rec: TriggerRecord, state, control) -> None:
        log_metrics(self.trainer, state, control, rec.as_log(self.log_prefix))

    def _write_csv(self) -> None:
        import pandas as pd

        from opd_dynamics.io.writer import atomic_write_text

        path = Path(self.csv_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        frame = self.effopd.records_frame()
        if self._earlier is not None and len(self._earlier):
            frame = pd.concat([self._earlier, frame], ignore_index=True)
        atomic_write_text(path, frame.to_csv(index=False))

"""Evaluation of lab models: greedy and sampled exact-match accuracy, pass@k, reverse KL to the teacher.

Generation is a plain batched loop (prompts grouped by token length, so no padding is needed;
the lab's prompts all have one length) because the completions are a handful of tokens and
``generate``'s per-call overhead would dominate. Reverse KL is KL(student || teacher) per
completion token, from float32 logits upcast to float64 before the softmax, averaged over all
completion tokens up to and including the first end-of-sequence token (the tokens TRL's
DistillationTrainer trains on).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from opd_dynamics.effopd.callback import model_device, token_reverse_kl
from opd_dynamics.lab.task import Problem, answer_body


@dataclass
class Samples:
    """Completions for one group of equal-length prompts."""

    prompt_ids: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, C)
    mask: torch.Tensor  # (B, C) 1 up to and including the first eos


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, eos_id: int, *,
             greedy: bool, generator: torch.Generator | None = None, temperature: float = 1.0) -> Samples:
    """Batched greedy or sampled decoding of equal-length prompts (no padding, full recompute)."""
    dev = model_device(model)
    x = prompt_ids.to(dev)
    done = torch.zeros(x.size(0), dtype=torch.bool, device=dev)
    mask = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=x, use_cache=False).logits[:, -1].float()
        if greedy:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(dev)
        mask.append(~done)
        x = torch.cat([x, nxt[:, None]], dim=1)
        done = done | (nxt == eos_id)
    p = prompt_ids.size(1)
    return Samples(prompt_ids.cpu(), x[:, p:].cpu(), torch.stack(mask, 1).cpu().long())


def completion_texts(tokenizer, samples: Samples) -> list[str | None]:
    """Decoded completions: the characters before the first end-of-sequence token; None (which matches no
    answer) for a completion that never ends within its budget or holds another special token."""
    special = set(tokenizer.all_special_ids)
    out: list[str | None] = []
    for ids, m in zip(samples.completion_ids.tolist(), samples.mask.tolist(), strict=True):
        body = answer_body((i for i, keep in zip(ids, m, strict=True) if keep), tokenizer.eos_token_id, special)
        out.append(None if body is None else tokenizer.decode(body))
    return out


@torch.no_grad()
def reverse_kl_tokens(student, teacher, samples: Samples) -> tuple[float, int]:
    """Sum over completion tokens of KL(p_student || p_teacher) in float64, and the token count."""
    seq = torch.cat([samples.prompt_ids, samples.completion_ids], dim=1)
    p, c = samples.prompt_ids.size(1), samples.completion_ids.size(1)
    ls = student(input_ids=seq.to(model_device(student)), use_cache=False).logits[:, p - 1 : p + c - 1]
    lt = teacher(input_ids=seq.to(model_device(teacher)), use_cache=False).logits[:, p - 1 : p + c - 1]
    kl = token_reverse_kl(ls.double().cpu(), lt.double().cpu())
    m = samples.mask.double()
    return float((kl * m).sum()), int(m.sum())


def _groups(tokenizer, problems: Sequence[Problem]) -> list[tuple[torch.Tensor, list[str]]]:
    ids = tokenizer([p.prompt for p in problems])["input_ids"]
    by_len: dict[int, tuple[list, list]] = {}
    for row, prob in zip(ids, problems, strict=True):
        g = by_len.setdefault(len(row), ([], []))
        g[0].append(row)
        g[1].append(prob.answer)
    return [(torch.tensor(r), a) for r, a in by_len.values()]


@torch.no_grad()
def evaluate_model(model, tokenizer, problems: Sequence[Problem], teacher=None, greedy: bool = True, *,
                   sampled: bool = False, seed: int = 0, temperature: float = 1.0,
                   batch_size: int = 1024) -> dict[str, float]:
    """Score ``model`` on ``problems`` (objects with ``.prompt`` and ``.answer``).

    Returns a dict with ``accuracy`` (greedy exact match, if ``greedy``), ``accuracy_sampled``
    (one sample per prompt at ``temperature``, if ``sampled`` or a teacher is given) and
    ``reverse_kl`` (mean per-token KL(student || teacher) on those samples, if ``teacher``).
    Sampling uses a CPU generator seeded with ``seed``, so repeated calls are reproducible.
    Usable as a scorer: ``lambda m: evaluate_model(m, tok, heldout)["accuracy"]``.
    """
    was_training = model.training
    model.eval()
    if teacher is not None:
        teacher.eval()
    eos = tokenizer.eos_token_id
    n = correct_g = correct_s = 0
    kl_sum, kl_n = 0.0, 0
    gen = torch.Generator().manual_seed(seed)
    do_sample = sampled or teacher is not None
    for prompt_ids, answers in _groups(tokenizer, problems):
        max_new = max(len(a) for a in answers) + 1
        for start in range(0, len(answers), batch_size):
            ids, ans = prompt_ids[start : start + batch_size], answers[start : start + batch_size]
            n += len(ans)
            if greedy:
                s = generate(model, ids, max_new, eos, greedy=True)
                correct_g += sum(t == a for t, a in zip(completion_texts(tokenizer, s), ans, strict=True))
            if do_sample:
                s = generate(model, ids, max_new, eos, greedy=False, generator=gen, temperature=temperature)
                correct_s += sum(t == a for t, a in zip(completion_texts(tokenizer, s), ans, strict=True))
                if teacher is not None:
                    a, b = reverse_kl_tokens(model, teacher, s)
                    kl_sum, kl_n = kl_sum + a, kl_n + b
    if was_training:
        model.train()
    out: dict[str, float] = {}
    if greedy:
        out["accuracy"] = correct_g / max(n, 1)
    if do_sample:
        out["accuracy_sampled"] = correct_s / max(n, 1)
    if teacher is not None:
        out["reverse_kl"] = kl_sum / max(kl_n, 1)
    return out


@torch.no_grad()
def pass_at_k(model, tokenizer, problems: Sequence[Problem], k: int, *, seed: int = 0, temperature: float = 1.0,
              batch_size: int = 1024) -> float:
    """pass@k: the share of ``problems`` with at least one exact answer among ``k`` samples at ``temperature``
    (seeded CPU generator, reproducible). With n = k samples per prompt this is the plain "any correct" count,
    which is what RL with ``k`` samples per group sees: the share of groups that hold a reward at all."""
    if k < 1:
        raise ValueError(f"pass_at_k: k must be >= 1, got {k}")
    if not problems:
        return float("nan")
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    gen = torch.Generator().manual_seed(seed)
    hit = n = 0
    per = max(1, batch_size // k)  # prompts per generation call
    for prompt_ids, answers in _groups(tokenizer, problems):
        max_new = max(len(a) for a in answers) + 1
        for start in range(0, len(answers), per):
            ids, ans = prompt_ids[start : start + per], answers[start : start + per]
            s = generate(model, ids.repeat_interleave(k, 0), max_new, eos, greedy=False, generator=gen,
                         temperature=temperature)
            texts = completion_texts(tokenizer, s)
            hit += sum(any(t == a for t in texts[i * k : (i + 1) * k]) for i, a in enumerate(ans))
            n += len(ans)
    if was_training:
        model.train()
    return hit / n

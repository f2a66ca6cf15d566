"""Evaluation of lab models: greedy and sampled exact-match accuracy, pass@k, reverse KL to the teacher.

Generation is a plain batched loop (prompts grouped by token length, so no padding is needed;
the lab's prompts all have one length) because the completions are a handful of tokens and
``generate``'s per-call overhead would dominate. Reverse KL is KL(student || teacher) per
completion token, from float32 logits upcast to float64 before the softmax, averaged over all
completion tokens up to and including the first end-of-sequence token (the tokens TRL's
DistillationTrainer trains on). A pretrained base's few-shot completions end at a newline instead: ``stop_ids``
(every token that holds one, `opd_dynamics.lab.fewshot.stop_ids`) then replace the end-of-sequence token.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
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


#: above this vocabulary size the output layer is applied only at the positions used (``logits_to_keep``): for a
#: pretrained base's 49,152-word head it is the largest cost; the tiny lab's 16-word head keeps the full computation,
#: so that its recorded numbers stay bit-identical
LARGE_VOCAB = 4096


def _cache_arg() -> str:
    """The forward argument that takes a KV cache (transformers 5.x renamed past_key_values to cache)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _logits(model, ids: torch.Tensor, keep: int) -> torch.Tensor:
    """The logits of the last ``keep`` positions of ``ids``."""
    if getattr(model.config, "vocab_size", 0) > LARGE_VOCAB:
        return model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits[:, -keep:]
    return model(input_ids=ids, use_cache=False).logits[:, -keep:]


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, eos_id: int | Collection[int], *,
             greedy: bool, generator: torch.Generator | None = None, temperature: float = 1.0) -> Samples:
    """Batched greedy or sampled decoding of equal-length prompts (no padding; full recompute, or a KV cache for a
    model with a large vocabulary); a completion is done at ``eos_id`` (one id, or any of several)."""
    dev = model_device(model)
    x = prompt_ids.to(dev)
    stops = torch.tensor(sorted(_ids(eos_id)), device=dev)
    done = torch.zeros(x.size(0), dtype=torch.bool, device=dev)
    mask = []
    cached = getattr(model.config, "vocab_size", 0) > LARGE_VOCAB  # a pretrained base: long prompts, KV cache
    past = None
    for _ in range(max_new_tokens):
        if cached:
            out = model(input_ids=x if past is None else x[:, -1:], use_cache=True, logits_to_keep=1,
                        **({} if past is None else {_cache_arg(): past}))
            past, logits = getattr(out, "cache", None) or out.past_key_values, out.logits[:, -1].float()
        else:
            logits = _logits(model, x, 1)[:, -1].float()
        if greedy:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(dev)
        mask.append(~done)
        x = torch.cat([x, nxt[:, None]], dim=1)
        done = done | torch.isin(nxt, stops)
    p = prompt_ids.size(1)
    return Samples(prompt_ids.cpu(), x[:, p:].cpu(), torch.stack(mask, 1).cpu().long())


def _ids(ids: int | Collection[int]) -> frozenset[int]:
    return frozenset([ids]) if isinstance(ids, int) else frozenset(int(i) for i in ids)


def completion_texts(tokenizer, samples: Samples, stop_ids: Collection[int] | None = None) -> list[str | None]:
    """Decoded completions: the characters before the first end-of-sequence token (or the first of ``stop_ids``);
    None (which matches no answer) for a completion that never ends within its budget or holds another special
    token."""
    stops = _ids(tokenizer.eos_token_id if stop_ids is None else stop_ids)
    special = set(tokenizer.all_special_ids) - stops
    out: list[str | None] = []
    for ids, m in zip(samples.completion_ids.tolist(), samples.mask.tolist(), strict=True):
        body = answer_body((i for i, keep in zip(ids, m, strict=True) if keep), stops, special)
        out.append(None if body is None else tokenizer.decode(body))
    return out


@torch.no_grad()
def reverse_kl_tokens(student, teacher, samples: Samples) -> tuple[float, int]:
    """Sum over completion tokens of KL(p_student || p_teacher) in float64, and the token count."""
    seq = torch.cat([samples.prompt_ids, samples.completion_ids], dim=1)
    c = samples.completion_ids.size(1)
    ls = _logits(student, seq.to(model_device(student)), c + 1)[:, :c]
    lt = _logits(teacher, seq.to(model_device(teacher)), c + 1)[:, :c]
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
                   batch_size: int = 1024, stop_ids: Collection[int] | None = None) -> dict[str, float]:
    """Score ``model`` on ``problems`` (objects with ``.prompt`` and ``.answer``).

    Returns a dict with ``accuracy`` (greedy exact match, if ``greedy``), ``accuracy_sampled``
    (one sample per prompt at ``temperature``, if ``sampled`` or a teacher is given) and
    ``reverse_kl`` (mean per-token KL(student || teacher) on those samples, if ``teacher``).
    Sampling uses a CPU generator seeded with ``seed``, so repeated calls are reproducible. ``stop_ids``: the tokens
    that end a completion (default: the tokenizer's end-of-sequence token).
    Usable as a scorer: ``lambda m: evaluate_model(m, tok, heldout)["accuracy"]``.
    """
    was_training = model.training
    model.eval()
    if teacher is not None:
        teacher.eval()
    eos = _ids(tokenizer.eos_token_id if stop_ids is None else stop_ids)
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
                correct_g += sum(t == a for t, a in zip(completion_texts(tokenizer, s, eos), ans, strict=True))
            if do_sample:
                s = generate(model, ids, max_new, eos, greedy=False, generator=gen, temperature=temperature)
                correct_s += sum(t == a for t, a in zip(completion_texts(tokenizer, s, eos), ans, strict=True))
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
              batch_size: int = 1024, stop_ids: Collection[int] | None = None) -> float:
    """pass@k: the share of ``problems`` with at least one exact answer among ``k`` samples at ``temperature``
    (seeded CPU generator, reproducible). With n = k samples per prompt this is the plain "any correct" count,
    which is what RL with ``k`` samples per group sees: the share of groups that hold a reward at all."""
    if k < 1:
        raise ValueError(f"pass_at_k: k must be >= 1, got {k}")
    if not problems:
        return float("nan")
    was_training = model.training
    model.eval()
    eos = _ids(tokenizer.eos_token_id if stop_ids is None else stop_ids)
    gen = torch.Generator().manual_seed(seed)
    hit = n = 0
    per = max(1, batch_size // k)  # prompts per generation call
    for prompt_ids, answers in _groups(tokenizer, problems):
        max_new = max(len(a) for a in answers) + 1
        for start in range(0, len(answers), per):
            ids, ans = prompt_ids[start : start + per], answers[start : start + per]
            s = generate(model, ids.repeat_interleave(k, 0), max_new, eos, greedy=False, generator=gen,
                         temperature=temperature)
            texts = completion_texts(tokenizer, s, eos)
            hit += sum(any(t == a for t in texts[i * k : (i + 1) * k]) for i, a in enumerate(ans))
            n += len(ans)
    if was_training:
        model.train()
    return hit / n

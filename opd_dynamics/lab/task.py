"""A verifiable arithmetic task for the lab: fixed-width n-digit addition with carries.

Why fixed width: every prompt has the same number of tokens and every answer the same number of
characters, so generation, reward and KL evaluation batch without padding, and a tiny model learns
it in minutes on a CPU. Prompt ``"047+385="``, answer ``"0432"`` (n+1 digits, leading zeros kept),
followed by the end-of-sequence token. Exact match of the parsed answer is the reward.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
CHARS = list("0123456789+-=")
VOCAB = [PAD, BOS, EOS, *CHARS]


@dataclass(frozen=True)
class Problem:
    """One prompt with its exact answer string."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class TaskSplits:
    """Train and held-out problems (disjoint by prompt)."""

    train: tuple[Problem, ...]
    heldout: tuple[Problem, ...]
    digits: int


def make_problem(a: int, b: int, digits: int) -> Problem:
    """The problem ``a + b`` written with ``digits``-wide operands and a ``digits + 1``-wide answer."""
    return Problem(f"{a:0{digits}d}+{b:0{digits}d}=", f"{a + b:0{digits + 1}d}")


def make_splits(digits: int, n_train: int, n_heldout: int, seed: int) -> TaskSplits:
    """Draw disjoint train and held-out sets of ``digits``-digit additions with a seeded RNG.

    When ``n_train + n_heldout`` reaches the number of distinct pairs, all pairs are used (shuffled).
    """
    rng = random.Random(seed)
    top = 10**digits
    total = top * top
    want = n_train + n_heldout
    if want >= total:
        idx = list(range(total))
        rng.shuffle(idx)
    else:
        idx = rng.sample(range(total), want)
    probs = [make_problem(i // top, i % top, digits) for i in idx]
    held = probs[:n_heldout]
    train = probs[n_heldout:want]
    return TaskSplits(train=tuple(train), heldout=tuple(held), digits=digits)


def has_carry(problem: Problem) -> bool:
    """Whether adding the two operands carries in any column (the skill a weak student lacks)."""
    a, b = problem.prompt.rstrip("=").split("+")
    return any(int(a[i:]) + int(b[i:]) >= 10 ** len(a[i:]) for i in range(len(a)))


def parse_answer(completion: str) -> str:
    """The answer a completion states: its text up to the first end-of-sequence token, without blanks."""
    return completion.split(EOS, 1)[0].replace(PAD, "").replace(BOS, "").strip().replace(" ", "")


def is_correct(completion: str, answer: str) -> bool:
    """Exact match of the parsed answer."""
    return parse_answer(completion) == answer


def exact_match_reward(completions: list[str], answer: list[str], completion_ids: list[list[int]] | None = None,
                       **_: object) -> list[float]:
    """GRPO reward function: 1.0 for an exact answer, else 0.0 (TRL passes dataset columns as kwargs).

    TRL decodes `completions` without special tokens, so the ids it also passes decide what the text cannot
    show: the answer must be ended by EOS, with no other special token before it (as evaluation requires)."""
    ok = [is_correct(c, a) for c, a in zip(completions, answer, strict=True)]
    if completion_ids is not None:
        eos, special = _special_ids()
        ok = [o and answer_body(ids, eos, special) is not None for o, ids in zip(ok, completion_ids, strict=True)]
    return [1.0 if o else 0.0 for o in ok]


def answer_body(ids: Iterable[int], eos: int | Collection[int], special: Collection[int]) -> list[int] | None:
    """The tokens of a completion before its first end-of-sequence token (``eos``: one id, or several that each
    end it); None when it never ends or holds another special token there (what evaluation and the reward both
    count as no answer)."""
    ids = list(ids)
    stops = {eos} if isinstance(eos, int) else set(eos)
    end = next((i for i, t in enumerate(ids) if t in stops), None)
    if end is None:
        return None
    body = ids[:end]
    return None if set(special) & set(body) else body


@lru_cache(maxsize=1)
def _special_ids() -> tuple[int, frozenset[int]]:
    tok = build_tokenizer()
    return tok.eos_token_id, frozenset(tok.all_special_ids)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer built locally (no hub): one token per character, BOS prepended.

    A BPE model without merges over the single characters is exactly a character tokenizer.
    Padding is on the left, as TRL's on-policy trainers require.
    """
    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    tk.add_special_tokens([PAD, BOS, EOS])
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        truncation_side="left",
        model_max_length=64,
        clean_up_tokenization_spaces=False,
    )
    return tok

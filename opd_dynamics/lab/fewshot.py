"""Few-shot completion-style arithmetic for a pretrained base (the pretrained lab's tasks).

A prompt is three worked examples, one per line, then the question: ``"12+7=19\\n30+45=75\\n8+16=24\\n3+14="``;
the answer is the number (``"17"``), and the completion ends at the first token holding a newline (`stop_ids`),
as a base model continues the list. Exact match of the text before that token is the reward and the accuracy
(nothing stripped: " 17" is wrong, as the examples show no blank). The tasks are small enough to enumerate: every
operand pair, less the examples', shuffled by a seed and split into disjoint train and held-out problems.

Chat format ("What is a + b?") scored 0.00 on SmolLM2-135M-Instruct and two-digit addition 0.05 (issue 29), so the
tasks are the ones where that base is partly competent; `docs/PRETRAINED.md` has the measured accuracies.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from opd_dynamics.errors import InputError
from opd_dynamics.lab.task import Problem, TaskSplits


@dataclass(frozen=True)
class FewShotTask:
    """One arithmetic task: operand ranges (inclusive), how a line is written and what its answer is."""

    name: str
    a: tuple[int, int]
    b: tuple[int, int]
    template: str  # a question line without its answer, e.g. "{a}+{b}="
    op: Callable[[int, int], int]
    shots: tuple[tuple[int, int], ...]
    keep: Callable[[int, int], bool] = lambda a, b: True  # which pairs belong to the task
    step: int = 1  # operands are multiples of this (the "tens" tasks)

    def line(self, a: int, b: int) -> str:
        return self.template.format(a=a, b=b)

    def answer(self, a: int, b: int) -> str:
        return str(self.op(a, b))

    @property
    def prefix(self) -> str:
        """The worked examples, one per line, each ended by a newline."""
        return "".join(f"{self.line(a, b)}{self.answer(a, b)}\n" for a, b in self.shots)

    def problem(self, a: int, b: int) -> Problem:
        return Problem(self.prefix + self.line(a, b), self.answer(a, b))

    def pairs(self) -> list[tuple[int, int]]:
        """Every operand pair of the task, the examples' left out, in a fixed order."""
        shots = set(self.shots)
        return [(a, b) for a in range(self.a[0], self.a[1] + 1, self.step)
                for b in range(self.b[0], self.b[1] + 1, self.step) if self.keep(a, b) and (a, b) not in shots]


_ADD_SHOTS = ((12, 7), (30, 45), (8, 16))  # the trial: "12+7=19\n30+45=75\n8+16=24\n"

TASKS: dict[str, FewShotTask] = {t.name: t for t in (
    FewShotTask("add20", (1, 20), (1, 20), "{a}+{b}=", lambda a, b: a + b, _ADD_SHOTS),
    FewShotTask("add30", (1, 30), (1, 30), "{a}+{b}=", lambda a, b: a + b, _ADD_SHOTS),
    FewShotTask("add21to40", (21, 40), (1, 20), "{a}+{b}=", lambda a, b: a + b, _ADD_SHOTS),
    FewShotTask("add31to50", (31, 50), (1, 30), "{a}+{b}=", lambda a, b: a + b, _ADD_SHOTS),  # add30's transfer
    FewShotTask("add2x1", (10, 99), (1, 9), "{a}+{b}=", lambda a, b: a + b, _ADD_SHOTS),
    FewShotTask("addtens", (10, 90), (10, 90), "{a}+{b}=", lambda a, b: a + b, _ADD_SHOTS, step=10),
    FewShotTask("sub20", (1, 20), (1, 20), "{a}-{b}=", lambda a, b: a - b, ((12, 7), (45, 30), (16, 8)),
                keep=lambda a, b: b <= a),
    FewShotTask("max2", (10, 99), (10, 99), "max({a},{b})=", max, ((12, 7), (30, 45), (8, 16)),
                keep=lambda a, b: a != b),
    FewShotTask("mul1", (2, 9), (2, 9), "{a}*{b}=", lambda a, b: a * b, ((3, 4), (7, 2), (5, 6))),
)}


def get_task(name: str) -> FewShotTask:
    try:
        return TASKS[name]
    except KeyError:
        raise InputError(None, f"unknown few-shot task {name!r}; choose one of {', '.join(TASKS)}") from None


def make_fewshot_splits(task: str | FewShotTask, n_heldout: int, seed: int, n_train: int | None = None) -> TaskSplits:
    """Disjoint held-out and train problems of ``task`` (every pair, shuffled with ``seed``): the first
    ``n_heldout`` are held out, the next ``n_train`` (default: all the rest) train."""
    t = get_task(task) if isinstance(task, str) else task
    pairs = t.pairs()
    if n_heldout >= len(pairs):
        raise InputError(None, f"task {t.name} has {len(pairs)} problems, too few for {n_heldout} held out and a "
                               "train split", ("n_heldout",))
    random.Random(seed).shuffle(pairs)
    held = pairs[:n_heldout]
    train = pairs[n_heldout:] if n_train is None else pairs[n_heldout: n_heldout + n_train]
    return TaskSplits(train=tuple(t.problem(a, b) for a, b in train),
                      heldout=tuple(t.problem(a, b) for a, b in held), digits=0)


def stop_ids(tokenizer) -> tuple[int, ...]:
    """The tokens that end a few-shot completion: every vocabulary entry whose text holds a newline. (The
    end-of-sequence token is not one: a completion it ends holds no answer, for the reward and for evaluation.)"""
    key = (tokenizer.name_or_path, len(tokenizer), tokenizer.__class__.__name__)
    if key not in _STOPS:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        _STOPS[key] = tuple(i for i, t in enumerate(texts) if "\n" in t)
    return _STOPS[key]


_STOPS: dict[tuple, tuple[int, ...]] = {}


def answer_text(completion: str) -> str:
    """A decoded completion's answer: the text before its first newline (GRPO's reward reads this)."""
    return completion.split("\n", 1)[0]


def fewshot_reward(completions: list[str], answer: list[str], **_: object) -> list[float]:
    """GRPO reward function: 1.0 when the completion's text before its first newline is exactly the answer and a
    newline ends it (a completion cut by the token budget has no answer), else 0.0."""
    return [1.0 if ("\n" in c and answer_text(c) == a) else 0.0 for c, a in zip(completions, answer, strict=True)]

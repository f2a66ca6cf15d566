"""What EffOPD does, in one options class shared by the in-trainer search (`EffOPD`, `EffOPDCallback`), the
offline search and extrapolation, the lab's measurement and the command line (flags generated from it)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from opd_dynamics.errors import InputError
from opd_dynamics.fields import option
from opd_dynamics.io.naming import MATRIX_GROUPS, is_selected

Trigger = Callable[[int], bool]

#: the file in a checkpoint that holds EffOPD's anchor (the weights its next jump starts from), for a resumed run
ANCHOR_FILE = "effopd_anchor.safetensors"
#: EffOPD's `_should_modify_param` (EffOPD/verl/verl/workers/fsdp_workers.py:1106-1132): a parameter moves when its
#: lowercased name contains one of these, whatever its shape (q/k/v biases, q_norm/k_norm and
#: post_attention_layernorm too; never embed_tokens, lm_head, input_layernorm or the final norm)
EFFOPD_KEYWORDS = ("attn", "self_attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "mlp", "feed_forward",
                   "ffn", "gate_proj", "up_proj", "down_proj")
#: how a selection is made: the authors' own rule for the method, or the toolkit's naming groups and shapes
SELECTS = ("published", "groups")


def effopd_selects(name: str) -> bool:
    """EffOPD's published name rule: a substring match of its keywords on the lowercased name."""
    low = name.lower()
    return any(k in low for k in EFFOPD_KEYWORDS)


def resolve_select(select: str | None, groups: Sequence[str] | None, matrices_only: bool,
                   default: str = "published") -> str:
    """The selection rule in force: ``select`` when given, else 'groups' when ``groups`` or ``matrices_only`` differ
    from their defaults (asking for them asks for the toolkit's rule), else ``default``. Groups or shapes given
    with select='published' are refused: the authors' rule would ignore them."""
    custom = (tuple(groups) if groups is not None else None) != MATRIX_GROUPS or matrices_only is not True
    if select is None:
        return "groups" if custom else default
    if select not in SELECTS:
        raise InputError(None, f"select must be one of {', '.join(SELECTS)}, not {select!r}", ("select",))
    if select == "published" and custom:
        raise InputError(None, "groups and matrices_only apply with select groups (the toolkit's naming groups), not "
                               "with select published (the authors' own rule)", ("groups", "matrices_only", "select"))
    return select



def is_power_of_two(step: int) -> bool:
    """The published schedule: 1, 2, 4, 8, …"""
    return step >= 1 and (step & (step - 1)) == 0


def make_trigger(schedule: Trigger | Iterable[int] | str | None = None, *, max_step: int | None = None) -> Trigger:
    """A trigger predicate from `None`/'pow2' (powers of two), 'powN' (powers of N), an explicit set of
    steps, or a predicate; `max_step` stops triggering after that step."""
    if schedule is None or schedule == "pow2":
        base: Trigger = is_power_of_two
    elif isinstance(schedule, str) and schedule.startswith("pow") and schedule[3:].isdigit():
        b = int(schedule[3:])
        if b < 2:
            raise ValueError(f"trigger schedule {schedule!r}: the base must be at least 2")

        def base(step: int, b: int = b) -> bool:
            if step < 1:
                return False
            while step % b == 0:
                step //= b
            return step == 1
    elif callable(schedule):
        base = schedule
    elif isinstance(schedule, str):
        raise ValueError(f"trigger schedule {schedule!r} is not 'pow2', 'powN', a set of steps or a predicate")
    else:
        steps = frozenset(int(s) for s in schedule)
        base = steps.__contains__
    if max_step is None:
        return base
    return lambda step: step <= max_step and base(step)


@dataclass(frozen=True)
class EffOPDOptions:
    """The search (K candidates W_t + coef_step·k·Δ, the acceptance rule), when it runs (schedule, max_step),
    what it moves (groups, matrices_only, naming_overrides, param_filter) and where its anchor lives."""

    k_max: int = option(5, "K: candidates W + coef_step·k·(W − W_anchor), k = 1 … K.", min=0)
    coef_step: float = option(2.0, "The 2 in 2k (the paper's candidates W_t + 2kΔ).")
    strict: bool = option(True, "Accept only strictly better scores, as the authors' code does (--accept-ties: ≥, "
                          "the paper's text; a score stuck at one value then accepts every jump).",
                          flag="--strict/--accept-ties")
    fixed_k: int | None = option(None, "Skip the search and always jump with this k (a fixed-coefficient baseline; "
                               "no scoring).", cli=False)
    schedule: Trigger | Iterable[int] | str | None = option(None, "Trigger steps: 'pow2' (default), 'powN', a set of "
                                                          "steps or a predicate.", cli=False)
    max_step: int | None = option(None, "No trigger after this step.", cli=False)
    select: str | None = option(None, "What moves: published (default), EffOPD's own rule (every parameter whose "
                                "lowercased name contains attn, attention, mlp, ffn, feed_forward or a q/k/v/o, gate, "
                                "up or down projection: biases, q/k norms and post_attention_layernorm too); groups, "
                                "the toolkit's naming groups and shapes (--groups, --matrices-only/--all-shapes, "
                                "which imply it).", choices=SELECTS)
    groups: tuple[str, ...] | None = option(MATRIX_GROUPS, "With select groups: naming groups to extrapolate ('all' "
                                          "for every group).", cli="groups", metavar="GROUP,...")
    matrices_only: bool = option(True, "With select groups: only 2-D weights (--all-shapes: biases and other tensors "
                                 "of those groups too).", flag="--matrices-only/--all-shapes")
    naming_overrides: Any = option(None, "Naming overrides (see opd_dynamics.io.naming.parse_name).", cli=False)
    param_filter: Callable[[str, torch.Tensor], bool] | None = option(
        None, "param_filter(name, param) → keep; replaces the group and shape rule.", cli=False)
    anchor_device: str | torch.device | None = option(
        None, "Where the float32 anchor and the copy of W_t live ('cpu' keeps accelerator memory flat).", cli=False)

    def __post_init__(self) -> None:
        if isinstance(self.groups, Sequence) and not isinstance(self.groups, tuple):
            object.__setattr__(self, "groups", tuple(self.groups))
        if self.k_max < 0 or (self.fixed_k is not None and self.fixed_k < 0):
            raise InputError(None, f"k_max and fixed_k must be >= 0, got {self.k_max} and {self.fixed_k}",
                             ("k_max", "fixed_k"))
        if not (math.isfinite(self.coef_step) and self.coef_step > 0):
            raise InputError(None, f"coef_step must be a positive finite number, got {self.coef_step}",
                             ("coef_step",))
        self.trigger()  # a bad schedule is refused now, not at the first step
        self.selection  # noqa: B018 - groups with select published are refused now

    @property
    def selection(self) -> str:
        """The selection rule in force: 'published' (EffOPD's name rule) or 'groups' (see `resolve_select`)."""
        return resolve_select(self.select, self.groups, self.matrices_only)

    def trigger(self) -> Trigger:
        """The predicate saying at which optimizer steps the search runs."""
        return make_trigger(self.schedule, max_step=self.max_step)

    def selects(self, name: str, shape: Sequence[int]) -> bool:
        """Whether a tensor of this name and shape is extrapolated: EffOPD's name rule (`effopd_selects`) by default,
        the project's group rule (`io.naming.is_selected`) with select groups."""
        if self.selection == "published":
            return effopd_selects(name)
        return is_selected(name, shape, self.groups, self.matrices_only, self.naming_overrides)

    def selection_text(self) -> str:
        """What the selection moves, in words (for refusals and metadata)."""
        if self.selection == "published":
            return "EffOPD's name rule"
        what = "all groups" if self.groups is None else "groups " + ",".join(self.groups)
        return f"{'matrices' if self.matrices_only else 'tensors'} in {what}"

    def check_scorer(self, score_fn) -> None:
        """A search needs a score function; only the fixed-k baseline runs without one."""
        if self.fixed_k is None and score_fn is None:
            raise InputError(None, "EffOPD needs a score_fn unless fixed_k is given", ("score_fn", "fixed_k"))

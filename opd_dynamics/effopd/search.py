"""EffOPD's adaptive extrapolation on a live `torch.nn.Module`, independent of any training framework.

At trigger steps t (powers of two by default) the update since the anchor, Δ = W_t − W_anchor, is taken
for the selected matrices; candidates W_t + c_k·Δ with c_k = 2k, k = 1 … K, are scored after W_t itself,
in order; a candidate is accepted while its score is > the best so far (as in the authors' code; ≥ with
`strict=False`, the paper's text) and the search stops at the first one that is not. The model is left at the accepted
weights, which become the new anchor. The arithmetic is float32 (float64 for float64 parameters), never
the parameters' 16-bit dtype, and the exact bits of W_t are kept so that a rejected candidate, or a score
function that raises, restores them bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from opd_dynamics.effopd.options import EffOPDOptions, is_power_of_two, make_trigger  # noqa: F401 (0.1's home)
from opd_dynamics.numerics import fro2, update_dtype

_log = logging.getLogger(__name__)

#: a validation score, higher is better: a number, or a tuple compared in order (later elements break ties)
Score = float | tuple[float, ...]
ScoreFn = Callable[[torch.nn.Module], Score]


def jump(wa: torch.Tensor, wb: torch.Tensor, coef: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The one jump W_B + coef·(W_B − W_A) (EffOPD's candidates, ExPO, the line probe, every extrapolator that is a
    jump), computed in ``dtype`` (default `update_dtype` of W_B: float32, float64 for float64 weights; never a 16-bit
    dtype) and returned in it: the caller rounds to the stored dtype once."""
    work = dtype if dtype is not None else update_dtype(wb)
    b = wb.to(work)
    return b + coef * (b - wa.to(device=b.device, dtype=work))


def select_parameters(model: torch.nn.Module, options: EffOPDOptions | None = None, *, trainable_only: bool = True,
                      **fields) -> dict[str, torch.nn.Parameter]:
    """The parameters EffOPD extrapolates: trainable float parameters that `EffOPDOptions.selects` (default:
    attention and MLP matrices), or that ``param_filter(name, param)`` keeps when one is given. ``fields`` are
    EffOPDOptions fields (groups, matrices_only, naming_overrides, param_filter)."""
    opts = replace(options or EffOPDOptions(), **fields)
    out: dict[str, torch.nn.Parameter] = {}
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        keep = opts.param_filter(name, p) if opts.param_filter is not None else opts.selects(name, p.shape)
        if keep and p.is_floating_point():
            out[name] = p
    return out


def _refuse_sharded_or_adapter(model: torch.nn.Module, params: dict[str, torch.nn.Parameter]) -> None:
    """EffOPD moves whole local weights: refuse, naming the setup, what it would silently get wrong."""
    if hasattr(model, "peft_config"):
        raise ValueError("EffOPD works on full weights, not on a PEFT (LoRA) model's adapter factors; merge the "
                         "adapter (merge_and_unload) or train without PEFT")
    for n, p in params.items():
        if hasattr(p, "ds_id") or p.numel() == 0:
            raise ValueError(f"parameter {n!r} is partitioned (DeepSpeed ZeRO-3); EffOPD needs whole weights "
                             "on each rank (DDP or a single process; see docs/EFFOPD.md on fp32 master weights)")
        if type(p.data).__name__ == "DTensor":
            raise ValueError(f"parameter {n!r} is a DTensor (FSDP or tensor parallel); EffOPD is not supported on "
                             "sharded parameters")


def primary(score) -> float:
    """A score's first element: scores are numbers, or tuples compared in order (a tie-break after the first)."""
    return float(score[0] if isinstance(score, (tuple, list)) else score)


def published_search(score_k: Callable[[int], Score], k_max: int, *, strict: bool = True) -> tuple[int, list[Score]]:
    """The acceptance rule: score k = 0 (W_t), then k = 1 … k_max in order; accept k while its score is > the
    best so far (≥ when not `strict`), stop at the first that is not (or is NaN). A tuple score is compared in
    order, so its later elements break ties of the first. Returns (accepted k, scores)."""
    best = score_k(0)
    scores, k_acc = [best], 0
    for k in range(1, k_max + 1):
        s = score_k(k)
        scores.append(s)
        if math.isnan(primary(s)) or not (s > best if strict else s >= best):
            break
        best, k_acc = s, k
    return k_acc, scores


@dataclass
class TriggerRecord:
    """What one trigger did: scores[0] is W_t's, scores[k] candidate k's (only those evaluated)."""

    step: int | None
    scores: list[Score]
    coefs: list[float]
    k_accepted: int
    coef: float
    delta_norm: float
    validation_s: float
    extrapolate_s: float
    mode: str = "adaptive"

    @property
    def tie(self) -> bool:
        """A jump accepted although no candidate scored above W_t (the ≥ rule on equal scores, e.g. a
        validation accuracy stuck at 0): the score could not tell the candidates apart."""
        return self.mode == "adaptive" and self.k_accepted > 0 and self.scores[self.k_accepted] == self.scores[0]

    def tie_note(self) -> str:
        """One sentence for logs when `tie` holds."""
        return (f"EffOPD accepted k={self.k_accepted} (coef {self.coef:g}) on a tie: every score was "
                f"{self.scores[0]}, W_t's included, so the validation could not tell the candidates apart "
                "(the default strict rule keeps W_t on ties)")

    def as_log(self, prefix: str = "effopd/") -> dict[str, float]:
        """Flat numbers for a trainer log (`state.log_history`, wandb …)."""
        d = {f"{prefix}k": float(self.k_accepted), f"{prefix}coef": self.coef, f"{prefix}tie": float(self.tie),
             f"{prefix}delta_norm": self.delta_norm, f"{prefix}validation_s": self.validation_s}
        for i, s in enumerate(self.scores):
            d[f"{prefix}score_k{i}"] = primary(s)
        return d

    def as_row(self) -> dict[str, object]:
        """One row of the callback's trigger CSV, in its schema's column order (scores and coefficients as
        JSON lists)."""
        from opd_dynamics.schema import TABLES

        row = asdict(self)
        row["tie"] = self.tie
        row["scores"] = json.dumps(self.scores)
        row["coefs"] = json.dumps(self.coefs)
        return {c: row[c] for c in TABLES["callback_triggers"].names}


class EffOPD:
    """Adaptive extrapolation along the recent update direction; call `after_step(step)` after each optimizer step.

    Args:
        model: any module; its selected parameters are changed in place.
        score_fn: `score_fn(model) -> float`, higher is better (held-out accuracy, −reverse KL …). Called
            under `torch.no_grad()`; the module's train/eval mode is restored afterwards.
        options: what the search does (`EffOPDOptions`); keyword ``fields`` of it replace its values
            (``EffOPD(model, score, k_max=3, strict=True)``).
    """

    def __init__(self, model: torch.nn.Module, score_fn: ScoreFn | None, options: EffOPDOptions | None = None,
                 **fields) -> None:
        self.model, self.score_fn = model, score_fn
        self.options = replace(options or EffOPDOptions(), **fields)
        self.options.check_scorer(score_fn)
        self.trigger = self.options.trigger()
        self.params = select_parameters(model, self.options)
        _refuse_sharded_or_adapter(self.model, self.params)
        if not self.params:
            raise ValueError(f"no parameters selected for extrapolation (groups={self.options.groups})")
        self.records: list[TriggerRecord] = []
        self.anchor: dict[str, torch.Tensor] = {}
        self.reset_anchor()

    # -- state ----------------------------------------------------------------------------------
    def _store(self, p: torch.Tensor) -> torch.device:
        return torch.device(self.options.anchor_device) if self.options.anchor_device is not None else p.device

    def reset_anchor(self) -> None:
        """Make the model's current weights the anchor (done at construction: the anchor starts as W_0)."""
        with torch.no_grad():
            for n, p in self.params.items():
                self.anchor[n] = p.detach().to(self._store(p), dtype=update_dtype(p), copy=True)

    def anchor_state(self) -> dict[str, torch.Tensor]:
        """The anchor in each parameter's dtype (exact: the anchor is weights the parameters held), on CPU."""
        return {n: self.anchor[n].to("cpu", p.dtype).contiguous() for n, p in self.params.items()}

    def load_anchor(self, saved: dict[str, torch.Tensor]) -> None:
        """Restore an `anchor_state()`; its tensors must match the selected parameters."""
        missing = sorted(set(self.params) - set(saved))
        if missing or any(saved[n].shape != p.shape for n, p in self.params.items()):
            raise ValueError(f"the saved EffOPD anchor does not match the model's selected parameters "
                             f"(missing {missing[:3]} or shapes differ)")
        for n, p in self.params.items():
            self.anchor[n] = saved[n].to(self._store(p), update_dtype(p))

    def should_trigger(self, step: int) -> bool:
        return bool(self.trigger(step))

    def after_step(self, step: int) -> TriggerRecord | None:
        """Call after optimizer step `step` (1-based); runs the search when the schedule says so."""
        return self.search(step) if self.should_trigger(step) else None

    # -- the search -----------------------------------------------------------------------------
    def _score(self) -> Score:
        was_training = self.model.training
        try:
            with torch.no_grad():
                s = self.score_fn(self.model)  # type: ignore[misc]
                s = tuple(map(float, s)) if isinstance(s, (tuple, list)) else float(s)
        finally:
            self.model.train(was_training)
        return s

    @torch.no_grad()
    def _set(self, wt: dict[str, torch.Tensor], coef: float) -> None:
        """Parameters ← W_t + coef·(W_t − anchor), in float32 (float64), cast to each parameter's dtype."""
        for n, p in self.params.items():
            a = self.anchor[n].to(p.device, non_blocking=True)
            p.copy_(jump(a, wt[n].to(p.device), coef, update_dtype(p)).to(p.dtype))

    @torch.no_grad()
    def _restore(self, wt: dict[str, torch.Tensor]) -> None:
        for n, p in self.params.items():
            p.copy_(wt[n].to(p.device))

    @torch.no_grad()
    def search(self, step: int) -> TriggerRecord:
        """Run one trigger now and leave the model at the accepted weights (which become the anchor)."""
        t0 = time.perf_counter()
        wt = {n: p.detach().to(self._store(p), copy=True) for n, p in self.params.items()}  # exact bits of W_t
        sq = 0.0
        for n, p in self.params.items():
            sq += fro2(wt[n].to(update_dtype(p)) - self.anchor[n].to(wt[n].device))
        delta_norm = math.sqrt(sq)
        val_s = 0.0
        scores: list[Score] = []
        coefs: list[float] = [0.0]
        if self.options.fixed_k is not None:
            k_acc = self.options.fixed_k
            coefs = [0.0, self.options.coef_step * k_acc]
            if k_acc:
                self._set(wt, self.options.coef_step * k_acc)
        else:
            def score_k(k: int) -> Score:
                nonlocal val_s
                if k:
                    self._set(wt, self.options.coef_step * k)
                v0 = time.perf_counter()
                s = self._score()
                val_s += time.perf_counter() - v0
                return s

            try:
                k_acc, scores = published_search(score_k, self.options.k_max, strict=self.options.strict)
            except BaseException:  # a failing or interrupted scorer must not leave a candidate in the model
                self._restore(wt)
                raise
            coefs = [self.options.coef_step * k for k in range(len(scores))]
            current = len(scores) - 1  # the candidate the parameters hold now
            if current != k_acc:
                if k_acc == 0:
                    self._restore(wt)
                else:
                    self._set(wt, self.options.coef_step * k_acc)
        wt.clear()  # the copy of W_t is no longer needed
        self.reset_anchor()
        rec = TriggerRecord(step=step, scores=scores, coefs=coefs, k_accepted=k_acc,
                            coef=self.options.coef_step * k_acc, delta_norm=delta_norm, validation_s=val_s,
                            extrapolate_s=time.perf_counter() - t0 - val_s,
                            mode="fixed" if self.options.fixed_k is not None else "adaptive")
        if rec.tie:
            _log.warning("step %s: %s", step, rec.tie_note())
        self.records.append(rec)
        return rec

    def records_frame(self):
        """All triggers so far as a DataFrame (one row per trigger; the callback writes it as CSV)."""
        import pandas as pd

        from opd_dynamics.schema import TABLES

        return pd.DataFrame([r.as_row() for r in self.records], columns=TABLES["callback_triggers"].names)

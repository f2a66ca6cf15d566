"""Predicting a run's weights from its observed checkpoints, every method of `opd_dynamics.extrapolate.registry`
behind one interface: `extrapolate(series, target, out, options)` writes the predicted model directory.

Each of the authors' methods runs as their code does by default (its own selection of what moves, what the other
tensors become, its time axis and fit); docs/EXTRAPOLATION.md has a table per method of what their code does, what
the toolkit does and every difference. What the toolkit always does differently: one tensor at a time, read in row
blocks (`io.rows.row_blocks`), float64 arithmetic (the authors subtract in fp16 (RELEX) or compute in bf16
(ExPO) or fp32), the result rounded once to the stored dtype of the tensor it replaces, written as sharded
safetensors with the method, its parameters and the sources in every shard's metadata, atomically, never into an
input, never with NaN or Inf.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from opd_dynamics.effopd.options import SELECTS, resolve_select
from opd_dynamics.errors import InputError
from opd_dynamics.extrapolate import predict as P
from opd_dynamics.extrapolate.registry import METHODS, Method, method, owners
from opd_dynamics.fields import option
from opd_dynamics.io.model_dir import FLOAT_DTYPES
from opd_dynamics.io.naming import MATRIX_GROUPS, is_selected
from opd_dynamics.io.series import FOREIGN_MEDIAN, CheckpointSeries, check_same_architecture, median_relative_distance
from opd_dynamics.io.writer import DEFAULT_SHARD_BYTES, MODEL, check_output, write_model

#: the values ``fit`` takes (which method takes which: `registry.Method.fits`)
FITS = ("two-point", "lstsq", "linear", "polynomial", "sin_fft")
TIMES = ("positions", "steps")
#: bytes of one row block (a monkeypatch of 1 reads one row per block)
BLOCK_BYTES = 64 << 20
#: the values of the method parameters when they are not given (None)
DEFAULT_K, DEFAULT_COEF_STEP, DEFAULT_RANK, DEFAULT_DEGREE = 1, 2.0, 1, 2
MIN_STEPS = {m: method(m).min_steps for m in METHODS}


def _by(name: str) -> str:
    return " and ".join(owners(name))


@dataclass(frozen=True)
class ExtrapolationOptions:
    """Which method, its parameters, and which tensors move (each field a flag of `extrapolate`). A parameter of
    one method is None unless given, and refused with any other method: it would be ignored."""

    method: str = option("relex", "One of " + ", ".join(METHODS) + " (docs/EXTRAPOLATION.md).", choices=METHODS)
    select: str | None = option(None, "What moves: published (the authors' methods' default), the method's own rule "
                                "as its authors' code has it; groups (the toolkit's methods' default, implied by "
                                "--groups and --matrices-only/--all-shapes), the toolkit's naming groups.",
                                choices=SELECTS)
    groups: tuple[str, ...] | None = option(MATRIX_GROUPS, "With select groups: naming groups that move ('all': "
                                            "every group).", cli="groups", metavar="GROUP,...")
    matrices_only: bool = option(True, "With select groups: only 2-D weights move (--all-shapes: biases, norms … of "
                                 "those groups too).", flag="--matrices-only/--all-shapes")
    alpha: float | None = option(None, f"{_by('alpha')}'s α (expo: required, ExPO's README suggests 0.3–0.5; "
                                 "last-segment: default (t* − t_B)/(t_B − t_A)).")
    k: int | None = option(None, f"{_by('k')}'s fixed k (coef = coef_step·k; default {DEFAULT_K}).", min=0)
    coef_step: float | None = option(None, f"{_by('coef_step')}'s 2 in 2k (default {DEFAULT_COEF_STEP:g}).")
    fit: str | None = option(None, "linear: two-point (default, their code) or lstsq (the toolkit's); relex: linear "
                             "(default), polynomial or sin_fft.", choices=FITS)
    rank: int | None = option(None, f"{_by('rank')}'s number of temporal components r (default {DEFAULT_RANK}).",
                              min=1)
    degree: int | None = option(None, f"{_by('degree')}'s polynomial degree with fit polynomial (default "
                                f"{DEFAULT_DEGREE}).", min=1)
    window: int | None = option(None, f"{_by('window')}'s --window: fit on the last W observed steps (default: all).",
                                min=2)
    refit: int | None = option(None, f"{_by('refit')}'s --future_extrapolation_window F: predict one step at a time, "
                               "appending each prediction to the window and refitting every F steps (default: fit "
                               "once).", min=1)
    time: str | None = option(None, f"{_by('time')}'s abscissae: positions 0 … W−1 (default, their code) or steps "
                              "(the toolkit's: the observed step numbers).", choices=TIMES)
    target_scale: float | None = option(None, f"{_by('target_scale')}'s --target_step_scaling_factor (default: 2 when "
                                        "the base's path names Qwen2.5-Math-1.5B, else 1, as their code infers it).")
    scores: str | Mapping[int, float] | None = option(None, f"{_by('scores')}: a CSV with columns step and score (or "
                                                      "accuracy), one row per observed step (AlphaRL's per-step "
                                                      "accuracies); in Python also a {step: score} mapping.")
    target_score: float | None = option(None, f"{_by('target_score')}: the score to predict the weights at "
                                        "(AlphaRL's --y_predict).")
    ckpt_step: int | None = option(None, f"{_by('ckpt_step')}: the observed step whose weights are the container "
                                   "(AlphaRL's --ckpt_step; default the last observed step).", min=1)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(None, f"method must be one of {', '.join(METHODS)}, not {self.method!r}", ("method",))
        m = method(self.method)
        if isinstance(self.groups, Sequence) and not isinstance(self.groups, (tuple, str)):
            object.__setattr__(self, "groups", tuple(self.groups))
        for f in dataclasses.fields(self):
            who = owners(f.name) if f.name != "fit" else ()
            if who and getattr(self, f.name) is not None and self.method not in who:
                raise InputError(None, f"{f.name} applies to method {' or '.join(who)}, not {self.method}",
                                 (f.name, "method"))
        if self.fit is not None and self.fit not in m.fits:
            raise InputError(None, f"fit {self.fit!r} does not apply to method {self.method} (it takes "
                                   f"{', '.join(m.fits)})" if m.fits else
                             f"fit does not apply to method {self.method}", ("fit", "method"))
        if self.degree is not None and self.fit != "polynomial":
            raise InputError(None, "degree applies to method relex with fit polynomial", ("degree", "fit", "method"))
        if self.time == "steps" and (self.refit is not None or self.fit == "sin_fft"):
            raise InputError(None, "time steps (the toolkit's) takes neither refit nor fit sin_fft (RELEX's "
                                   "autoregressive refit and FFT start count positions)", ("time", "refit", "fit"))
        if self.refit is not None and self.target_scale not in (None, 1.0):
            raise InputError(None, "target_scale other than 1 does not apply with refit (RELEX refuses it)",
                             ("target_scale", "refit"))
        for name in ("alpha", "coef_step", "target_scale", "target_score"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise InputError(None, f"{name} must be a finite number, got {v}", (name,))
        if self.coef_step is not None and self.coef_step <= 0:
            raise InputError(None, f"coef_step must be positive, got {self.coef_step}", ("coef_step",))
        if self.target_scale is not None and self.target_scale <= 0:
            raise InputError(None, f"target_scale must be positive, got {self.target_scale}", ("target_scale",))
        self.selection  # noqa: B018 - refuses groups with select published, and select published for the toolkit's

    @property
    def spec(self) -> Method:
        return method(self.method)

    @property
    def selection(self) -> str:
        """'published' (the authors' rule for the method) or 'groups' (the toolkit's naming groups and shapes)."""
        m = self.spec
        sel = resolve_select(self.select, self.groups, self.matrices_only,
                             "published" if m.published else "groups")
        if sel == "published" and not m.published:
            raise InputError(None, f"select published applies to the authors' methods; {self.method} is the "
                                   "toolkit's own (it moves the toolkit's groups)", ("select", "method"))
        return sel

    def value(self, name: str):
        """A method parameter as used: its value, or its default when not given."""
        v = getattr(self, name)
        if v is not None:
            return v
        return {"k": DEFAULT_K, "coef_step": DEFAULT_COEF_STEP, "rank": DEFAULT_RANK, "degree": DEFAULT_DEGREE,
                "time": "positions", "fit": self.spec.fits[0] if self.spec.fits else None}.get(name)

    def ckpt_index(self, t: np.ndarray) -> int:
        """The index of the container step among the observed steps ``t`` (alpharl)."""
        return len(t) - 1 if self.ckpt_step is None else int(np.flatnonzero(t == self.ckpt_step)[0])

    def selector(self, tied: Mapping[str, str]):
        """(name, shape) → moves, under the rule in force (``tied``: the base's tied names)."""
        if self.selection == "published":
            rule = self.spec.select
            return lambda n, shape: rule(n, shape, tied)
        return lambda n, shape: is_selected(n, shape, self.groups, self.matrices_only)

    def selection_text(self) -> str:
        if self.selection == "published":
            return f"{self.method}'s published rule ({self.spec.moves})"
        what = "all groups" if self.groups is None else "groups " + ",".join(self.groups)
        return f"{'matrix' if self.matrices_only else 'tensor'} in {what}"


def read_scores(scores: str | Path | Mapping[int, float], steps: Sequence[int]) -> np.ndarray:
    """One finite score per observed step, from a mapping or a CSV with columns step and score (or accuracy)."""
    import pandas as pd

    if isinstance(scores, Mapping):
        table, where = {int(k): float(v) for k, v in scores.items()}, None
    else:
        where = Path(scores)
        try:
            df = pd.read_csv(where)
        except (OSError, ValueError) as e:
            raise InputError(where, f"cannot be read as a CSV of scores ({e})") from None
        col = "score" if "score" in df.columns else "accuracy" if "accuracy" in df.columns else None
        if "step" not in df.columns or col is None:
            raise InputError(where, f"needs columns step and score (or accuracy); it has {', '.join(map(str, df))}")
        if "run" in df.columns and df["step"].duplicated().any():
            raise InputError(where, "holds several runs (a step repeats); give one run's scores")
        table = dict(zip(df["step"].astype(int), df[col].astype(float)))
    missing = [s for s in steps if s not in table]
    if missing:
        raise InputError(where, f"has no score for observed step {missing[0]} (alpharl needs one per observed step)",
                         ("scores",))
    y = np.array([table[s] for s in steps], dtype=np.float64)
    if not np.all(np.isfinite(y)):
        raise InputError(where, f"holds a score that is not a finite number ({y[~np.isfinite(y)][0]}) at an observed "
                                "step", ("scores",))
    if np.ptp(y) == 0:
        raise InputError(where, f"gives every observed step the same score ({y[0]:g}): AlphaRL's PLS has nothing to "
                                "fit", ("scores",))
    return y


def _tied(base) -> dict[str, str]:
    return {h: e for h, e in base.tied_names().items() if e in base}


def predicted_tensors(series: CheckpointSeries, target: int | None, opts: ExtrapolationOptions,
                      scores: np.ndarray | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the method's container (the last observed step, the base or the container
    step): the prediction where the selection moves it, else the container's own."""
    spec = opts.spec
    t = np.asarray(series.step_numbers, dtype=np.float64)
    base = series.open_full(series.base)
    readers = [series.open_full(p) for _, p in series.steps]
    keep_at = {"last": len(readers) - 1, "base": None, "ckpt": opts.ckpt_index(t)}[spec.keep]
    keep = base if keep_at is None else readers[keep_at]
    keep_path = series.base if keep_at is None else series.steps[keep_at][1]
    ctx = P.Context(base, readers, t, target, opts, str(series.base), scores, BLOCK_BYTES)
    tied = _tied(base)
    moves = opts.selector(tied)
    follows = tied if opts.selection == "published" and spec.name == "relex" else {}  # a tied head: its embedding
    cache: dict[str, torch.Tensor] = {}

    def predicted(name: str, dtype: torch.dtype) -> torch.Tensor:
        if name in cache:
            return cache[name].to(dtype, copy=True)
        pred = spec.predict(ctx, name)
        if not bool(torch.isfinite(pred).all()):  # float64 from finite weights does not overflow: an input
            raise _nonfinite_input(series, [base, *readers], name, opts.method)
        w = pred.reshape(base.shape(name)).to(dtype)
        if not bool(torch.isfinite(w).all()):
            at = f"at step {target}" if target is not None else f"for {_goal(opts)}"
            raise InputError(None, f"method {opts.method} predicts values beyond {str(w.dtype).split('.')[-1]} "
                                   f"for {name!r} (up to {float(pred.abs().max()):.2g}) {at}; nothing was "
                                   "written", ("target", "method"))
        if name in follows.values():
            cache[name] = w
        return w

    def movable(name: str) -> bool:
        e = keep.entries[name]
        return e.dtype in FLOAT_DTYPES and moves(name, e.shape) and \
            all(name in r and r.shape(name) == e.shape for r in (base, *readers))

    try:
        for name in keep.names():
            src = follows.get(name)
            if src is not None and movable(src) and keep.shape(name) == base.shape(src):
                yield name, predicted(src, keep.dtype(name))
            elif movable(name):
                yield name, predicted(name, keep.dtype(name))
            else:
                w = keep.get(name)
                if w.is_floating_point() and not bool(torch.isfinite(w).all()):
                    raise InputError(keep_path, f"holds NaN or Inf in {name!r}, which the output copies; nothing was "
                                                "written")
                yield name, w
    finally:
        for r in (base, *readers):
            r.close()


def _goal(opts: ExtrapolationOptions) -> str:
    if opts.spec.target == "score":
        return f"target score {opts.target_score:g}"
    return f"alpha {opts.alpha:g}" if opts.alpha is not None else f"coef {opts.value('coef_step') * opts.value('k'):g}"


def _nonfinite_input(series: CheckpointSeries, models: list, name: str, method_name: str) -> InputError:
    """The refusal of a prediction that came out NaN or Inf: naming the base or step that holds NaN or Inf."""
    for path, m in zip([series.base, *(p for _, p in series.steps)], models):
        if not bool(torch.isfinite(m.get(name)).all()):
            return InputError(path, f"holds NaN or Inf in {name!r}, so method {method_name} predicts NaN or Inf for "
                                    "it; nothing was written")
    return InputError(None, f"method {method_name} predicts NaN or Inf for {name!r}; nothing was written", ("method",))


def check_selection(series: CheckpointSeries, opts: ExtrapolationOptions) -> None:
    """Refuse a selection that moves no tensor (the output would be a copy under the method's label) and, for the
    methods that move a rank-1 part of each update (alpharl, rank1-growth), one that moves tensors that are not
    matrices."""
    path = series.steps[-1][1]
    with series.open_full(series.base) as base:
        tied = _tied(base)
    with series.open_full(path) as last:
        moves = opts.selector(tied)
        sel = [(n, tuple(e.shape)) for n, e in last.entries.items() if e.dtype in FLOAT_DTYPES and moves(n, e.shape)]
    if not sel:
        if opts.selection == "published":
            raise InputError(path, f"has no float tensor that {opts.selection_text()} moves; the output would be a "
                                   f"copy (see select and groups)", ("select", "groups"))
        raise InputError(path, f"has no float {opts.selection_text()} for method {opts.method} to move (see groups "
                               f"and matrices_only); the output would be a copy of step {series.step_numbers[-1]}",
                         ("groups", "matrices_only"))
    if opts.spec.matrices:
        bad = [(n, shape) for n, shape in sel if len(shape) != 2]
        if bad:
            raise InputError(None, f"method {opts.method} moves matrices only (the rank-1 part of each update), but "
                                   f"matrices_only=False selects {bad[0][0]!r} of shape {bad[0][1]}; leave out "
                                   "matrices_only=False", ("matrices_only", "method"))


def check_same_model(series: CheckpointSeries, opts: ExtrapolationOptions) -> None:
    """Refuse steps that cannot belong to one run from ``series.base``: another architecture (config.json), a
    moved tensor of another shape, or weights at least `io.series.FOREIGN_MEDIAN` of its norm away from the base
    (the one rule every command applies; read here on the base's largest moved matrix, one tensor per step)."""
    check_same_architecture(series)
    base = series.open_full(series.base)
    try:
        moves = opts.selector(_tied(base))
        sel = [n for n in base.names() if base.entries[n].dtype in FLOAT_DTYPES and moves(n, base.shape(n))]
        mats = [n for n in sel if len(base.shape(n)) == 2] or sel
        probe = max(mats, key=lambda n: math.prod(base.shape(n)), default=None)
        w0 = base.get(probe).to(torch.float64) if probe else None
        for _, path in series.steps:
            with series.open_full(path) as m:
                for n in sel:
                    if n in m and tuple(m.shape(n)) != tuple(base.shape(n)):
                        raise InputError(path, f"holds {n} of shape {tuple(m.shape(n))}, the base "
                                               f"{tuple(base.shape(n))}: not a checkpoint of a run from this base")
                if probe and probe in m:
                    ratio = median_relative_distance([(m.get(probe), w0)])
                    if ratio >= FOREIGN_MEDIAN:
                        raise InputError(path, f"is {ratio:.2f}× the base's norm away from the base {series.base} on "
                                               f"{probe}: not a checkpoint of a run from this base")
    finally:
        base.close()


def check_run(series: CheckpointSeries, target: int | None, opts: ExtrapolationOptions) -> np.ndarray | None:
    """The method's needs against the series: enough observed steps, a target of the kind it takes, its required
    parameters; returns the scores (alpharl) or None."""
    m = opts.spec
    steps = series.step_numbers
    need = m.min_steps
    if m.name == "relex":
        fit = opts.value("fit")
        need = max(need, {"linear": 2, "polynomial": opts.value("degree") + 1, "sin_fft": 4}[fit])
        w = len(steps) if opts.window is None else min(opts.window, len(steps))
        if len(steps) >= need and w < need:
            raise InputError(None, f"window {opts.window} leaves {w} observed steps to fit, fit {fit} needs {need}",
                             ("window", "fit"))
        if opts.value("rank") > len(steps):
            raise InputError(None, f"rank {opts.rank} exceeds the {len(steps)} observed steps (RELEX's temporal "
                                   "components are at most the observed steps)", ("rank",))
    if len(steps) < need:
        raise InputError(None, f"method {m.name} needs at least {need} observed steps besides the base, run "
                               f"{series.name!r} has {len(steps)}", ("method",))
    if steps[0] <= 0:
        raise InputError(series.steps[0][1], f"is step {steps[0]}; observed steps must be after the base (step 0)")
    if m.target == "step" or (m.target == "step-or-alpha" and opts.alpha is None):
        if target is None:
            raise InputError(None, f"method {m.name} needs a target step", ("target",))
        if target <= steps[-1]:
            raise InputError(None, f"target step {target} must lie after the last observed step {steps[-1]}",
                             ("target",))
    elif target is not None:
        why = {"none": "its jump is fixed by its parameters", "score": "it predicts at a target score",
               "step-or-alpha": "alpha fixes its jump"}[m.target]
        raise InputError(None, f"method {m.name} takes no target step ({why})", ("target", "method"))
    if m.name == "expo" and opts.alpha is None:
        raise InputError(None, "method expo needs alpha (ExPO's --alpha is required; its README suggests 0.3–0.5)",
                         ("alpha",))
    if m.name == "alpharl":
        if opts.scores is None or opts.target_score is None:
            raise InputError(None, "method alpharl needs scores (one per observed step) and target_score",
                             ("scores", "target_score"))
        if opts.ckpt_step is not None and opts.ckpt_step not in steps:
            raise InputError(None, f"ckpt_step {opts.ckpt_step} is not an observed step (observed: "
                                   f"{', '.join(map(str, steps))})", ("ckpt_step",))
        return read_scores(opts.scores, steps)
    return None


def extrapolate(series: CheckpointSeries, target: int | None, out: str | Path,
                options: ExtrapolationOptions | None = None, *, overwrite: bool = False,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES, **fields) -> Path:
    """Write the weights ``options.method`` predicts from the observed steps of ``series`` (its base is step 0) to the
    model directory ``out``: at step ``target`` for the methods that take one (None for the fixed jumps expo and
    effopd and for alpharl, which predicts at ``target_score``). Sharded safetensors with the sources, the method
    and its parameters in the metadata, written under a temporary name, never into an input."""
    opts = dataclasses.replace(options or ExtrapolationOptions(), **fields)
    scores = check_run(series, target, opts)
    check_output(out, MODEL, overwrite=overwrite, inputs=[series.base, *(p for _, p in series.steps)])
    check_selection(series, opts)
    check_same_model(series, opts)
    keep = {"last": series.steps[-1][1], "base": series.base,
            "ckpt": dict(series.steps)[series.step_numbers[opts.ckpt_index(np.asarray(series.step_numbers))]]}
    meta = {"extrapolation_method": opts.method, "extrapolation_select": opts.selection,
            "extrapolation_target": "" if target is None else str(target),
            "extrapolation_steps": ",".join(map(str, series.step_numbers)),
            "extrapolation_base": str(Path(series.base).resolve()),
            "extrapolation_sources": ",".join(str(Path(p).resolve()) for _, p in series.steps),
            "extrapolation_options": repr({k: v for k, v in asdict(opts).items()})}
    if scores is not None:
        meta["extrapolation_scores"] = ",".join(f"{y:.17g}" for y in scores)
    return write_model(predicted_tensors(series, target, opts, scores), out, metadata=meta,
                       copy_files_from=keep[opts.spec.keep], max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def observed(series: CheckpointSeries, keep: Sequence[int]) -> CheckpointSeries:
    """The series restricted to the steps ``keep`` (a subset the methods fit on)."""
    found = dict(series.steps)
    missing = sorted(set(keep) - set(found))
    if missing:
        raise InputError(None, f"run {series.name!r} has no step {missing[0]} (its steps: "
                               f"{', '.join(map(str, found))})", ("steps",))
    return dataclasses.replace(series, steps=[(s, found[s]) for s in sorted(set(keep))])

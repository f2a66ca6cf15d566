"""What each extrapolator computes, per tensor, from the observed steps t_1 < … < t_n of a series (base W_0 at
step 0, D_i = W_{t_i} − W_0), for a target step t* > t_n, as the authors' code does (docs/EXTRAPOLATION.md
says where this differs):

- ``expo`` (ExPO): W_B + α(W_B − W_A), A and B the last two observed steps (with one observed step, A is the
  base: ExPO's published θ_B + α(θ_B − θ_start)); α fixed (``alpha``), by default (t* − t_B)/(t_B − t_A), the α
  that continues the last segment's pace to t*.
- ``effopd``: W_B + coef_step·k·(W_B − W_A) with a fixed k (EffOPD's candidate k without the search; A as expo's).
- ``linear`` (RLVR-Linearity): ``fit='two-point'`` (their code): W_0 + ((t* − 0)/(t_n − 0))·D_n, the line through
  the base and the last step; ``fit='lstsq'``: per entry, the least-squares line through the base and every
  observed step, evaluated at t*.
- ``relex`` (RELEX): the stacked deltas M (n × numel, not centred) have Gram G = M Mᵀ; its top ``rank``
  eigenpairs give coefficients c_j(t_i) = σ_j u_ij and directions v_j = Mᵀu_j / σ_j; each c_j is fitted
  linearly (or by a polynomial of ``degree``) in the step number and the prediction is W_0 + Σ_j ĉ_j(t*) v_j.
  (RELEX fits against positions 0 … n−1; with evenly spaced checkpoints that is the same line.)
- ``alpharl`` (AlphaRL's rank-1 model): W_0 + α·‖D_n‖F·u_1 v_1ᵀ, u_1, v_1 the top singular vectors of D_n, with
  α = t*/t_n (the rank-1 update, norm-matched as in their upd_rank.py, grown linearly in time). Their
  accuracy-regression step (PLS against benchmark scores) needs evaluations and is not reproduced.

Tensors outside the selection (default: attention and MLP matrices, as EffOPD) are copied from the last
observed step. Deltas are formed in float64; results are cast to the last step's stored dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from opd_dynamics.analysis.metrics.spectrum import decompose
from opd_dynamics.errors import InputError
from opd_dynamics.fields import option
from opd_dynamics.io.model_dir import FLOAT_DTYPES, ModelDir
from opd_dynamics.io.naming import MATRIX_GROUPS, is_selected, stored_transposed
from opd_dynamics.io.reader import open_full_weights
from opd_dynamics.io.series import CheckpointSeries, check_same_architecture
from opd_dynamics.io.writer import DEFAULT_SHARD_BYTES, MODEL, check_output, write_model
from opd_dynamics.numerics import fro2

METHODS = ("expo", "effopd", "linear", "relex", "alpharl")
FITS = ("two-point", "lstsq", "linear", "polynomial")
#: the observed steps each method needs at least (besides the base); expo and effopd with one step jump from the
#: base: A = W_0, B = the step (ExPO's published form: θ_B + α(θ_B − θ_start))
MIN_STEPS = {"expo": 1, "effopd": 1, "linear": 1, "relex": 2, "alpharl": 1}
BLOCK_BYTES = 64 << 20
#: the values of the method-specific options when they are not given (None)
DEFAULT_K, DEFAULT_COEF_STEP, DEFAULT_RANK, DEFAULT_DEGREE = 1, 2.0, 1, 2


@dataclass(frozen=True)
class ExtrapolationOptions:
    """Which method, its parameters, and which tensors move (each field a flag of `extrapolate`). A parameter of
    one method (``methods`` in its field's metadata) is None unless given, and refused with any other method: it
    would be ignored."""

    method: str = option("relex", "expo | effopd | linear | relex | alpharl.", choices=METHODS)
    alpha: float | None = option(None, "expo's α (default: (t* − t_B)/(t_B − t_A), continuing the last segment).",
                                 methods=("expo",))
    k: int | None = option(None, f"effopd's fixed k (coef = coef_step·k; default {DEFAULT_K}).", min=0,
                           methods=("effopd",))
    coef_step: float | None = option(None, f"effopd's 2 in 2k (default {DEFAULT_COEF_STEP:g}).", methods=("effopd",))
    fit: str | None = option(None, "linear: two-point (default, their code) or lstsq; relex: linear (default) or "
                             "polynomial.", choices=FITS)
    rank: int | None = option(None, f"relex's number of temporal components r (default {DEFAULT_RANK}).", min=1,
                              methods=("relex",))
    degree: int | None = option(None, f"relex's polynomial degree with fit polynomial (default {DEFAULT_DEGREE}).",
                                min=1, methods=("relex",))
    groups: tuple[str, ...] | None = option(MATRIX_GROUPS, "Naming groups that move ('all': every group).",
                                            cli="groups", metavar="GROUP,...")
    matrices_only: bool = option(True, "Only 2-D weights move (--all-shapes: biases, norms … of those groups too).",
                                 flag="--matrices-only/--all-shapes")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(None, f"method must be one of {METHODS}, not {self.method!r}", ("method",))
        ok = {"linear": (None, "two-point", "lstsq"), "relex": (None, "linear", "polynomial")}.get(self.method, (None,))
        if self.fit not in ok:
            raise InputError(None, f"fit {self.fit!r} does not apply to method {self.method} (it takes "
                                   f"{', '.join(x for x in ok if x)})" if len(ok) > 1 else
                             f"fit does not apply to method {self.method}", ("fit", "method"))
        for f in dataclasses.fields(self):
            methods = f.metadata.get("methods")
            if methods and getattr(self, f.name) is not None and self.method not in methods:
                raise InputError(None, f"{f.name} applies to method {' or '.join(methods)}, not {self.method}",
                                 (f.name, "method"))
        if self.degree is not None and self.fit != "polynomial":
            raise InputError(None, "degree applies to method relex with fit polynomial", ("degree", "fit", "method"))

    def value(self, name: str):
        """A method parameter as used: its value, or its default when not given."""
        v = getattr(self, name)
        defaults = {"k": DEFAULT_K, "coef_step": DEFAULT_COEF_STEP, "rank": DEFAULT_RANK, "degree": DEFAULT_DEGREE}
        return defaults.get(name) if v is None else v


def _row_ranges(n_rows: int, row_numel: int, n_steps: int) -> list[tuple[int, int]]:
    step = max(1, BLOCK_BYTES // max(1, (n_steps + 2) * row_numel * 8))
    return [(lo, min(lo + step, n_rows)) for lo in range(0, n_rows, step)] or [(0, 0)]


def _fit_predict(t: np.ndarray, y: np.ndarray, target: float, degree: int) -> np.ndarray:
    """Least-squares polynomial of ``degree`` through (t, y) per column of y (n × m), evaluated at target."""
    X = np.vander(t, degree + 1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    return np.vander(np.array([target], dtype=np.float64), degree + 1) @ coef


class _Tensor:
    """One tensor across the base and the observed steps, read in row blocks (float64)."""

    def __init__(self, base: ModelDir, steps: list[ModelDir], name: str):
        self.base, self.steps, self.name = base, steps, name
        self.shape = tuple(steps[-1].shape(name))
        self.n_rows = self.shape[0] if self.shape else 1
        self.row_numel = math.prod(self.shape[1:]) if self.shape else 1

    def rows(self, m: ModelDir, lo: int, hi: int) -> torch.Tensor:
        return (m.get_rows(self.name, lo, hi) if self.shape else m.get(self.name).reshape(1)).to(torch.float64)

    def blocks(self, which: slice = slice(None)) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """(lo, hi, W_0 rows, D rows of the steps ``which`` selects, stacked (n, rows, …)): only those are read."""
        steps = self.steps[which]
        for lo, hi in _row_ranges(self.n_rows, self.row_numel, len(steps)):
            w0 = self.rows(self.base, lo, hi)
            yield lo, hi, w0, torch.stack([self.rows(m, lo, hi) - w0 for m in steps])


def _predict(opts: ExtrapolationOptions, x: _Tensor, t: np.ndarray, target: float, model_type: str | None
             ) -> torch.Tensor:
    """The predicted tensor at ``target`` in float64, stored orientation."""
    out = torch.empty(x.shape or (1,), dtype=torch.float64)
    m = opts.method
    if m in ("expo", "effopd"):
        t_a = t[-2] if len(t) > 1 else 0.0  # one observed step: A is the base
        alpha = (opts.value("coef_step") * opts.value("k") if m == "effopd" else
                 opts.alpha if opts.alpha is not None else (target - t[-1]) / (t[-1] - t_a))
        for lo, hi, w0, d in x.blocks(slice(-2, None)):  # A and B only
            wb = w0 + d[-1]
            wa = w0 + d[-2] if len(d) > 1 else w0
            out[lo:hi] = wb + alpha * (wb - wa)
        return out
    if m == "linear" and opts.fit in (None, "two-point"):
        for lo, hi, w0, d in x.blocks(slice(-1, None)):  # the last step only
            out[lo:hi] = w0 + (target / t[-1]) * d[-1]
        return out
    if m == "linear":  # lstsq through the base and every step
        ts = np.concatenate([[0.0], t])
        for lo, hi, w0, d in x.blocks():
            y = np.concatenate([np.zeros((1, d[0].numel())), d.reshape(len(t), -1).numpy()])
            out[lo:hi] = w0 + torch.from_numpy(_fit_predict(ts, y, target, 1)).reshape(w0.shape)
        return out
    if m == "relex":
        g = np.zeros((len(t), len(t)))
        for _, _, _, d in x.blocks():
            flat = d.reshape(len(t), -1).numpy()
            g += flat @ flat.T
        lam, u = np.linalg.eigh(g)
        lam, u = lam[::-1], u[:, ::-1]
        r = min(opts.value("rank"), len(t))
        sig = np.sqrt(np.clip(lam[:r], 0.0, None))
        keep = sig > 1e-6 * max(sig[0], 1e-300)
        coefs = u[:, :r] * sig  # c_j(t_i) = σ_j u_ij
        degree = 1 if opts.fit in (None, "linear") else opts.value("degree")
        c_hat = _fit_predict(t, coefs, target, degree)[0]
        for lo, hi, w0, d in x.blocks():
            flat = d.reshape(len(t), -1).numpy()
            pred = np.zeros(flat.shape[1])
            for j in range(r):
                if keep[j]:
                    pred += c_hat[j] * (flat.T @ u[:, j]) / sig[j]
            out[lo:hi] = w0 + torch.from_numpy(pred).reshape(w0.shape)
        return out
    # alpharl: the rank-1 part of D_n, norm-matched, grown linearly in time
    w0 = x.rows(x.base, 0, x.n_rows)
    dn = x.rows(x.steps[-1], 0, x.n_rows) - w0
    mat = dn.mT if stored_transposed(x.name, x.shape, model_type) else dn
    dec = decompose(mat, k_vectors=1, mode="exact")
    if dec.U is None:
        return w0 + dn
    r1 = math.sqrt(dec.fro2) * (dec.U[:, :1] @ dec.V[:, :1].T)
    return w0 + (target / t[-1]) * (r1.mT if mat is not dn else r1)


def predicted_tensors(series: CheckpointSeries, target: int, opts: ExtrapolationOptions
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the last observed step: predicted at ``target`` where selected."""
    t = np.asarray(series.step_numbers, dtype=np.float64)
    base = open_full_weights(series.base, series.load_mode, series.prefer_format)
    readers = [open_full_weights(p, series.load_mode, series.prefer_format) for _, p in series.steps]
    last = readers[-1]
    model_type = last.config.get("model_type")
    try:
        for name in last.names():
            e = last.entries[name]
            move = e.dtype in FLOAT_DTYPES and is_selected(name, e.shape, opts.groups, opts.matrices_only) and \
                all(name in r and r.shape(name) == e.shape for r in (base, *readers))
            if not move:
                w = last.get(name)
                if w.is_floating_point() and not bool(torch.isfinite(w).all()):
                    raise InputError(series.steps[-1][1], f"holds NaN or Inf in {name!r}, which the output copies; "
                                                          "nothing was written")
                yield name, w
                continue
            pred = _predict(opts, _Tensor(base, readers, name), t, float(target), model_type)
            if not bool(torch.isfinite(pred).all()):  # float64 from finite weights does not overflow: an input
                raise _nonfinite_input(series, [base, *readers], name, opts.method)
            w = pred.reshape(e.shape).to(last.dtype(name))
            if not bool(torch.isfinite(w).all()):
                raise InputError(None, f"method {opts.method} predicts values beyond {str(w.dtype).split('.')[-1]} "
                                       f"for {name!r} (up to {float(pred.abs().max()):.2g}) at step {target}; "
                                       "nothing was written", ("target", "method"))
            yield name, w
    finally:
        for r in (base, *readers):
            r.close()


def _nonfinite_input(series: CheckpointSeries, models: list, name: str, method: str) -> InputError:
    """The refusal of a prediction that came out NaN or Inf: naming the base or step that holds NaN or Inf."""
    for path, m in zip([series.base, *(p for _, p in series.steps)], models):
        if not bool(torch.isfinite(m.get(name)).all()):
            return InputError(path, f"holds NaN or Inf in {name!r}, so method {method} predicts NaN or Inf for it; "
                                    "nothing was written")
    return InputError(None, f"method {method} predicts NaN or Inf for {name!r}; nothing was written", ("method",))


def check_selection(series: CheckpointSeries, opts: ExtrapolationOptions) -> None:
    """Refuse a selection that moves no tensor of the last step (the output would be that step under the method's
    label) and, for alpharl, one that moves tensors that are not matrices (it extrapolates their rank-1 part)."""
    path = series.steps[-1][1]
    with open_full_weights(path, series.load_mode, series.prefer_format) as last:
        sel = [(n, tuple(e.shape)) for n, e in last.entries.items()
               if e.dtype in FLOAT_DTYPES and is_selected(n, e.shape, opts.groups, opts.matrices_only)]
    if not sel:
        what = "all groups" if opts.groups is None else "groups " + ",".join(opts.groups)
        raise InputError(path, f"has no float {'matrix' if opts.matrices_only else 'tensor'} in {what} for method "
                               f"{opts.method} to move (see groups and matrices_only); the output would be a copy of "
                               f"step {series.step_numbers[-1]}", ("groups", "matrices_only"))
    if opts.method == "alpharl":
        bad = [(n, shape) for n, shape in sel if len(shape) != 2]
        if bad:
            raise InputError(None, f"method alpharl moves matrices only (the rank-1 part of each update), but "
                                   f"matrices_only=False selects {bad[0][0]!r} of shape {bad[0][1]}; leave out "
                                   "matrices_only=False", ("matrices_only", "method"))


#: ‖W_t − W_0‖F / ‖W_0‖F above which a step is taken for another model than the base (two independent
#: initialisations give about √2; fine-tuning updates are orders of magnitude smaller)
FOREIGN_RATIO = 1.0


def check_same_model(series: CheckpointSeries, opts: ExtrapolationOptions) -> None:
    """Refuse steps that cannot belong to one run from ``series.base``: another architecture (config.json), a
    selected tensor of another shape, or weights further from the base than FOREIGN_RATIO of its norm (read on the
    base's largest selected matrix, one tensor per step)."""
    check_same_architecture(series)
    base = open_full_weights(series.base, series.load_mode, series.prefer_format)
    try:
        sel = [n for n in base.names() if base.entries[n].dtype in FLOAT_DTYPES and
               is_selected(n, base.shape(n), opts.groups, opts.matrices_only)]
        probe = max(sel, key=lambda n: math.prod(base.shape(n)), default=None)
        w0 = base.get(probe).to(torch.float64) if probe else None
        for _, path in series.steps:
            with open_full_weights(path, series.load_mode, series.prefer_format) as m:
                for n in sel:
                    if n in m and tuple(m.shape(n)) != tuple(base.shape(n)):
                        raise InputError(path, f"holds {n} of shape {tuple(m.shape(n))}, the base "
                                               f"{tuple(base.shape(n))}: not a checkpoint of a run from this base")
                if probe and probe in m:
                    ratio = math.sqrt(fro2(m.get(probe).to(torch.float64) - w0) / max(fro2(w0), 1e-300))
                    if ratio > FOREIGN_RATIO:
                        raise InputError(path, f"is {ratio:.2f}× the base's norm away from the base {series.base} on "
                                               f"{probe}: not a checkpoint of a run from this base")
    finally:
        base.close()


def extrapolate(series: CheckpointSeries, target: int, out: str | Path, options: ExtrapolationOptions | None = None,
                *, overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES, **fields) -> Path:
    """Write the weights ``options.method`` predicts at step ``target`` from the observed steps of ``series``
    (its base is step 0) to the model directory ``out``: sharded safetensors with the sources, the method and
    its parameters in the metadata, written under a temporary name, never into an input."""
    from dataclasses import replace

    opts = replace(options or ExtrapolationOptions(), **fields)
    steps = series.step_numbers
    need = max(MIN_STEPS[opts.method],
               opts.value("degree") + 1 if opts.method == "relex" and opts.fit == "polynomial" else 0)
    if len(steps) < need:
        raise InputError(None, f"method {opts.method} needs at least {need} observed steps besides the base, run "
                               f"{series.name!r} has {len(steps)}", ("method",))
    if steps[0] <= 0:
        raise InputError(series.steps[0][1], f"is step {steps[0]}; observed steps must be after the base (step 0)")
    if target <= steps[-1]:
        raise InputError(None, f"target step {target} must lie after the last observed step {steps[-1]}",
                         ("target",))
    check_output(out, MODEL, overwrite=overwrite, inputs=[series.base, *(p for _, p in series.steps)])
    check_selection(series, opts)
    check_same_model(series, opts)
    meta = {"extrapolation_method": opts.method, "extrapolation_target": str(target),
            "extrapolation_steps": ",".join(map(str, steps)), "extrapolation_base": str(Path(series.base).resolve()),
            "extrapolation_sources": ",".join(str(Path(p).resolve()) for _, p in series.steps),
            "extrapolation_options": repr({k: v for k, v in asdict(opts).items()})}
    return write_model(predicted_tensors(series, target, opts), out, metadata=meta,
                       copy_files_from=series.steps[-1][1], max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def observed(series: CheckpointSeries, keep: Sequence[int]) -> CheckpointSeries:
    """The series restricted to the steps ``keep`` (a subset the methods fit on)."""
    found = dict(series.steps)
    missing = sorted(set(keep) - set(found))
    if missing:
        raise InputError(None, f"run {series.name!r} has no step {missing[0]} (its steps: "
                               f"{', '.join(map(str, found))})", ("steps",))
    return CheckpointSeries.from_list([(s, found[s]) for s in sorted(set(keep))], base=series.base,
                                      name=series.name, load_mode=series.load_mode)

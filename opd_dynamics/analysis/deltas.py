"""Tensor-major streaming of updates ΔW_t = W_t − W_0 over a checkpoint series.

For each tensor, W_0 is read once and then W_t for every step, each upcast to float32 (float64 on
request) *before* subtracting: small updates vanish when subtracted in bf16. Memory holds one tensor's
base, one step and the next step being prefetched, never a whole model.
"""

from __future__ import annotations

import hashlib
import math
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

import torch

from opd_dynamics.errors import InputError
from opd_dynamics.io.model_dir import FLOAT_DTYPES, FP8_DTYPES, QUANT_SCALE_SUFFIXES, EntryReader
from opd_dynamics.io.naming import Override, TensorName, parse_name, stored_transposed
from opd_dynamics.io.reader import TensorReader
from opd_dynamics.io.rows import ROW_BLOCK_BYTES, row_blocks
from opd_dynamics.io.series import CheckpointSeries
from opd_dynamics.numerics import subtract, upcast, update_dtype

_RESIZABLE = ("embedding", "lm_head")


@dataclass(frozen=True)
class TensorPlan:
    """One tensor to analyse: where it sits, how to orient it, and at which steps it exists."""

    name: str
    info: TensorName
    shape: tuple[int, ...]  # as analysed: (out, in) after any transpose, common rows if resized
    stored_dtype: str
    transposed: bool  # stored (..., in, out): Conv1D, or (E, in, out) experts
    steps: tuple[int, ...]
    rows: int | None = None  # common vocabulary rows when the vocabulary was resized
    bytes_to_read: int = 0  # the base's bytes plus each step's, as stored (dtypes may differ)

    @property
    def resized(self) -> bool:
        return self.rows is not None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Plan:
    """What a pass over a series will read, and what it will skip (with reasons)."""

    series: CheckpointSeries
    tensors: list[TensorPlan]
    skipped: list[dict] = field(default_factory=list)
    #: {tied name: the tensor it shares}: weights stored once (or as an equal copy) under another name, analysed
    #: once, as that tensor (an LM head tied to the input embedding)
    tied: dict[str, str] = field(default_factory=dict)

    @property
    def bytes_to_read(self) -> int:
        return sum(t.bytes_to_read for t in self.tensors)


class SeriesReader:
    """Open headers of the base and every step once; read single tensors on demand."""

    def __init__(self, series: CheckpointSeries):
        self.series = series
        # any format can be the base (CheckpointSeries refused an adapter): one that is not the steps' is fine
        self.base: EntryReader = series.open(series.base)  # type: ignore[assignment]
        self.steps: dict[int, TensorReader] = {s: series.open(p) for s, p in series.steps}

    @cached_property
    def identity(self) -> str:
        """Identity of the series' inputs as their headers were read (see ModelDir.identity)."""
        ids = "\x1f".join(m.identity for m in (self.base, *self.steps.values()))
        return hashlib.sha256(ids.encode()).hexdigest()[:24]

    def close(self) -> None:
        self.base.close()
        for m in self.steps.values():
            m.close()

    def __enter__(self) -> SeriesReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _not_analysable(name: str, dtype: str) -> str | None:
    """Why a stored tensor cannot be read as weights, or None."""
    if dtype in FP8_DTYPES:
        return f"FP8 codes ({dtype}) whose scales are separate tensors; dequantise the checkpoint first"
    if name.endswith(QUANT_SCALE_SUFFIXES):
        return "the scale of a quantised weight, not a weight"
    if dtype not in FLOAT_DTYPES:
        return f"non-float dtype {dtype}"
    return None


def steps_text(steps: list[int], most: int = 6) -> str:
    """'step 30', 'steps 30, 60, 120' or, for a long list, 'steps 30, 60, …, 600 (10 steps)'."""
    if len(steps) == 1:
        return f"step {steps[0]}"
    if len(steps) <= most:
        return "steps " + ", ".join(map(str, steps))
    return f"steps {steps[0]}, {steps[1]}, …, {steps[-1]} ({len(steps)} steps)"


def tied_in(reader: SeriesReader) -> dict[str, str]:
    """{name: the tensor it is tied to}, as the base has them (its files leave the head out, or store it as an equal
    copy, with ``tie_word_embeddings``): such a name is analysed once, as its partner, and a step storing it anyway
    (a copy) is not read twice. A base whose head is its own is not tied, whatever the steps do."""
    return {n: t for n, t in reader.base.tied_names().items() if t in reader.base}


def plan_series(series: CheckpointSeries, names: list[str] | None = None, groups: tuple[str, ...] | None = None,
                overrides: Override | None = None, reader: SeriesReader | None = None) -> Plan:
    """Decide which tensors to analyse at which steps; list everything skipped with a reason."""
    own = reader is None
    reader = reader or SeriesReader(series)
    try:
        base = reader.base
        model_type = base.config.get("model_type")
        tensors: list[TensorPlan] = []
        skipped: list[dict] = []
        tied = tied_in(reader)
        wanted = names if names is not None else base.names()
        for name in wanted:
            if name in tied:
                continue  # analysed as the tensor it is tied to
            if name not in base:
                skipped.append({"run": series.name, "tensor": name, "reason": f"not in base {series.base}"})
                continue
            info = parse_name(name, overrides)
            if groups is not None and info.group not in groups:
                continue
            entry = base.entries[name]
            reason = _not_analysable(name, entry.dtype)
            if reason:
                skipped.append({"run": series.name, "tensor": name, "reason": reason})
                continue
            shape = entry.shape
            transposed = stored_transposed(name, shape, model_type)
            present, rows, nbytes = [], None, entry.nbytes
            problems: dict[str, list[int]] = {}  # what is wrong -> the steps it is wrong at
            for step, m in reader.steps.items():
                if name not in m:
                    if not m.holds_updates:  # (an adapter leaves the weights it does not hold unchanged)
                        problems.setdefault("missing", []).append(step)
                    continue
                if m.is_factored(name):  # its update as factors: read from them, never as a weight
                    present.append(step)
                    nbytes += entry.nbytes  # at most: a factored step reads less
                    continue
                s = m.shape(name)
                if m.holds_updates and s != shape:  # a fully saved module replaces the weight whole
                    problems.setdefault("shape mismatch", []).append(step)
                elif _not_analysable(name, m.stored_dtype(name)):
                    problems.setdefault(f"{m.stored_dtype(name)} (the base has {entry.dtype})", []).append(step)
                elif s == shape:
                    present.append(step)
                    nbytes += m.nbytes(name)
                elif (info.group in _RESIZABLE and len(s) == 2 and len(shape) == 2 and s[1] == shape[1]):
                    rows = min(rows or shape[0], s[0], shape[0])
                    present.append(step)
                    nbytes += m.nbytes(name)
                else:
                    problems.setdefault(f"shape mismatch: base {list(shape)} vs {list(s)}", []).append(step)
            if problems:
                skipped.append({"run": series.name, "tensor": name,
                                "reason": "; ".join(f"{what} at {steps_text(st)}" for what, st in problems.items()),
                                "analysed_steps": present})
            if not present:
                continue
            ashape = (*shape[:-2], shape[-1], shape[-2]) if transposed else tuple(shape)
            if rows is not None:
                ashape = (rows, *ashape[1:])
            tensors.append(TensorPlan(name, info, ashape, entry.dtype, transposed, tuple(present), rows, nbytes))
        if names is None:  # tensors a checkpoint has and the base lacks (added heads, renamed modules)
            extra: dict[str, list[int]] = {}
            for step, m in reader.steps.items():
                for name in m.names():
                    if name not in base and name not in tied and \
                            (groups is None or parse_name(name, overrides).group in groups):
                        extra.setdefault(name, []).append(step)
            skipped += [{"run": series.name, "tensor": n, "reason": f"not in base {series.base} (in {steps_text(st)})"}
                        for n, st in extra.items()]
        if not tensors:
            raise InputError(series.base, f"shares no analysable tensor with the checkpoints of run "
                                          f"{series.name!r} ({len(skipped)} skipped, e.g. "
                                          f"{skipped[0]['reason'] if skipped else 'none selected'})")
        return Plan(series, tensors, skipped, tied)
    finally:
        if own:
            reader.close()


def _orient(t: torch.Tensor, tp: TensorPlan, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(out, in) layout, common rows only; upcast to ``dtype`` when given (steps stay in their stored dtype)."""
    if dtype is not None:
        t = upcast(t, dtype)
    if tp.transposed:
        t = t.mT
    if tp.rows is not None:
        t = t[: tp.rows]
    return t.contiguous()


@dataclass
class StepUpdate:
    """One step of one tensor, oriented (out, in): W_t as stored (``raw``) and, formed on first use in the
    base's precision, W_t (``weight``) and ΔW_t (``delta``). A factored LoRA step brings its own delta.

    Keeping the stored dtype until a metric needs more lets the norm-only pass read each step once.
    """

    step: int
    raw: torch.Tensor
    base: torch.Tensor = field(repr=False)
    lora_delta: torch.Tensor | None = None

    @cached_property
    def weight(self) -> torch.Tensor:
        return upcast(self.raw, self._float)

    @cached_property
    def delta(self) -> torch.Tensor:  # never subtracted in half precision
        if self.lora_delta is not None:
            return self.lora_delta
        w = self.__dict__.get("weight")  # the float W_t is kept only once something (geometry) asked for it
        return subtract(upcast(self.raw, self._float) if w is None else w, upcast(self.base, self._float))

    @property
    def _float(self) -> torch.dtype:
        return update_dtype(self.base)


def read_base(reader: SeriesReader, tp: TensorPlan, dtype: torch.dtype | None = torch.float32,
              device: str | torch.device = "cpu") -> torch.Tensor:
    """The base tensor, oriented; upcast to ``dtype`` (None: as stored, for the kernels that decode it)."""
    return _orient(reader.base.get(tp.name), tp, dtype).to(device)


def read_step(reader: SeriesReader, tp: TensorPlan, step: int, w0: torch.Tensor,
              materialize: bool = False) -> StepUpdate:
    """W_t for one step (``w0`` is the upcast, oriented base on the target device); ``materialize`` forms
    the float weight and delta now (in the reading thread, when prefetching) instead of on first use."""
    m = reader.steps[step]
    if m.is_factored(tp.name):
        fdt = update_dtype(w0)
        delta = m.delta(tp.name, fdt, w0.device)
        delta = _orient(delta.mT if tp.transposed else delta, tp, fdt)  # factors are (out, in) already
        return StepUpdate(step, w0.to(fdt) + delta, w0, delta)
    raw = m.get(tp.name)
    upd = StepUpdate(step, _orient(raw, tp).to(w0.device), w0)
    if materialize:
        upd.delta  # noqa: B018 - cached_property: computed here, off the caller's thread
    return upd


#: below this many elements a step is read on the caller's thread: a reader thread per tensor costs more
#: than the read it would overlap (768 MoE-expert-sized 96x256 tensors, 2 steps, norms only: 1.2 s, 0.3 s
#: of it starting and waiting on threads)
PREFETCH_MIN_NUMEL = 1 << 16


def failure_reason(e: Exception) -> str:
    """What a failed read or computation is recorded as: an InputError's sentence, anything else with its type and
    where it was raised."""
    if isinstance(e, InputError):
        return str(e)
    where = traceback.extract_tb(e.__traceback__)[-1]
    return f"{type(e).__name__}: {e} (at {Path(where.filename).name}:{where.lineno})"


def _read_or_record(failed: dict[int, str], reader: SeriesReader, tp: TensorPlan, step: int, w0: torch.Tensor,
                    materialize: bool) -> StepUpdate | None:
    """`read_step`, or None with the failure recorded in ``failed``."""
    try:
        return read_step(reader, tp, step, w0, materialize)
    except Exception as e:  # noqa: BLE001 - recorded per step, with where it was raised
        failed[step] = failure_reason(e)
        return None


def iter_updates(reader: SeriesReader, tp: TensorPlan, w0: torch.Tensor, steps: Sequence[int] | None = None,
                 materialize: bool = False, failed: dict[int, str] | None = None) -> Iterator[StepUpdate]:
    """Yield StepUpdate for each step (default: every step the tensor exists at), reading the next step in
    a background thread while the caller works on the current one (``materialize``: see `read_step`). With
    ``failed``, a step that cannot be read is recorded there (step → `failure_reason`) and left out, so the
    tensor's other steps are still yielded; without it, the read's exception is raised."""
    order = list(steps) if steps is not None else list(tp.steps)
    read = read_step if failed is None else partial(_read_or_record, failed)
    if len(order) < 2 or tp.numel < PREFETCH_MIN_NUMEL:
        for s in order:
            upd = read(reader, tp, s, w0, materialize)
            if upd is not None:
                yield upd
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        fut = pool.submit(read, reader, tp, order[0], w0, materialize)
        for nxt in order[1:] + [None]:
            cur = fut.result()
            if nxt is not None:
                fut = pool.submit(read, reader, tp, nxt, w0, materialize)
            if cur is not None:
                yield cur


#: memory a trajectory block may take: (steps × rows × row size) float64 values (the row reader's default budget)
TRAJECTORY_BLOCK_BYTES = ROW_BLOCK_BYTES


def iter_delta_blocks(reader: SeriesReader, tp: TensorPlan, units: Sequence[int | None],
                      budget: int | None = None) -> Iterator[tuple[int | None, torch.Tensor]]:
    """(unit, block) over a tensor: block is (n_steps, m) float64, row i the entries of D_{t_i} in a range of
    the stored first dimension. A unit is the whole matrix (None; its rows come in blocks that fit
    ``budget`` bytes, default TRAJECTORY_BLOCK_BYTES) or one stacked expert (its own block). Each step's bytes
    are read once in all, a block at a time, so memory does not grow with the number of steps (`row_blocks`)."""
    budget = TRAJECTORY_BLOCK_BYTES if budget is None else budget
    stored = reader.base.shape(tp.name)
    n_rows = tp.rows if tp.rows is not None else stored[0]
    row_numel = math.prod(stored[1:])
    steps = [reader.steps[s] for s in tp.steps]
    for u in units:
        if u is None:
            step = max(1, budget // max(1, len(tp.steps) * row_numel * 8))
            ranges = [(lo, min(lo + step, n_rows)) for lo in range(0, n_rows, step)]
        else:
            ranges = [(u, u + 1)]
        for _, _, _, d in row_blocks(reader.base, steps, tp.name, ranges=ranges, transposed=tp.transposed):
            yield u, d.reshape(len(steps), -1)

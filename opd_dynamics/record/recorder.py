"""`DynamicsRecorder`: the update's geometry recorded inside training, step by step, without checkpoints.

    rec = DynamicsRecorder("sketches", k=16)
    rec.record(model, 0)              # the start weights W_0 (kept, for the selected matrices)
    ... optimizer.step(); rec.record(model, step)
    rec.close()

Per recorded step and selected matrix (attention and MLP by default, through the project's naming): ‖ΔW_t‖F,
‖W_0‖F, the bf16-visible changed fraction (`numerics.CHANGE_THRESHOLD`), the segment ‖W_t − W_prev‖F since the
previous recorded step, the cosines of that segment to the previous one and of ΔW_t to the previous recorded
ΔW, and the top-k singular triplets of ΔW_t = W_t − W_0 (the float64 exact decomposition of
`analysis.metrics.spectrum`, or with ``svd="fast"`` `record.topk.warm_topk`, warm-started from the previous step's
subspace), with the exact ‖ΔW_t‖F² so that energy fractions are exact for the kept k. The files are those of
`io.sketches` (a sketch series). ``record`` copies the selected weights and, by default, leaves the rest to a
worker thread that runs beside the next training step (on a GPU run the CPU is otherwise idle; on a CPU run it
takes a core the training does not use), so the training step waits only for the copy.

Memory: W_0 (float32, or the stored dtype with ``keep="stored"``), the previous recorded weights, the previous
segment and the copy of the step in flight (float32) of the selected matrices on ``device``, one matrix's
decomposition at a time, and the top-k triplets of the anchor steps (1, 2, 4, 8 … steps after the start) for the
lock-in estimate.

Under FSDP2 (DTensor parameters) every rank calls ``record``; each matrix is gathered whole (``full_tensor``, one
at a time) and rank 0 keeps the state and writes; the other ranks keep nothing. Resuming (``resume=True``) after
a crash or from a training checkpoint continues the series from the step the model is at: W_0 comes back from
``base.safetensors``, and steps recorded after that step (which training will redo) are moved to
``superseded/``, not deleted.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import torch
from threadpoolctl import ThreadpoolController

from opd_dynamics.analysis.metrics.trajectory import LOCKIN_MARGIN, LOCKIN_THRESHOLD
from opd_dynamics.errors import InputError
from opd_dynamics.io.naming import MATRIX_GROUPS, PEFT_PREFIX, is_selected, parse_name
from opd_dynamics.io.sketches import (
    BASE_FILE,
    FOREIGN_MEDIAN,
    SKETCH_CSV,
    SKETCH_JSON,
    SKETCH_VERSION,
    SketchSeries,
    is_sketch_dir,
    read_meta,
    step_file,
    step_files,
)
from opd_dynamics.io.writer import atomic_file, atomic_write_text, json_text, output_errors, save_safetensors
from opd_dynamics.numerics import fro2
from opd_dynamics.record.matrices import SUMS, DenseMatrix, LoraMatrix, cosine, lora_factors
from opd_dynamics.schema import TABLES

COLUMNS = TABLES["sketch"].names
#: a fresh series must start here: the start weights are W_0
START_STEP = 0


def _is_writer() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _full(p: torch.Tensor) -> torch.Tensor:
    """The whole matrix of a parameter (an FSDP2 DTensor is gathered: a collective every rank joins)."""
    full = getattr(p, "full_tensor", None)
    return (full() if full is not None else p).detach()


_BLAS = ThreadpoolController()


def _is_anchor(step: int) -> bool:
    """The lock-in estimate's anchors: 1, 2, 4, 8 … steps after the start."""
    n = step - START_STEP
    return n > 0 and n & (n - 1) == 0


class DynamicsRecorder:
    """Records the update of a model's selected matrices at chosen steps (module docstring).

    ``every``: record when ``step % every == 0``, or a callable ``step -> bool`` (dense early, sparse later …).
    ``groups``: naming groups whose 2-D weights are recorded. ``device``: where the kept weights live ("cpu" frees
    the accelerator). ``keep``: "float32" or "stored" (W_0 in the parameters' own dtype: half the memory for bf16
    weights, still exact). ``svd``: "exact" (float64: σ to 1e-12) or "fast" (warm-started randomized top-k, for
    matrices whose exact decomposition would not keep up; its tail values are approximate, see docs/BENCHMARKS.md).
    ``background``: the work on a step runs in a worker thread beside the next training step, ``record`` only
    copying the weights (the next ``record`` or ``close`` waits for it and raises its error). An ``out_dir``
    already holding a sketch series is refused unless ``resume`` (continue it) or ``overwrite`` (replace it).
    """

    def __init__(self, out_dir: str | Path, k: int = 16, every: int | Callable[[int], bool] = 1,
                 groups: tuple[str, ...] = MATRIX_GROUPS, device: str | torch.device = "cpu",
                 keep: str = "float32", svd: str = "exact", resume: bool = False, overwrite: bool = False,
                 background: bool = True, oversample: int = 8, power: int = 1):
        for name, value, allowed in (("svd", svd, ("exact", "fast")), ("keep", keep, ("float32", "stored"))):
            if value not in allowed:
                raise InputError(None, f"{name} must be {' or '.join(allowed)}, not {value!r}", (name,))
        if k < 1:
            raise InputError(None, f"k must be at least 1, not {k}", ("k",))
        self.out = Path(out_dir)
        self.writer = _is_writer()
        exists = is_sketch_dir(self.out)
        if exists and not (resume or overwrite):
            raise InputError(self.out, f"already holds a sketch series ({SKETCH_JSON}); pass resume=True to continue "
                                       "it or overwrite=True to replace it")
        self.resume = resume and exists
        if overwrite and exists and self.writer:
            shutil.rmtree(self.out)
        self.k, self.groups, self.device, self.keep, self.svd = k, groups, torch.device(device), keep, svd
        self.oversample, self.power = oversample, power
        self.every = every if callable(every) else (lambda s, n=int(every): s % n == 0)
        self.started = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dynamics-recorder") if background else None
        self._pending: Future | None = None
        self.completed: list[dict[str, float]] = []
        #: seconds spent: in ``record`` by the calling (training) thread, and on the steps' work wherever it ran
        self.seconds = {"record": 0.0, "work": 0.0}
        self.matrices: dict[str, DenseMatrix | LoraMatrix] = {}
        #: the last recorded step's scalars (what `DynamicsCallback` logs): update norm by group, the segment norm
        #: and cosine, the cosine of ΔW_t to the previous recorded ΔW, the lock-in estimate and the step file's size
        self.scalars: dict[str, float] = {}

    # ---- the selection and the start ----

    def _targets(self, model: torch.nn.Module) -> dict[str, tuple[str, object]]:
        """{name: ("dense", parameter) or ("lora", module)}: the trainable 2-D weights of the selected groups, and
        the PEFT LoRA layers over a selected base weight (named as the merged model names that weight)."""
        out: dict[str, tuple[str, object]] = {}
        under_lora: set[int] = set()
        for mname, mod in model.named_modules():
            if not (hasattr(mod, "lora_A") and hasattr(mod, "base_layer")):
                continue
            under_lora.update(id(p) for p in mod.parameters())
            if lora_factors(mod) is None:
                raise InputError(None, f"{mname} has {len(getattr(mod, 'active_adapters', []))} active LoRA adapters; "
                                       "the recorder follows one (set_adapter)")
            name = f"{mname.removeprefix(PEFT_PREFIX)}.weight"  # as the merged model names the weight
            if is_selected(name, tuple(mod.base_layer.weight.shape), self.groups, True):
                out[name] = ("lora", mod)
        for n, p in model.named_parameters():
            if id(p) in under_lora or not p.requires_grad or p.dim() != 2 or not p.is_floating_point():
                continue
            if is_selected(n, tuple(p.shape), self.groups, True):
                out[n] = ("dense", p)
        return out

    @staticmethod
    def _gather(targets: dict[str, tuple[str, object]]) -> dict[str, object]:
        """Each target's current value, whole (FSDP2 DTensors gathered: collectives every rank joins, one at a time):
        a dense weight, or a LoRA layer's (B, A)."""
        out = {}
        for n, (kind, obj) in targets.items():
            out[n] = _full(obj) if kind == "dense" else tuple(_full(t) for t in lora_factors(obj)[:2])
        return out

    def _snapshot(self, gathered: dict[str, object]) -> dict[str, object]:
        """Copies the recorder owns of each target's value now (training goes on changing the parameters)."""
        return {n: self.matrices[n].snapshot(v) for n, v in gathered.items()}

    def _start(self, model: torch.nn.Module, step: int) -> None:
        targets = self._targets(model)
        if not targets:
            raise InputError(None, f"the model has no trainable 2-D weights in the groups {', '.join(self.groups)}")
        if not self.resume and step != START_STEP:
            raise InputError(self.out, f"cannot start recording at step {step}: a new sketch series needs the start "
                                       f"weights (step {START_STEP}); attach the recorder before training starts, or "
                                       "resume=True into the series that recorded the start")
        self.started, self.start_step = True, START_STEP
        self.prev_step = step
        gathered = self._gather(targets)
        if not self.writer:
            return
        self.lora_scale = {n: lora_factors(obj)[2] for n, (kind, obj) in targets.items() if kind == "lora"}
        bases = {n: _full(obj.base_layer.weight) if kind == "lora" else gathered[n] for n, (kind, obj) in
                 targets.items()}
        self.shapes = {n: tuple(t.shape) for n, t in bases.items()}
        self.group = {n: parse_name(n).group for n in bases}
        self.anchors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.anchor_steps: list[int] = []
        self.anchor_energy: list[float] = []
        with output_errors(self.out):
            if self.resume:
                self._continue(gathered, bases, step)
                return
            self.out.mkdir(parents=True, exist_ok=True)
            stored = {n: t.cpu().contiguous() for n, t in bases.items()}
            for n in self.lora_scale:
                stored[f"{n}::lora_B0"], stored[f"{n}::lora_A0"] = (t.cpu().contiguous() for t in gathered[n])
            with atomic_file(self.out / BASE_FILE) as tmp:
                save_safetensors(stored, tmp)
            self._make_matrices(stored)
            meta = {"version": SKETCH_VERSION, "k": self.k, "groups": list(self.groups), "start_step": START_STEP,
                    "svd": self.svd,
                    "tensors": {n: {"shape": list(s), "group": self.group[n],
                                    **({"lora_scale": self.lora_scale[n]} if n in self.lora_scale else {})}
                                for n, s in self.shapes.items()}}
            atomic_write_text(self.out / SKETCH_JSON, json_text(meta))
            (self.out / SKETCH_CSV).unlink(missing_ok=True)

    def _make_matrices(self, stored: dict[str, torch.Tensor]) -> None:
        """The per-matrix state from the start weights as base.safetensors holds them."""
        self.matrices: dict[str, DenseMatrix | LoraMatrix] = {}
        for n in self.shapes:
            if n in self.lora_scale:
                self.matrices[n] = LoraMatrix(stored[n], stored[f"{n}::lora_B0"], stored[f"{n}::lora_A0"],
                                              self.lora_scale[n], self.k)
            else:
                self.matrices[n] = DenseMatrix(stored[n], self.device, self.keep, self.k, self.svd, self.oversample,
                                               self.power)

    def _continue(self, gathered: dict[str, object], bases: dict[str, torch.Tensor], step: int) -> None:
        """Resume the series in ``self.out`` at ``step`` with the model's current weights (module docstring)."""
        meta = read_meta(self.out)
        want = {n: tuple(v["shape"]) for n, v in meta["tensors"].items()}
        if want != self.shapes:
            other = sorted(set(want) ^ set(self.shapes)) or [n for n in want if want[n] != self.shapes[n]]
            raise InputError(self.out, f"was recorded from another model: its matrices differ from this model's "
                                       f"({other[0]})")
        if int(meta["k"]) != self.k:
            raise InputError(self.out, f"was recorded with k = {meta['k']}, not {self.k}")
        from safetensors.torch import load_file

        stored = load_file(self.out / BASE_FILE)
        rel = sorted((fro2(bases[n].float() - stored[n].float()) / max(fro2(stored[n].float()), 1e-300)) ** 0.5
                     for n in self.shapes)
        median = rel[len(rel) // 2]
        if median >= FOREIGN_MEDIAN:
            raise InputError(self.out, f"was recorded from another model: this model's weights are {median:.2f} of "
                                       "W_0's norm away from its start (median over matrices)")
        self._make_matrices(stored)
        later = [f for s, f in step_files(self.out).items() if s > step]
        if later:  # training redoes these steps: keep the old sketches aside, never lose them
            aside = self.out / "superseded"
            aside.mkdir(exist_ok=True)
            for f in later:
                f.replace(aside / f.name)
        (self.out / SKETCH_CSV).unlink(missing_ok=True)  # derived from the step files: rewritten below
        done = step_files(self.out)
        self.prev_step = max((s for s in done if s <= step), default=START_STEP)
        series = SketchSeries(self.out)
        for s in done:
            if _is_anchor(s):
                self._add_anchor(s, {n: series.triplets(s, n) for n in self.shapes})
        self._rewrite_csv()
        snapshot = self._snapshot(gathered)
        for n, snap in snapshot.items():
            self.matrices[n].restart(snap)
        if step not in done and step != START_STEP:  # the weights at the resume point: a step of the series
            self._measure(snapshot, step, self.prev_step, segment=False)
        self.prev_step = step

    # ---- one step ----

    @torch.no_grad()
    def record(self, model: torch.nn.Module, step: int) -> bool:
        """Record ``step``: the first call keeps the start weights (step 0, or the step a resumed run is at);
        later calls record the steps the schedule names. False when the schedule skips it."""
        if not self.started:
            self._start(model, step)
            return True
        if not self.every(step):
            return False
        t0 = time.perf_counter()
        if step <= self.prev_step:
            raise InputError(self.out, f"step {step} comes after step {self.prev_step} was recorded; steps must "
                                       "increase")
        gathered = self._gather(self._targets(model))
        if self.writer:  # a copy of the weights now; the work on it may run beside the next training step
            snapshot = self._snapshot(gathered)
            self.wait()
            if self._pool is None:
                self._record(snapshot, step, self.prev_step, segment=True)
            else:
                self._pending = self._pool.submit(self._record, snapshot, step, self.prev_step, True)
        self.prev_step = step
        self.seconds["record"] += time.perf_counter() - t0
        return True

    def wait(self) -> None:
        """Finish the step being recorded in the background (raising its error, if it had one)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def pop_completed(self) -> list[dict[str, float]]:
        """The scalars of the steps finished since the last call (each with ``dynamics/step``), oldest first."""
        done, self.completed = self.completed, []
        return done

    def _record(self, snapshot: dict[str, object], step: int, prev_step: int, segment: bool) -> None:
        """One step's rows, triplets and scalars from ``snapshot`` (copies the recorder owns). Its BLAS (scipy's,
        for the exact decompositions) runs one thread: beside a training step, a second one only contends for
        the cores training uses (measured on the lab: 434 against 127 ms of work per step)."""
        t0 = time.perf_counter()
        with output_errors(self.out), _BLAS.limit(limits=1, user_api="blas"):
            self._measure(snapshot, step, prev_step, segment)
        self.seconds["work"] += time.perf_counter() - t0

    def _measure(self, snapshot: dict[str, object], step: int, prev_step: int, segment: bool) -> None:
        tensors: dict[str, torch.Tensor] = {}
        rows, by_group, triplets = [], {}, {}
        tot = dict.fromkeys(SUMS, 0.0)
        for name, snap in snapshot.items():
            mat = self.matrices[name]
            m = mat.measure(snap, segment)
            if m.triplet is not None:
                triplets[name] = m.triplet
                for part, t in zip("USV", m.triplet):
                    tensors[f"{name}::{part}"] = t.float().cpu().contiguous()
            g = self.group[name]
            by_group[g] = by_group.get(g, 0.0) + m.sums["f2"]
            for key, v in m.sums.items():
                tot[key] += v
            rows.append({"step": step, "tensor": name, "base_norm": mat.base_norm, **m.row})
        lockin = self._lockin(step, triplets)
        if _is_anchor(step):
            self._add_anchor(step, triplets)
        f = step_file(self.out, step)
        md = {"version": str(SKETCH_VERSION), "step": str(step), "prev_step": str(prev_step),
              "start_step": str(START_STEP), "k": str(self.k), "rows": json.dumps(rows, allow_nan=True)}
        with atomic_file(f) as tmp:
            save_safetensors(tensors, tmp, metadata=md)
        self._append_csv(rows)
        self.scalars = {**{f"dynamics/update_norm/{g}": v ** 0.5 for g, v in sorted(by_group.items())},
                        "dynamics/segment_norm": tot["seg2"] ** 0.5,
                        "dynamics/segment_cosine": cosine(tot["segdot"], tot["prevseg2"], tot["seg2"]),
                        "dynamics/cosine_to_previous": cosine(tot["dotprev"], tot["f2"], tot["prevf2"]),
                        "dynamics/lockin_step": lockin, "dynamics/sketch_bytes": float(f.stat().st_size),
                        "dynamics/step": float(step)}
        self.completed.append(self.scalars)

    # ---- the lock-in estimate ----

    def _add_anchor(self, step: int, triplets: dict) -> None:
        """Keep a step's rank-k part (U·S, V per matrix) for the lock-in estimate."""
        energy = 0.0
        for name in self.shapes:
            t = triplets.get(name)
            m, n = self.shapes[name]
            us = (t[0] * t[1]).float() if t is not None else torch.zeros(m, 0)
            v = t[2].float() if t is not None else torch.zeros(n, 0)
            energy += float((t[1].double() ** 2).sum()) if t is not None else 0.0
            old = self.anchors.get(name)
            width = torch.tensor([us.shape[1]])
            if old is None:
                self.anchors[name] = (us.to(self.device), v.to(self.device), width)
            else:
                self.anchors[name] = (torch.cat([old[0], us.to(self.device)], 1),
                                      torch.cat([old[1], v.to(self.device)], 1), torch.cat([old[2], width]))
        self.anchor_steps.append(step)
        self.anchor_energy.append(energy)

    def _lockin(self, step: int, triplets: dict) -> float:
        """The first anchor step whose rank-k direction agrees with this step's (the cosine of the two rank-k parts
        at least LOCKIN_THRESHOLD and above the random walk's √(a/t) by LOCKIN_MARGIN), this step standing in for
        the final one; NaN when none does yet. An estimate: the analysis' lockin_step uses the full updates."""
        if not self.anchor_steps:
            return math.nan
        n_a = len(self.anchor_steps)
        num = torch.zeros(n_a, dtype=torch.float64)
        e_t = 0.0
        for name, (U, S, V) in triplets.items():
            e_t += float((S.double() ** 2).sum())
            us_a, v_a, width = self.anchors[name]
            if us_a.shape[1] == 0:
                continue
            # ⟨U_a S_a V_aᵀ, U S Vᵀ⟩ = Σ over the pairs of (U_a S_a)ᵀ (U S) ∘ V_aᵀ V, per anchor block
            prod = ((us_a.T @ (U * S).float()) * (v_a.T @ V.float())).sum(1).double()
            num += torch.stack([b.sum() for b in torch.split(prod, width.tolist())])
        for a, n, e_a in zip(self.anchor_steps, num.tolist(), self.anchor_energy):
            c = cosine(n, e_a, e_t)
            if c >= LOCKIN_THRESHOLD and c - ((a - START_STEP) / (step - START_STEP)) ** 0.5 >= LOCKIN_MARGIN:
                return float(a)
        return math.nan

    # ---- the CSV ----

    def _append_csv(self, rows: list[dict]) -> None:
        f = self.out / SKETCH_CSV
        df = pd.DataFrame(rows, columns=COLUMNS)
        new = not f.exists()
        with open(f, "a") as fh:
            fh.write(df.to_csv(index=False, header=new))

    def _rewrite_csv(self) -> None:
        table = SketchSeries(self.out).table
        with atomic_file(self.out / SKETCH_CSV) as tmp:
            table.to_csv(tmp, index=False)

    def close(self) -> None:
        """Finish the step in flight, rewrite sketch.csv from the step files (a clean table) and release the kept
        weights."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
        if self.started and self.writer and step_files(self.out):
            with output_errors(self.out):
                self._rewrite_csv()
        self.matrices = {}

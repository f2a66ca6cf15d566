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
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import torch

from opd_dynamics.analysis.metrics.norms import update_stats
from opd_dynamics.analysis.metrics.spectrum import decompose
from opd_dynamics.analysis.metrics.trajectory import LOCKIN_MARGIN, LOCKIN_THRESHOLD
from opd_dynamics.errors import InputError
from opd_dynamics.io.naming import MATRIX_GROUPS, is_selected, parse_name
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
from opd_dynamics.numerics import dot, fro2
from opd_dynamics.record.topk import warm_topk
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


def _cos(num: float, a2: float, b2: float) -> float:
    return num / math.sqrt(a2 * b2) if a2 > 0 and b2 > 0 else math.nan


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
        self.w0: dict[str, torch.Tensor] = {}
        #: the last recorded step's scalars (what `DynamicsCallback` logs): update norm by group, the segment norm
        #: and cosine, the cosine of ΔW_t to the previous recorded ΔW, the lock-in estimate and the step file's size
        self.scalars: dict[str, float] = {}

    # ---- the selection and the start ----

    def _selected(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n: p for n, p in model.named_parameters()
                if p.dim() == 2 and p.is_floating_point() and is_selected(n, tuple(p.shape), self.groups, True)}

    def _start(self, model: torch.nn.Module, step: int) -> None:
        params = self._selected(model)
        if not params:
            raise InputError(None, f"the model has no 2-D weights in the groups {', '.join(self.groups)}")
        if not self.resume and step != START_STEP:
            raise InputError(self.out, f"cannot start recording at step {step}: a new sketch series needs the start "
                                       f"weights (step {START_STEP}); attach the recorder before training starts, or "
                                       "resume=True into the series that recorded the start")
        self.started, self.start_step = True, START_STEP
        self.prev_step = step
        gathered = {n: _full(p) for n, p in params.items()}  # every rank joins the gathers
        if not self.writer:
            return
        self.shapes = {n: tuple(t.shape) for n, t in gathered.items()}
        self.group = {n: parse_name(n).group for n in gathered}
        self.anchors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.anchor_steps: list[int] = []
        self.anchor_energy: list[float] = []
        self.basis: dict[str, torch.Tensor] = {}
        self.prev_seg: dict[str, torch.Tensor] = {}
        self.prev_f2: dict[str, float] = {}
        kept = {"float32": lambda t: t.to(self.device, torch.float32, copy=True),
                "stored": lambda t: t.to(self.device, copy=True)}[self.keep]
        with output_errors(self.out):
            if self.resume:
                self._continue(gathered, step, kept)
                return
            self.out.mkdir(parents=True, exist_ok=True)
            with atomic_file(self.out / BASE_FILE) as tmp:
                save_safetensors({n: t.cpu().contiguous() for n, t in gathered.items()}, tmp)
            self._set_w0({n: kept(t) for n, t in gathered.items()})
            meta = {"version": SKETCH_VERSION, "k": self.k, "groups": list(self.groups), "start_step": START_STEP,
                    "svd": self.svd,
                    "tensors": {n: {"shape": list(s), "group": self.group[n]} for n, s in self.shapes.items()}}
            atomic_write_text(self.out / SKETCH_JSON, json_text(meta))
            (self.out / SKETCH_CSV).unlink(missing_ok=True)
        self.prev = {n: t.to(self.device, torch.float32, copy=True) for n, t in gathered.items()}

    def _set_w0(self, w0: dict[str, torch.Tensor]) -> None:
        self.w0 = w0
        self.base_norm = {n: fro2(t.float()) ** 0.5 for n, t in w0.items()}  # fixed for the whole run

    def _continue(self, gathered: dict[str, torch.Tensor], step: int, kept) -> None:
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

        base = load_file(self.out / BASE_FILE)
        rel = sorted((fro2(gathered[n].float() - base[n].float()) / max(fro2(base[n].float()), 1e-300)) ** 0.5
                     for n in base)
        median = rel[len(rel) // 2]
        if median >= FOREIGN_MEDIAN:
            raise InputError(self.out, f"was recorded from another model: this model's weights are {median:.2f} of "
                                       "W_0's norm away from its start (median over matrices)")
        self._set_w0({n: kept(t) for n, t in base.items()})
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
            if s - START_STEP > 0 and (s - START_STEP) & (s - START_STEP - 1) == 0:
                self._add_anchor(s, {n: series.triplets(s, n) for n in self.shapes})
        self._rewrite_csv()
        snapshot = {n: t.to(self.device, torch.float32, copy=True) for n, t in gathered.items()}
        self.prev = dict(snapshot)
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
        if step <= self.prev_step:
            raise InputError(self.out, f"step {step} comes after step {self.prev_step} was recorded; steps must "
                                       "increase")
        gathered = {n: _full(p) for n, p in self._selected(model).items()}
        if self.writer:  # a copy of the weights now; the work on it may run beside the next training step
            snapshot = {n: t.to(self.device, torch.float32, copy=True) for n, t in gathered.items()}
            self.wait()
            if self._pool is None:
                self._record(snapshot, step, self.prev_step, segment=True)
            else:
                self._pending = self._pool.submit(self._record, snapshot, step, self.prev_step, True)
        self.prev_step = step
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

    def _record(self, snapshot: dict[str, torch.Tensor], step: int, prev_step: int, segment: bool) -> None:
        """One step's rows, triplets and scalars from ``snapshot`` (float32 weights the recorder owns)."""
        with output_errors(self.out):
            self._measure(snapshot, step, prev_step, segment)

    def _measure(self, snapshot: dict[str, torch.Tensor], step: int, prev_step: int, segment: bool) -> None:
        tensors: dict[str, torch.Tensor] = {}
        rows, by_group = [], {}
        tot = {"f2": 0.0, "seg2": 0.0, "segdot": 0.0, "prevseg2": 0.0, "dotprev": 0.0, "prevf2": 0.0}
        triplets = {}
        for name, wt in snapshot.items():
            w0 = self.w0[name].float()
            f2, changed = update_stats(w0, wt)
            delta = wt - w0
            seg = wt - self.prev[name]
            seg2 = fro2(seg) if segment else math.nan
            prev_seg = self.prev_seg.get(name) if segment else None
            segdot = dot(prev_seg, seg) if prev_seg is not None else math.nan
            prevseg2 = fro2(prev_seg) if prev_seg is not None else math.nan
            prevf2 = self.prev_f2.get(name, math.nan) if segment else math.nan
            dotprev = f2 - dot(delta, seg) if segment else math.nan  # ⟨ΔW_t, ΔW_prev⟩ = ⟨ΔW_t, ΔW_t − segment⟩
            if f2 > 0 and math.isfinite(f2):
                if self.svd == "exact":
                    dec = decompose(delta.double(), k_vectors=self.k, mode="exact")
                    kk = min(self.k, dec.rank, dec.U.shape[1])
                    U, S, V = dec.U[:, :kk], dec.singular_values[:kk], dec.V[:, :kk]
                else:
                    U, S, V, self.basis[name] = warm_topk(delta.double(), self.k, self.basis.get(name), self.oversample,
                                                          self.power)
                    kk = int((S > 0).sum())
                    U, S, V = U[:, :kk], S[:kk], V[:, :kk]
            else:
                kk, U, S, V = 0, None, None, None
            if kk:
                triplets[name] = (U, S, V)
                tensors.update({f"{name}::U": U.float().cpu().contiguous(), f"{name}::S": S.float().cpu().contiguous(),
                                f"{name}::V": V.float().cpu().contiguous()})
            g = self.group[name]
            by_group[g] = by_group.get(g, 0.0) + f2
            for key, v in (("f2", f2), ("seg2", seg2), ("segdot", segdot), ("prevseg2", prevseg2),
                           ("dotprev", dotprev), ("prevf2", prevf2)):
                tot[key] += v
            s1 = float(S[0]) if kk else 0.0
            rows.append({"step": step, "tensor": name, "k": kk, "update_norm": f2 ** 0.5,
                         "base_norm": self.base_norm[name], "changed_fraction": changed / max(1, delta.numel()),
                         "segment_norm": seg2 ** 0.5, "segment_cosine": _cos(segdot, prevseg2, seg2),
                         "cosine_to_previous": _cos(dotprev, f2, prevf2), "spectral_norm": s1,
                         "energy_topk": float((S.double() ** 2).sum() / f2) if kk else math.nan})
            if segment:
                self.prev_seg[name] = seg
            self.prev[name] = wt
            self.prev_f2[name] = f2
        lockin = self._lockin(step, triplets, tot["f2"])
        if step - START_STEP > 0 and (step - START_STEP) & (step - START_STEP - 1) == 0:
            self._add_anchor(step, triplets)
        f = step_file(self.out, step)
        md = {"version": str(SKETCH_VERSION), "step": str(step), "prev_step": str(prev_step),
              "start_step": str(START_STEP), "k": str(self.k), "rows": json.dumps(rows, allow_nan=True)}
        with atomic_file(f) as tmp:
            save_safetensors(tensors, tmp, metadata=md)
        self._append_csv(rows)
        self.scalars = {**{f"dynamics/update_norm/{g}": v ** 0.5 for g, v in sorted(by_group.items())},
                        "dynamics/segment_norm": tot["seg2"] ** 0.5,
                        "dynamics/segment_cosine": _cos(tot["segdot"], tot["prevseg2"], tot["seg2"]),
                        "dynamics/cosine_to_previous": _cos(tot["dotprev"], tot["f2"], tot["prevf2"]),
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

    def _lockin(self, step: int, triplets: dict, f2: float) -> float:
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
            c = _cos(n, e_a, e_t)
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
        for d in (self.w0, getattr(self, "prev", {}), getattr(self, "prev_seg", {}), getattr(self, "basis", {})):
            d.clear()

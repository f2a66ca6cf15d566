"""`StepRecorder`: the recorder's per-step work on a sketch series already begun on disk (``sketch.json`` and
``base.safetensors`` written), wherever it runs: in the training process, in a thread beside training, or in the
worker process (`record.worker`). It rebuilds everything it keeps from the directory (W_0 from
``base.safetensors``, the lock-in anchors from the step files already there), so a worker started apart, or a
resumed run, needs nothing else.

`measure` takes a snapshot of the recorded tensors (each a float32 weight, or a LoRA layer's (B, A)), writes
``step-N.safetensors`` (triplets, and in its metadata the rows and what the step's work cost: ``work``) and
appends the rows to ``sketch.csv``, and returns the step's scalars (the work's cost among them).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pandas as pd
import torch

from opd_dynamics.io.sketches import (
    SKETCH_CSV,
    SKETCH_VERSION,
    SketchSeries,
    decomposed_names,
    read_meta,
    step_file,
    step_files,
)
from opd_dynamics.io.writer import atomic_file, output_errors, save_safetensors
from opd_dynamics.numerics import locked_in
from opd_dynamics.record.matrices import SUMS, build_matrices, copied, cosine
from opd_dynamics.record.shards import Helpers, measure_one
from opd_dynamics.schema import TABLES

COLUMNS = TABLES["sketch"].names
#: a fresh series must start here: the start weights are W_0
START_STEP = 0


def is_anchor(step: int) -> bool:
    """The lock-in estimate's anchors: 1, 2, 4, 8 … steps after the start."""
    n = step - START_STEP
    return n > 0 and n & (n - 1) == 0


class StepRecorder:
    """The state and per-step work of one sketch series (module docstring). ``settings``: k, svd, keep,
    device, oversample, power, tol (the `DynamicsRecorder` arguments of the same names) and vectors (the exact
    route's eigenvector method: "eigh" in a thread of the training process, which releases the GIL; "auto",
    scipy's tridiagonal route, 2–3× cheaper, elsewhere). ``cpu_clock``: what the CPU time in ``work`` counts (the
    calling thread's by default; the worker process passes its own)."""

    def __init__(self, out: Path, settings: dict, cpu_clock=time.thread_time, names: list[str] | None = None,
                 helpers: Helpers | None = None):
        self.out = Path(out)
        self.cpu_clock = cpu_clock  # the work's CPU time: this thread's, or the worker process's (all its threads)
        meta = read_meta(self.out)
        self.k = int(settings["k"])
        self.device = torch.device(settings["device"])
        self.shapes = {n: tuple(v["shape"]) for n, v in meta["tensors"].items()}
        self.group = {n: v["group"] for n, v in meta["tensors"].items()}
        self.decomposed = set(decomposed_names(meta["tensors"]))
        #: the matrices measured here (``names``: a share of them, the rest held by ``helpers``: `record.shards`)
        self.matrices = build_matrices(self.out, settings, names)
        self.helpers = helpers
        self.base_norm = {**{n: m.base_norm for n, m in self.matrices.items()},
                          **(helpers.base_norm if helpers is not None else {})}
        self.anchors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.anchor_steps: list[int] = []
        self.anchor_energy: list[float] = []
        done = step_files(self.out)
        if done:
            series = SketchSeries(self.out)
            for s in done:
                if is_anchor(s):
                    self._add_anchor(s, series.triplets(s))
        #: seconds spent in `measure` (wall clock, and CPU time of the thread that ran it)
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def restart(self, snapshot: dict[str, object]) -> None:
        """Continue from these weights (a resumed run): no previous segment is known."""
        if self.helpers is not None:
            self.helpers.restart()
        for n, snap in self._own(snapshot).items():
            self.matrices[n].restart(snap)

    def _own(self, snapshot: dict[str, object]) -> dict[str, object]:
        """The weights of the matrices measured here; copies when helpers share the step (it is read from a buffer
        the next step overwrites, and a matrix keeps the weights it measured)."""
        if self.helpers is None:
            return snapshot
        return {n: copied(v) for n, v in snapshot.items() if n in self.matrices}

    def measure(self, snapshot: dict[str, object], step: int, prev_step: int, segment: bool) -> dict[str, float]:
        """Record ``step`` from ``snapshot`` (copies this object may keep); the step's scalars. An OS error while
        writing is one sentence naming the series."""
        with output_errors(self.out):
            scalars = self._measure(snapshot, step, prev_step, segment)
        return scalars

    def _measure(self, snapshot: dict[str, object], step: int, prev_step: int, segment: bool) -> dict[str, float]:
        t0, c0 = time.perf_counter(), self.cpu_clock()
        tensors: dict[str, torch.Tensor] = {}
        rows, by_group, triplets = [], {}, {}
        tot = dict.fromkeys(SUMS, 0.0)
        routes: dict[str, int] = {}
        products, bound = 0, 0.0
        if self.helpers is not None:
            self.helpers.send("measure", segment)
        measured = {n: measure_one(self.matrices[n], snap, segment) for n, snap in self._own(snapshot).items()}
        helper_cpu = 0.0
        if self.helpers is not None:
            more, helper_cpu = self.helpers.collect()
            measured.update(more)
        for name in snapshot:  # the series' order, wherever each matrix was measured: the same sums bit for bit
            m = measured[name]
            if m.triplet is not None:
                triplets[name] = m.triplet
                for part, t in zip("USV", m.triplet):
                    tensors[f"{name}::{part}"] = t.float().cpu().contiguous()
            g = self.group[name]
            by_group[g] = by_group.get(g, 0.0) + m.sums["f2"]
            if name in self.decomposed:  # the segment and cosine scalars: over the decomposed matrices, as the rows
                for key, v in m.sums.items():
                    tot[key] += v
                work = m.work
                if "route" in work:
                    routes[work["route"]] = routes.get(work["route"], 0) + 1
                products += work.get("products", 0)
                if m.row["sigma_bound"] == m.row["sigma_bound"]:
                    bound = max(bound, m.row["sigma_bound"])
            rows.append({"step": step, "tensor": name, "base_norm": self.base_norm[name], **m.row})
        lockin = self._lockin(step, triplets)
        if is_anchor(step):
            self._add_anchor(step, triplets)
        f = step_file(self.out, step)
        seconds, cpu = time.perf_counter() - t0, self.cpu_clock() - c0 + helper_cpu
        # what this step's work cost (before the write): the recorder's logs and the step file say it
        work = {"seconds": seconds, "cpu_seconds": cpu, "routes": routes, "products": products,
                "sigma_bound": bound}
        md = {"version": str(SKETCH_VERSION), "step": str(step), "prev_step": str(prev_step),
              "start_step": str(START_STEP), "k": str(self.k), "rows": json.dumps(rows, allow_nan=True),
              "work": json.dumps(work)}
        with atomic_file(f) as tmp:
            save_safetensors(tensors, tmp, metadata=md)
        self._append_csv(rows)
        self.seconds += time.perf_counter() - t0
        self.cpu_seconds += self.cpu_clock() - c0 + helper_cpu
        return {**{f"dynamics/update_norm/{g}": v ** 0.5 for g, v in sorted(by_group.items())},
                "dynamics/segment_norm": tot["seg2"] ** 0.5,
                "dynamics/segment_cosine": cosine(tot["segdot"], tot["prevseg2"], tot["seg2"]),
                "dynamics/cosine_to_previous": cosine(tot["dotprev"], tot["f2"], tot["prevf2"]),
                "dynamics/lockin_step": lockin, "dynamics/sketch_bytes": float(f.stat().st_size),
                "dynamics/work_seconds": seconds, "dynamics/work_cpu_seconds": cpu,
                "dynamics/exact_matrices": float(routes.get("exact", 0)),
                "dynamics/krylov_matrices": float(routes.get("krylov", 0)),
                "dynamics/sigma_bound": bound, "dynamics/step": float(step)}

    # ---- the lock-in estimate ----

    def _add_anchor(self, step: int, triplets: dict) -> None:
        """Keep a step's rank-k part (U·S, V per matrix) for the lock-in estimate."""
        energy = 0.0
        for name in (n for n in self.shapes if n in self.decomposed):
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
        at least LOCKIN_THRESHOLD and above the random walk's √(a/t) by LOCKIN_MARGIN: `locked_in`), this step
        standing in for the final one; NaN when none does yet. An estimate: the analysis' lockin_step uses the full
        updates and the null of their measured segment norms; this one the equal-segment null √(a/t)."""
        if not self.anchor_steps:
            return math.nan
        num = torch.zeros(len(self.anchor_steps), dtype=torch.float64)
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
            if locked_in(c, ((a - START_STEP) / (step - START_STEP)) ** 0.5):  # the analysis' rule
                return float(a)
        return math.nan

    # ---- the CSV ----

    def _append_csv(self, rows: list[dict]) -> None:
        f = self.out / SKETCH_CSV
        df = pd.DataFrame(rows, columns=COLUMNS)
        new = not f.exists()
        with open(f, "a") as fh:
            fh.write(df.to_csv(index=False, header=new))


def rewrite_csv(out: Path) -> None:
    """sketch.csv rewritten from the step files (a clean table: no line a crash cut short, no superseded step)."""
    table = SketchSeries(out).table
    with atomic_file(out / SKETCH_CSV) as tmp:
        table.to_csv(tmp, index=False)

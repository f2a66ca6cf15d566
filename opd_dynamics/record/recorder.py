"""`DynamicsRecorder`: the update's geometry recorded inside training, step by step, without checkpoints.

    rec = DynamicsRecorder("sketches", k=16)
    rec.record(model, 0)              # the start weights W_0 (kept, for the selected matrices)
    ... optimizer.step(); rec.record(model, step)
    rec.close()

Per recorded step and selected matrix (attention and MLP by default, through the project's naming): ‖ΔW_t‖F,
‖W_0‖F, the bf16-visible changed fraction (`numerics.CHANGE_THRESHOLD`), the segment ‖W_t − W_prev‖F since the
previous recorded step, the cosines of that segment to the previous one and of ΔW_t to the previous recorded
ΔW, and the top-k singular triplets of ΔW_t = W_t − W_0, with the exact ‖ΔW_t‖F² so that energy fractions are
exact for the kept k. ``svd``: "certified" (the default) finds them by block Krylov from products with ΔW_t,
warm-started from the previous step's vectors, and accepts them only when the residuals certify every kept σ to
``tol`` (relative; `record.topk.certified_topk` says the bound), falling back to the exact route when that does not
happen within a basis as costly as the exact route; "exact" runs the float64 exact decomposition of
`numerics.decomposition` every step; "fast" the uncertified warm randomized finder. Every other trainable
tensor (embeddings, norms, biases, an untied head; a tied head is one parameter, counted once) is recorded by its
norms (‖ΔW_t‖F, ‖W_0‖F, the changed fraction), so a sketch series' shares cover what a checkpoint analysis covers;
``sketch.json`` marks each tensor ``decomposed`` or not. The files are those of `io.sketches` (a sketch series).
``record`` copies the recorded weights and, by default, leaves the rest to a worker beside the next training
step (`record.worker`: a process of its own for weights kept on the CPU, at idle scheduling priority and one BLAS
thread, so that it runs on what training leaves idle; a thread for weights kept on a GPU), so the training step
waits only for the copy (and for the worker, when its backlog of steps, ``backlog_gb``, is full: when the work
takes longer than the idle time training leaves, over more steps than the backlog holds).
What the work cost is in each step file's metadata (``work``) and in the logged scalars
(``dynamics/work_seconds``, ``dynamics/work_cpu_seconds``, ``dynamics/exact_matrices`` …).

Memory: W_0 (float32, or the stored dtype with ``keep="stored"``) of every recorded tensor, the previous recorded
weights and the previous segment of the decomposed matrices, and the copy of the step in flight (float32) on
``device`` (with the worker process: the copy in a shared buffer, the rest in the worker), one matrix's
decomposition at a time, and the top-k triplets of the anchor steps (1, 2, 4, 8 … steps after the start) for the
lock-in estimate.

Under FSDP2 (DTensor parameters) every rank calls ``record``; each matrix is gathered whole (``full_tensor``, one
at a time) and rank 0 keeps the state and writes; the other ranks keep nothing. Resuming (``resume=True``) after
a crash or from a training checkpoint continues the series from the step the model is at: W_0 comes back from
``base.safetensors``, and steps recorded after that step (which training will redo) are moved to
``superseded/``, not deleted.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from threadpoolctl import ThreadpoolController

from opd_dynamics.errors import InputError
from opd_dynamics.io.naming import MATRIX_GROUPS, PEFT_PREFIX, is_selected, parse_name
from opd_dynamics.io.series import FOREIGN_MEDIAN, median_relative_distance
from opd_dynamics.io.sketches import (
    BASE_FILE,
    SKETCH_CSV,
    SKETCH_JSON,
    SKETCH_VERSION,
    decomposed_names,
    is_sketch_dir,
    read_meta,
    start_weights,
    step_files,
)
from opd_dynamics.io.writer import atomic_file, atomic_write_text, json_text, output_errors, save_safetensors
from opd_dynamics.record.matrices import lora_factors
from opd_dynamics.record.steps import START_STEP, StepRecorder, rewrite_csv
from opd_dynamics.record.topk import CERTIFY_TOL
from opd_dynamics.record.worker import ProcessWorker

#: the recorder's ``svd`` modes (module docstring)
SVD_MODES = ("certified", "exact", "fast")
#: when the worker process works (`DynamicsRecorder`'s ``schedule``)
SCHEDULES = ("beside", "between")


def _is_writer() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _full(p: torch.Tensor) -> torch.Tensor:
    """The whole matrix of a parameter (an FSDP2 DTensor is gathered: a collective every rank joins)."""
    full = getattr(p, "full_tensor", None)
    return (full() if full is not None else p).detach()


_BLAS = ThreadpoolController()


def _snapshot(value: torch.Tensor | tuple, device: torch.device) -> torch.Tensor | tuple:
    """A float32 copy the recorder owns of a weight, or of a LoRA layer's (B, A) (on the CPU: small)."""
    if isinstance(value, tuple):
        return tuple(t.detach().to("cpu", torch.float32, copy=True) for t in value)
    return value.detach().to(device, torch.float32, copy=True)


class DynamicsRecorder:
    """Records the update of a model's selected matrices at chosen steps (module docstring).

    ``every``: record when ``step % every == 0``, or a callable ``step -> bool`` (dense early, sparse later …).
    ``groups``: naming groups whose 2-D weights are recorded. ``device``: where the kept weights live ("cpu" frees
    the accelerator). ``keep``: "float32" or "stored" (W_0 in the parameters' own dtype: half the memory for bf16
    weights, still exact). ``svd``: "certified" (block Krylov certified to ``tol``, else exact), "exact" (the exact
    decomposition every step) or "fast" (warm-started randomized top-k, uncertified: its tail values are
    approximate, see docs/BENCHMARKS.md); all computed in float64 and stored in float32. ``oversample``: the
    columns beyond k of each Krylov (or randomized) block. ``norms``: also record every other trainable tensor
    by its norms (the default; False records the decomposed matrices only, as before).
    ``background``: the work on a step runs beside the next training step, ``record`` only copying the weights (a
    later ``record``, ``wait`` or ``close`` raises a step's error): True picks `record.worker`'s process for weights
    kept on the CPU and a thread for weights kept on a GPU; "process" or "thread" asks for one; False: the work runs
    in ``record`` itself. ``priority``: the worker process's scheduling, "idle" (SCHED_IDLE, or nice 19 where
    there is none: it runs only on cores training leaves idle), "nice" (nice 19: nearly the same beside training,
    but it shares idle cores evenly with other nice-19 processes instead of leaving them all to them) or "normal".
    ``backlog_gb``: disk the worker process may fill with steps it has taken out of the shared buffer but not yet
    measured (files under ``backlog_dir``, default the system's temporary directory; removed as they are
    measured), so that training runs ahead of the worker instead of waiting for it, up to
    ``backlog_gb // (4 bytes × the recorded elements)`` steps (none when one step is larger): on a machine whose cores
    training keeps busy, the work moves to idle time and to ``close``; it is not less work, and nothing recorded
    changes. 0: training waits as soon as the worker is one step behind.
    ``schedule``: "beside" (the default: the worker runs beside training, as above) or "between": ``record`` waits
    until the step is measured, and meanwhile the step's matrices are measured by ``processes`` processes (default:
    every core this process may use; `record.shards`) at normal priority, with no backlog. For training that keeps
    every core busy (training on the CPU), where work beside it costs training about three times its CPU share;
    the numbers recorded are the same bit for bit.
    An ``out_dir`` already holding a sketch series is refused unless ``resume`` (continue it) or ``overwrite``
    (replace it).
    """

    def __init__(self, out_dir: str | Path, k: int = 16, every: int | Callable[[int], bool] = 1,
                 groups: tuple[str, ...] = MATRIX_GROUPS, device: str | torch.device = "cpu",
                 keep: str = "float32", svd: str = "certified", resume: bool = False, overwrite: bool = False,
                 background: bool | str = True, oversample: int = 8, power: int = 1, tol: float = CERTIFY_TOL,
                 norms: bool = True, priority: str = "idle", backlog_gb: float = 4.0,
                 backlog_dir: str | Path | None = None, schedule: str = "beside", processes: int | None = None):
        for name, value, allowed in (("svd", svd, SVD_MODES), ("keep", keep, ("float32", "stored")),
                                     ("background", background, (True, False, "process", "thread")),
                                     ("priority", priority, ("idle", "nice", "normal")),
                                     ("schedule", schedule, SCHEDULES)):
            if value not in allowed:
                raise InputError(None, f"{name} must be {' or '.join(map(str, allowed))}, not {value!r}", (name,))
        if k < 1:
            raise InputError(None, f"k must be at least 1, not {k}", ("k",))
        if not 0 < tol < 1e-2:
            raise InputError(None, f"tol must be a relative bound in (0, 0.01), not {tol}", ("tol",))
        self.out = Path(out_dir)
        self.writer = _is_writer()
        exists = is_sketch_dir(self.out)
        if exists and not (resume or overwrite):
            raise InputError(self.out, f"already holds a sketch series ({SKETCH_JSON}); pass resume=True to continue "
                                       "it or overwrite=True to replace it")
        self.resume = resume and exists
        if overwrite and exists and self.writer:
            shutil.rmtree(self.out)
        self.k, self.groups, self.device, self.svd, self.norms = k, groups, torch.device(device), svd, norms
        self.background = ("process" if torch.device(device).type == "cpu" else "thread") if background is True \
            else background
        # the exact route: scipy's tridiagonal one (2-3x cheaper) except in a thread of this process, where it would
        # hold the GIL the training step's Python needs (torch's eigh releases it)
        self.settings = {"k": k, "svd": svd, "keep": keep, "device": str(self.device), "oversample": oversample,
                         "power": power, "tol": tol, "priority": priority,
                         "vectors": "eigh" if self.background == "thread" else "auto"}
        if self.background == "process" and torch.device(device).type != "cpu":
            raise InputError(None, "background='process' keeps the weights on the CPU; use device='cpu' or "
                                   "background='thread'", ("background", "device"))
        self.schedule = schedule
        if schedule == "between":  # training waits for each step; the work takes every core meanwhile
            if self.background != "process":
                raise InputError(None, "schedule='between' spreads the work over processes: it needs the worker "
                                       "process (background=True or 'process', device='cpu')", ("schedule",))
            processes = len(os.sched_getaffinity(0)) if processes is None else processes
            if processes < 1:
                raise InputError(None, f"processes must be at least 1, not {processes}", ("processes",))
            self.settings.update(processes=processes, priority="normal")
            backlog_gb = 0.0
        elif processes is not None:
            raise InputError(None, "processes is for schedule='between'", ("processes",))
        if backlog_gb < 0:
            raise InputError(None, f"backlog_gb must be 0 or more, not {backlog_gb}", ("backlog_gb",))
        if backlog_dir is not None and not Path(backlog_dir).is_dir():
            raise InputError(backlog_dir, "is not a directory (backlog_dir: where the recorder's backlog waits)",
                             ("backlog_dir",))
        self.backlog = (float(backlog_gb), None if backlog_dir is None else str(backlog_dir))
        self.backlog_steps = 0  # how many steps the worker process may hold (known once it has started)
        self.every = every if callable(every) else (lambda s, n=int(every): s % n == 0)
        self.started = False
        self.steps: StepRecorder | None = None  # the work, in this process (foreground or a thread)
        self.decomposed: set[str] = set()  # the targets decomposed (the rest recorded by their norms)
        self.worker: ProcessWorker | None = None  # or in a process of its own
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self.completed: list[dict[str, float]] = []
        #: where the work runs, and at what priority (said once the recorder has started)
        self.scheduling = "in the training process" if self.background is False else "a thread of the training process"
        #: seconds spent: in ``record`` by the calling (training) thread, on the steps' work wherever it ran
        #: (wall clock, and the CPU time of the thread that did it), and by training waiting for the worker process
        self.seconds = {"record": 0.0, "work": 0.0, "work_cpu": 0.0, "waited": 0.0}
        #: the last finished step's scalars (what `DynamicsCallback` logs): update norm by group, the segment norm
        #: and cosine, the cosine of ΔW_t to the previous recorded ΔW, the lock-in estimate, the step file's size
        self.scalars: dict[str, float] = {}

    # ---- the selection and the start ----

    def _targets(self, model: torch.nn.Module) -> dict[str, tuple[str, object]]:
        """{name: ("dense", parameter) or ("lora", module)}: the trainable 2-D weights of the selected groups, and
        the PEFT LoRA layers over a selected base weight (named as the merged model names that weight), first; then,
        with ``norms``, ("norm", parameter) for every other trainable floating-point parameter outside the LoRA
        layers (``named_parameters`` gives a tied parameter once, under its first name: a tied head is the
        embedding). Sets ``self.decomposed``."""
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
        normed: dict[str, tuple[str, object]] = {}
        for n, p in model.named_parameters():
            if id(p) in under_lora or not p.requires_grad or not p.is_floating_point():
                continue
            if p.dim() == 2 and is_selected(n, tuple(p.shape), self.groups, True):
                out[n] = ("dense", p)
            elif self.norms:
                normed[n.removeprefix(PEFT_PREFIX)] = ("norm", p)
        self.decomposed = set(out)
        return {**out, **normed}

    @staticmethod
    def _gather(targets: dict[str, tuple[str, object]]) -> dict[str, object]:
        """Each target's current value, whole (FSDP2 DTensors gathered: collectives every rank joins, one at a time):
        a dense weight, or a LoRA layer's (B, A)."""
        out = {}
        for n, (kind, obj) in targets.items():
            out[n] = tuple(_full(t) for t in lora_factors(obj)[:2]) if kind == "lora" else _full(obj)
        return out

    def _start(self, model: torch.nn.Module, step: int) -> None:
        targets = self._targets(model)
        if not self.decomposed:
            raise InputError(None, f"the model has no trainable 2-D weights in the groups {', '.join(self.groups)}")
        if self.resume:  # every rank: the tensors the series records (one written before norms were: its matrices)
            with output_errors(self.out):
                recorded = read_meta(self.out)["tensors"]
            targets = {n: t for n, t in targets.items() if n in recorded}
        if not self.resume and step != START_STEP:
            raise InputError(self.out, f"cannot start recording at step {step}: a new sketch series needs the start "
                                       f"weights (step {START_STEP}); attach the recorder before training starts, or "
                                       "resume=True into the series that recorded the start")
        self.started = True
        self.prev_step = step
        self.targets = targets  # the same parameters and modules every step: selected (names parsed) once
        gathered = self._gather(targets)
        if not self.writer:
            return
        lora_scale = {n: lora_factors(obj)[2] for n, (kind, obj) in targets.items() if kind == "lora"}
        bases = {n: _full(obj.base_layer.weight) if kind == "lora" else gathered[n] for n, (kind, obj) in
                 targets.items()}
        shapes = {n: tuple(t.shape) for n, t in bases.items()}
        with output_errors(self.out):
            if self.resume:
                done = self._continue(bases, shapes, step)
            else:
                self.out.mkdir(parents=True, exist_ok=True)
                stored = {n: t.cpu().contiguous() for n, t in bases.items()}
                for n in lora_scale:
                    stored[f"{n}::lora_B0"], stored[f"{n}::lora_A0"] = (t.cpu().contiguous() for t in gathered[n])
                with atomic_file(self.out / BASE_FILE) as tmp:
                    save_safetensors(stored, tmp)
                meta = {"version": SKETCH_VERSION, "k": self.k, "groups": list(self.groups),
                        "start_step": START_STEP, "svd": self.svd,
                        **({"tol": self.settings["tol"]} if self.svd == "certified" else {}),
                        "tensors": {n: {"shape": list(s), "group": parse_name(n).group,
                                        "decomposed": n in self.decomposed,
                                        **({"lora_scale": lora_scale[n]} if n in lora_scale else {})}
                                    for n, s in shapes.items()}}
                atomic_write_text(self.out / SKETCH_JSON, json_text(meta))
                (self.out / SKETCH_CSV).unlink(missing_ok=True)
                done = set()
        if self.background == "process":
            parts = {n: [tuple(t.shape) for t in (v if isinstance(v, tuple) else (v,))] for n, v in gathered.items()}
            self.worker = ProcessWorker(self.out, self.settings, parts, *self.backlog)
            self.backlog_steps = self.worker.backlog
            self.scheduling = f"worker process at {self.worker.scheduling}, backlog of {self.backlog_steps} steps"
        else:
            self.steps = StepRecorder(self.out, self.settings)
            if self.background:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="dynamics-recorder")
        # continue from the weights now; on a resumed run they are also a step of the series, unless recorded
        measure = self.resume and step not in done and step != START_STEP
        self._submit(gathered, step, self.resume_prev if self.resume else START_STEP, False if measure else None,
                     restart=True)

    def _continue(self, bases: dict[str, torch.Tensor], shapes: dict[str, tuple], step: int) -> set[int]:
        """Check the series in ``self.out`` is this model's, set aside the steps after ``step`` (training redoes
        them) and give the steps kept (module docstring)."""
        meta = read_meta(self.out)
        want = {n: tuple(v["shape"]) for n, v in meta["tensors"].items()}
        if want != shapes:
            other = sorted(set(want) ^ set(shapes)) or [n for n in want if want[n] != shapes[n]]
            raise InputError(self.out, f"was recorded from another model: its matrices differ from this model's "
                                       f"({other[0]})")
        recorded = set(decomposed_names(meta["tensors"]))
        flipped = sorted(n for n in meta["tensors"] if (n in recorded) != (n in self.decomposed))
        if flipped:
            raise InputError(self.out, f"was recorded with other groups decomposed: {flipped[0]} is "
                                       f"{'' if flipped[0] in self.decomposed else 'not '}decomposed in this recorder")
        if int(meta["k"]) != self.k:
            raise InputError(self.out, f"was recorded with k = {meta['k']}, not {self.k}")
        median = median_relative_distance((bases[n], w) for n, w in start_weights(self.out, shapes))
        if median >= FOREIGN_MEDIAN:
            raise InputError(self.out, f"was recorded from another model: this model's weights are {median:.2f} of "
                                       "W_0's norm away from its start (median over matrices)")
        later = [f for s, f in step_files(self.out).items() if s > step]
        if later:  # never lose them
            aside = self.out / "superseded"
            aside.mkdir(exist_ok=True)
            for f in later:
                f.replace(aside / f.name)
        (self.out / SKETCH_CSV).unlink(missing_ok=True)  # derived from the step files
        done = step_files(self.out)
        if done:
            rewrite_csv(self.out)
        self.resume_prev = max((s for s in done if s <= step), default=START_STEP)
        return set(done)

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
        gathered = self._gather(self.targets)
        if self.writer:  # a copy of the weights now; the work on it may run beside the next training step
            self._submit(gathered, step, self.prev_step, True)
            if self.schedule == "between":
                self.wait()
        self.prev_step = step
        self.seconds["record"] += time.perf_counter() - t0
        return True

    def _submit(self, gathered: dict[str, object], step: int, prev_step: int, segment: bool | None,
                restart: bool = False) -> None:
        """Hand a step's weights to wherever the work runs (the worker process copies them straight into its
        shared buffer; work in this process gets a copy of its own); ``segment`` None only restarts from them."""
        if self.worker is not None:
            self.worker.submit(gathered, step, prev_step, segment, restart)
            self._collect()
            return
        snapshot = {n: _snapshot(v, self.device) for n, v in gathered.items()}
        self.wait()
        if self._pool is None:
            self._work(snapshot, step, prev_step, segment, restart)
        else:
            self._pending = self._pool.submit(self._work, snapshot, step, prev_step, segment, restart)

    def _work(self, snapshot: dict[str, object], step: int, prev_step: int, segment: bool | None,
              restart: bool) -> None:
        """In this process: its BLAS held to one thread, since beside a training step a second one only contends
        for the cores training uses (measured on the lab: 434 against 127 ms of work per step)."""
        with _BLAS.limit(limits=1, user_api="blas"):
            if restart:
                self.steps.restart(snapshot)
            if segment is not None:
                self._finished(self.steps.measure(snapshot, step, prev_step, segment))
        self.seconds["work"], self.seconds["work_cpu"] = self.steps.seconds, self.steps.cpu_seconds

    def _finished(self, scalars: dict[str, float]) -> None:
        self.scalars = scalars
        self.completed.append(scalars)

    def _collect(self) -> None:
        """The worker process's finished steps."""
        for scalars in self.worker.completed:
            self._finished(scalars)
        self.worker.completed.clear()
        self.seconds["work"], self.seconds["work_cpu"] = self.worker.seconds, self.worker.cpu_seconds
        self.seconds["waited"] = self.worker.waited

    def wait(self) -> None:
        """Finish the steps being recorded in the background (raising a step's error)."""
        if self.worker is not None:
            try:
                self.worker.wait()
            finally:
                self._collect()
            return
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def pop_completed(self) -> list[dict[str, float]]:
        """The scalars of the steps finished since the last call (each with ``dynamics/step``), oldest first."""
        if self.worker is not None:
            self._collect()
        done, self.completed = self.completed, []
        return done

    def close(self) -> None:
        """Finish the steps in flight, stop the worker, and rewrite sketch.csv from the step files (a clean
        table)."""
        try:
            self.wait()
        finally:
            if self.worker is not None:
                self.worker.close()
                self._collect()
            if self._pool is not None:
                self._pool.shutdown()
            self.worker, self._pool, self.steps = None, None, None
        if self.started and self.writer and step_files(self.out):
            with output_errors(self.out):
                rewrite_csv(self.out)

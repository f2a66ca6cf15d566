"""The recorder's per-step work in a process of its own, beside training.

A thread is not enough: the work's Python holds the GIL, and a training step's Python (TRL's generation loop)
waits for it (on the lab, a background thread left the step +8 to +12 % slower, no better than recording in the
training thread). The worker is started as ``python -m opd_dynamics.record`` (a fresh interpreter: never a
fork of the training process, whose threads and CUDA context a fork would break, and never a re-import of the
training script, which multiprocessing's spawn would do). It runs a `steps.StepRecorder` on the sketch directory.

Each step's weights cross in one shared-memory buffer (a file in /dev/shm mapped by both, float32, every recorded
tensor at a fixed offset): the training process copies the weights in and writes one line on the worker's stdin;
a thread of the worker copies them out, answers ``copied`` (the buffer is free again), and queues the step; the
worker's main thread measures the queued steps in order and answers ``done`` with each step's scalars, or ``error``
with the sentence. Before overwriting the buffer the training process waits for the previous ``copied``. How far the
worker may fall behind is its backlog (``backlog_gb`` over the buffer's size, steps held in files of their own
under ``backlog_dir``): with none, a step is copied out only once the one before it is measured (held in memory).

The worker yields to training: it runs at SCHED_IDLE (or nice 19 where there is none; ``priority="normal"`` keeps
the default) with one thread in torch and in every BLAS (its environment and threadpoolctl), so on a machine whose
cores training keeps busy it only uses what training leaves idle, and a training step waits for it only when a
step's work needs more than that. While training does wait for it, the worker is the critical path: it is lifted
to the normal policy for that time (where the system permits it: root, CAP_SYS_NICE or an RLIMIT_NICE of 20),
so that other processes on a shared machine do not starve it while training's cores stand idle. (It stays on one
thread then too: letting it take every core while training waits made it 30x slower in CPU time on the loaded
2-core machine, its BLAS and OpenMP threads spinning against other processes.) What it runs is the same whatever
its priority: only when it runs changes.

Under the recorder's ``schedule="between"`` training waits for every step instead, and the worker shares the step's
matrices out to helper processes, one per core (`record.shards`): it holds each step in a second shared buffer
(the stage) that they read, runs at normal priority, and keeps no backlog.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import torch

from opd_dynamics.errors import InputError
from opd_dynamics.record.buffer import buffer_layout, shared_buffer, step_views, tensor_views

#: the worker's environment: one thread in every BLAS and OpenMP runtime it may load
ONE_THREAD = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                                "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")}


def lower_priority(priority: str) -> str:
    """Lower this process's scheduling priority ("idle": SCHED_IDLE, else nice 19; "nice": nice 19; "normal":
    unchanged); what was set, in words."""
    if priority not in ("idle", "nice"):
        return "normal"
    if priority == "idle" and hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return "SCHED_IDLE"
        except OSError:
            pass
    try:
        os.nice(19 - os.nice(0))
        return "nice 19"
    except OSError:
        return "normal"


class ProcessWorker:
    """The training process's end: starts the worker, hands it each step, and reads its answers."""

    def __init__(self, out: Path, settings: dict, shapes: dict[str, list[tuple[int, ...]]],
                 backlog_gb: float = 0.0, backlog_dir: str | None = None):
        self.out = Path(out)
        self.layout, total = buffer_layout(shapes)
        #: steps the worker may hold on disk while training runs ahead (each the buffer's size)
        self.backlog = int(backlog_gb * 2 ** 30 // (4 * max(total, 1)))
        path, self.buffer = shared_buffer(max(total, 1))
        self.buffer_path = Path(path)
        self.views = tensor_views(self.buffer, self.layout)
        self.unanswered: list[int] = []  # steps handed over whose ``done`` has not been read
        self.busy = False  # the buffer holds a step the worker has not copied out yet
        self.completed: list[dict[str, float]] = []
        self.seconds = self.cpu_seconds = 0.0
        self.scheduling = ""  # what the worker's priority became ("SCHED_IDLE", "nice 19", "normal")
        self.can_lift = True  # whether lifting it while training waits is permitted (found at the first try)
        self.waited = 0.0  # seconds the training process spent waiting for the worker
        self.log = tempfile.TemporaryFile(mode="w+")  # the worker's stderr, for the sentence if it dies
        config = {"out": str(self.out), "settings": {**settings, "backlog_dir": backlog_dir}, "buffer": path,
                  "size": max(total, 1), "backlog": self.backlog,
                  "layout": {n: [[o, list(s)] for o, s in parts] for n, parts in self.layout.items()}}
        self.proc = subprocess.Popen([sys.executable, "-m", "opd_dynamics.record"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1,
                                     env={**os.environ, **ONE_THREAD})
        # a recorder dropped without close(): its worker sees the end of its input and exits, nothing stays open
        self._finalizer = weakref.finalize(self, _release, self.proc, self.log)
        try:
            self.proc.stdin.write(json.dumps(config) + "\n")
            self.scheduling = self._expect("ready").get("scheduling", "")
        finally:  # both ends have it mapped (or the worker failed): nothing is left in /dev/shm if either dies
            self.buffer_path.unlink(missing_ok=True)

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            tail = [ln for ln in self.log.read().strip().splitlines() if ln.strip()][-1:] or ["no message"]
            self.unanswered.clear()
            self.busy = False
            raise InputError(self.out, f"the recorder's worker process ended (exit {self.proc.returncode}): "
                                       f"{tail[0][:300]}")
        msg = json.loads(line)
        if msg["op"] == "error":
            self.unanswered.clear()
            self.busy = False
            raise InputError(msg["path"], msg["problem"])
        if msg["op"] == "done":
            self.unanswered.remove(msg["step"])
            self.completed.append(msg["scalars"])
            self.seconds, self.cpu_seconds = msg["seconds"], msg.get("cpu_seconds", 0.0)
        return msg

    def _expect(self, op: str) -> dict:
        while True:
            msg = self._read()
            if msg["op"] == op:
                return msg

    def submit(self, snapshot: dict[str, object], step: int, prev_step: int, segment: bool | None,
               restart: bool = False) -> None:
        """Hand one step over (after the worker has taken the previous one out of the buffer): ``restart`` first
        continues from these weights (a resumed run); ``segment`` None measures nothing."""
        if self.busy:
            with self._lifted():
                self._expect("copied")
            self.busy = False
        for name, value in snapshot.items():
            for view, t in zip(self.views[name], value if isinstance(value, tuple) else (value,)):
                view.copy_(t.detach())
        if segment is not None:  # None: only restart from these weights, nothing to measure
            self.unanswered.append(step)
        self.busy = True
        self._send({"op": "step", "step": step, "prev_step": prev_step, "segment": segment, "restart": restart})

    def _send(self, msg: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
        except BrokenPipeError:
            self._read()  # the worker is gone: its sentence

    def wait(self) -> None:
        """Until every step handed over is done (raising a step's error)."""
        with self._lifted():
            while self.unanswered:
                self._read()
        self.busy = False

    @contextlib.contextmanager
    def _lifted(self):
        """While training waits: the worker at the normal policy (module docstring), and the wait timed."""
        t0 = time.perf_counter()
        lift = self.scheduling in ("SCHED_IDLE", "nice 19") and self.can_lift and self.proc.poll() is None
        if lift:
            lift = self._policy(True)
        try:
            yield
        finally:
            if lift and self.proc.poll() is None:
                self._policy(False)
            self.waited += time.perf_counter() - t0

    def _policy(self, lifted: bool) -> bool:
        """Every thread of the worker (Linux schedules threads, not processes) lifted, or lowered again."""
        try:
            tasks = [int(t) for t in os.listdir(f"/proc/{self.proc.pid}/task")]
        except OSError:
            tasks = [self.proc.pid]
        try:
            for tid in tasks:
                if self.scheduling == "SCHED_IDLE":
                    os.sched_setscheduler(tid, os.SCHED_OTHER if lifted else os.SCHED_IDLE, os.sched_param(0))
                else:
                    os.setpriority(os.PRIO_PROCESS, tid, 0 if lifted else 19)
            return True
        except OSError:  # not permitted (an unprivileged user with RLIMIT_NICE below 20), or the worker is gone
            self.can_lift = False
            return False

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self.proc.poll() is None:
                try:
                    self._send({"op": "close"})
                except InputError:
                    pass
            self._finalizer()


def _release(proc: subprocess.Popen, log) -> None:
    """Close the worker's pipes (it exits at the end of its input), wait for it, close its log."""
    for pipe in (proc.stdin, proc.stdout):
        try:
            pipe.close()
        except OSError:
            pass
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


_REPLY = threading.Lock()  # the receiving thread and the main thread both answer


def _reply(msg: dict) -> None:
    with _REPLY:
        sys.stdout.write(json.dumps(msg, allow_nan=True) + "\n")
        sys.stdout.flush()


class _Backlog:
    """Steps taken out of the shared buffer and not yet measured: at most ``1 + depth`` at a time (the one being
    measured and ``depth`` waiting, each in a file of its own under ``where``); with ``depth`` 0 the next step is
    taken only once the previous one is measured, and it is held in memory."""

    def __init__(self, depth: int, where: str | None, size: int, stage: torch.Tensor | None = None):
        self.size = size
        self.stage = stage  # with depth 0: the step is held here, in memory helper processes also map
        self.slots = threading.Semaphore(depth + 1)
        self.queue: queue.Queue = queue.Queue()
        self.dir = Path(tempfile.mkdtemp(prefix="opd-dynamics-backlog-", dir=where)) if depth else None

    def take(self, buffer: torch.Tensor, msg: dict) -> None:
        """Copy the buffer out (waiting for a free slot first) and queue the step."""
        self.slots.acquire()
        if self.dir is None:
            self.queue.put((msg, buffer.clone() if self.stage is None else self.stage.copy_(buffer)))
            return
        path = self.dir / f"step-{msg['step']}.buf"
        with open(path, "wb") as f:
            f.write(memoryview(buffer.numpy()).cast("B"))
        self.queue.put((msg, path))

    def get(self) -> tuple[dict, torch.Tensor] | None:
        item = self.queue.get()
        if item is None:
            return None
        msg, held = item
        if isinstance(held, Path):
            flat = torch.from_numpy(np.fromfile(held, dtype=np.float32, count=self.size))
            held.unlink()
            held = flat
        return msg, held

    def done(self) -> None:
        self.slots.release()

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def main() -> None:
    """The worker's loop (module docstring): a thread takes each step out of the shared buffer as soon as a slot
    of the backlog is free and answers ``copied``; the main thread measures the steps in order."""
    from threadpoolctl import threadpool_limits

    from opd_dynamics.io.sketches import decomposed_names, read_meta
    from opd_dynamics.record.shards import Helpers, split
    from opd_dynamics.record.steps import StepRecorder

    config = json.loads(sys.stdin.readline())
    settings = config["settings"]
    scheduling = lower_priority(settings.get("priority", "idle"))
    torch.set_num_threads(1)
    threadpool_limits(1)
    buffer = torch.from_file(config["buffer"], shared=True, size=config["size"], dtype=torch.float32)
    layout = {n: [(o, tuple(s)) for o, s in parts] for n, parts in config["layout"].items()}
    helpers = None
    try:
        names, stage = None, None
        if int(settings.get("processes", 1)) > 1:  # schedule "between": the step's matrices over processes
            meta = read_meta(Path(config["out"]))["tensors"]
            shares = [s for s in split({n: tuple(v["shape"]) for n, v in meta.items()},
                                       set(decomposed_names(meta)),
                                       int(settings["processes"])) if s]
            names = shares[0]
            stage_path, stage = shared_buffer(config["size"])
            try:
                helpers = Helpers(Path(config["out"]), settings, shares[1:], stage_path, config["size"], layout)
            finally:
                os.unlink(stage_path)
            scheduling += f", {len(shares)} processes"
        steps = StepRecorder(Path(config["out"]), settings, cpu_clock=time.process_time, names=names,
                             helpers=helpers)
        # with helpers, one step at a time (they read it from the stage buffer)
        backlog = _Backlog(int(config.get("backlog", 0)) if stage is None else 0, settings.get("backlog_dir"),
                           config["size"], stage)
    except InputError as e:
        if helpers is not None:
            helpers.close()
        _reply({"op": "error", "path": e.path, "problem": e.problem})
        return
    except OSError as e:
        if helpers is not None:
            helpers.close()
        _reply({"op": "error", "path": settings.get("backlog_dir") or tempfile.gettempdir(),
                "problem": f"cannot hold the recorder's backlog: {e.strerror or e}"})
        return

    def receive() -> None:
        try:
            for line in sys.stdin:
                msg = json.loads(line)
                if msg["op"] == "close":
                    break
                try:
                    backlog.take(buffer, msg)
                except OSError as e:  # a full disk under the backlog: one sentence, and the worker stops
                    _reply({"op": "error", "path": str(backlog.dir), "problem": "cannot hold the recorder's "
                            f"backlog: {e.strerror or e} (pass backlog_gb=0 to keep none)"})
                    break
                _reply({"op": "copied", "step": msg["step"]})
        finally:
            backlog.queue.put(None)

    _reply({"op": "ready", "scheduling": scheduling})
    threading.Thread(target=receive, daemon=True).start()
    try:
        with torch.no_grad():
            while (item := backlog.get()) is not None:
                msg, flat = item
                # views of the step's own copy (taken out of the shared buffer by `_Backlog.take`): no second copy
                snap = step_views(flat, layout)
                try:
                    if msg["restart"]:
                        steps.restart(snap)
                    if msg["segment"] is not None:
                        scalars = steps.measure(snap, msg["step"], msg["prev_step"], msg["segment"])
                        _reply({"op": "done", "step": msg["step"], "scalars": scalars, "seconds": steps.seconds,
                                "cpu_seconds": steps.cpu_seconds})
                except InputError as e:
                    _reply({"op": "error", "path": e.path, "problem": e.problem})
                finally:
                    backlog.done()
    finally:
        backlog.close()
        if helpers is not None:
            helpers.close()

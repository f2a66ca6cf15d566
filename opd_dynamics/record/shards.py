"""A step's matrices spread over processes, for the recorder's ``schedule="between"``.

Beside a training step that keeps every core busy (training on the CPU), the worker's work costs training about
three times its CPU share, because the two share the cores (measured: docs/BENCHMARKS.md). Under "between" the
training process waits for each step instead, and the work uses every core meanwhile: the worker process measures
one share of the matrices and helper processes the others, each a fresh interpreter (multiprocessing's spawn) on one
thread, holding the state (W_0, the previous weights and segment, the Krylov basis) of its own matrices only.

Each matrix is measured by the same code on one thread whichever process holds it, so every number recorded equals
what one process records, bit for bit; the sums over matrices are added afterwards in the series' order.
The helpers read the step from a second shared buffer of the worker (the stage), which the worker fills with the next
step only once this one is measured; each copies its share before measuring it.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import time
from pathlib import Path

import torch

from opd_dynamics.errors import InputError
from opd_dynamics.record.buffer import step_views
from opd_dynamics.record.matrices import Measured, build_matrices, copied


def split(shapes: dict[str, tuple[int, ...]], decomposed: set[str], parts: int) -> list[list[str]]:
    """The tensors in ``parts`` shares of about equal work (longest first onto the lightest share; a decomposed
    m × n matrix costs about m·n·min(m, n), a tensor recorded by its norms its size), each share in series order."""
    pos = {n: i for i, n in enumerate(shapes)}
    cost = {n: math.prod(s) * (min(s[-2:]) if n in decomposed and len(s) >= 2 else 1) for n, s in shapes.items()}
    loads, shares = [0] * parts, [[] for _ in range(parts)]
    for n in sorted(shapes, key=lambda n: (-cost[n], pos[n])):
        i = loads.index(min(loads))
        shares[i].append(n)
        loads[i] += cost[n]
    return [sorted(s, key=pos.get) for s in shares]


class Helpers:
    """The helper processes of one worker: started with their shares, handed each step, and read back."""

    def __init__(self, out: Path, settings: dict, shares: list[list[str]], buffer: str, size: int, layout: dict):
        ctx = mp.get_context("spawn")
        self.out = Path(out)
        self.conns, self.procs = [], []
        for names in shares:
            here, there = ctx.Pipe()
            p = ctx.Process(target=helper_main, args=(there, str(out), settings, names, buffer, size,
                                                      {n: layout[n] for n in names}), daemon=True)
            p.start()
            there.close()
            self.conns.append(here)
            self.procs.append(p)
        #: each matrix's ‖W_0‖F, from the helper that holds it
        self.base_norm: dict[str, float] = {}
        for reply in self._gather():
            self.base_norm.update(reply)

    def send(self, op: str, segment: bool | None = None) -> None:
        for c in self.conns:
            c.send((op, segment))

    def restart(self) -> None:
        """Every helper continues from the weights in the buffer (a resumed run), once it has copied them."""
        self.send("restart")
        self._gather()

    def collect(self) -> tuple[dict[str, Measured], float]:
        """Every helper's measured matrices of the step handed over, and the CPU seconds they spent on it."""
        measured, cpu = {}, 0.0
        for part, seconds in self._gather():
            for n, m in part.items():
                if m.triplet is not None:
                    m.triplet = tuple(torch.from_numpy(t) for t in m.triplet)
                measured[n] = m
            cpu += seconds
        return measured, cpu

    def _gather(self) -> list:
        out = []
        for c, p in zip(self.conns, self.procs):
            try:
                reply = c.recv()
            except (EOFError, OSError):
                p.join(5)
                raise InputError(self.out, f"a helper process of the recorder's worker ended (exit {p.exitcode})") \
                    from None
            if isinstance(reply, InputError):
                raise reply
            out.append(reply)
        return out

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("close", None))
                c.close()
            except OSError:
                pass
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()


def helper_main(conn, out: str, settings: dict, names: list[str], buffer: str, size: int, layout: dict) -> None:
    """One helper's loop: build its matrices, answer their base norms, then measure each step handed over."""
    from threadpoolctl import threadpool_limits

    os.dup2(2, 1)  # the worker's stdout (inherited) carries its answers to training: nothing of ours goes there
    torch.set_num_threads(1)
    threadpool_limits(1)
    flat = torch.from_file(buffer, shared=True, size=size, dtype=torch.float32)
    views = step_views(flat, {n: [(o, tuple(s)) for o, s in parts] for n, parts in layout.items()})
    try:
        matrices = build_matrices(Path(out), settings, names)
    except InputError as e:
        conn.send(e)
        return
    conn.send({n: m.base_norm for n, m in matrices.items()})
    with torch.no_grad():
        while True:
            try:
                op, segment = conn.recv()
            except EOFError:  # the worker is gone
                return
            if op == "close":
                return
            c0 = time.process_time()
            # copies: a matrix keeps the weights it measured (the next segment starts there), and the buffer is
            # overwritten by the next step
            snap = {n: copied(v) for n, v in views.items()}
            if op == "restart":
                for n, m in matrices.items():
                    m.restart(snap[n])
                conn.send("restarted")
                continue
            measured = {n: _portable(measure_one(m, snap[n], segment)) for n, m in matrices.items()}
            conn.send((measured, time.process_time() - c0))


def _portable(m: Measured) -> Measured:
    """Its triplet as numpy arrays: sent through the pipe by value, not as torch's shared-memory handles."""
    if m.triplet is not None:
        m.triplet = tuple(t.numpy() for t in m.triplet)
    return m


def measure_one(mat, snap, segment: bool) -> Measured:
    """A matrix measured, with what its decomposition cost (``Measured.work``)."""
    m = mat.measure(snap, segment)
    m.work = dict(mat.work) if m.triplet is not None and mat.decomposed else {}
    return m

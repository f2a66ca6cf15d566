"""The recorder's shared step buffers: one float32 buffer per step, every recorded tensor at a fixed offset, in a
file of /dev/shm that the training process, the worker and its helpers map by its path (`record.worker`,
`record.shards`)."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch

#: where the shared buffer lives (memory on Linux); the system's temporary directory where it does not exist
SHM = Path("/dev/shm")


def buffer_layout(shapes: dict[str, list[tuple[int, ...]]]) -> tuple[dict[str, list[tuple[int, tuple]]], int]:
    """({name: [(offset, shape) per tensor]}, total elements) of a buffer holding every tensor of ``shapes``."""
    layout, at = {}, 0
    for name, parts in shapes.items():
        layout[name] = []
        for shape in parts:
            layout[name].append((at, tuple(shape)))
            at += math.prod(shape)
    return layout, at


def shared_buffer(size: int) -> tuple[str, torch.Tensor]:
    """A float32 buffer of ``size`` elements in a file of /dev/shm (the temporary directory where there is none)
    that other processes map by its path; the caller unlinks it once they have."""
    where = SHM if SHM.is_dir() else Path(tempfile.gettempdir())
    fd, path = tempfile.mkstemp(prefix="opd-dynamics-recorder-", suffix=".buf", dir=where)
    os.close(fd)
    return path, torch.from_file(path, shared=True, size=size, dtype=torch.float32)


def tensor_views(buf: torch.Tensor, layout) -> dict[str, list[torch.Tensor]]:
    """Each recorded tensor's parts (one, or a LoRA layer's two) as views of ``buf`` at their `buffer_layout` place."""
    return {n: [buf[o: o + math.prod(s)].view(s) for o, s in parts] for n, parts in layout.items()}


def step_views(flat: torch.Tensor, layout) -> dict[str, torch.Tensor | tuple[torch.Tensor, ...]]:
    """Each recorded tensor's value in a step's buffer, as `record` handed it over: a weight, or a LoRA layer's
    (B, A); views, no copy."""
    return {n: tuple(vs) if len(vs) > 1 else vs[0] for n, vs in tensor_views(flat, layout).items()}

"""A sketch series on disk: what `record.DynamicsRecorder` writes during training, read back like a checkpoint series.

Layout of one sketch directory (every file written under a temporary name and renamed):

- ``sketch.json``: the recording's settings (k, groups, start step, svd and its tol) and each recorded tensor's
  shape, group and whether it is ``decomposed`` (the matrices of the recorded groups) or recorded by its norms
  only (every other trainable tensor; series written before norms were recorded hold matrices only, and no flag);
- ``base.safetensors``: the start weights W_0 of the recorded tensors in their stored dtype (what lets a
  crashed or resumed run continue, and a check against a base checkpoint);
- ``step-NNNNNNNN.safetensors``: per recorded step and decomposed matrix ``<name>::U`` (out × k), ``::S`` (k),
  ``::V`` (in × k) in float32, and in its metadata the step's rows of the ``sketch`` table (JSON), the previous
  recorded step (so a missing step file is found) and what the step's work cost (``work``: seconds, CPU seconds,
  matrices per route, block products, the largest certified bound);
- ``sketch.csv``: the ``sketch`` table (`schema.TABLES["sketch"]`), appended after each step and rewritten at the
  end. The step files are the record; the CSV is for reading with pandas.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open

from opd_dynamics.errors import InputError
from opd_dynamics.io.series import FOREIGN_MEDIAN, median_relative_distance
from opd_dynamics.schema import TABLES

SKETCH_JSON = "sketch.json"
BASE_FILE = "base.safetensors"
SKETCH_CSV = TABLES["sketch"].file
STEP_FILE = re.compile(r"^step-(\d{8})\.safetensors$")
#: the format of sketch.json and the step files' metadata
SKETCH_VERSION = 1


def step_file(path: Path, step: int) -> Path:
    return path / f"step-{step:08d}.safetensors"


def is_sketch_dir(path: str | Path) -> bool:
    return (Path(path) / SKETCH_JSON).is_file()


def step_files(path: Path) -> dict[int, Path]:
    """{step: file} of the step files at the top of a sketch directory."""
    return dict(sorted((int(m.group(1)), p) for p in path.iterdir() if (m := STEP_FILE.match(p.name))))


def read_meta(path: Path) -> dict:
    f = path / SKETCH_JSON
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f, f"is not a readable sketch series description ({e})") from None
    if not isinstance(meta, dict) or meta.get("version") != SKETCH_VERSION or "tensors" not in meta:
        raise InputError(f, f"is not a sketch series description of version {SKETCH_VERSION}")
    return meta


def decomposed_names(tensors: dict[str, dict]) -> list[str]:
    """The tensors of ``sketch.json``'s ``tensors`` that have triplets, in order; the rest are recorded by their norms
    only (a series written before norms were recorded has no flag: all its tensors are decomposed)."""
    return [n for n, v in tensors.items() if v.get("decomposed", True)]


def start_weights(path: Path, names) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, W_0 as stored) of each of ``names``, read one at a time from the series' base.safetensors."""
    with safe_open(path / BASE_FILE, "pt") as fh:
        for n in names:
            yield n, fh.get_tensor(n)


def step_metadata(f: Path) -> dict[str, str]:
    try:
        with safe_open(f, "pt") as fh:
            return fh.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise InputError(f, f"is not a readable sketch step file ({str(e)[:160]})") from None


class SketchSeries:
    """One recorded run: its steps, the ``sketch`` table and each step's stored triplets.

    A step the chain of step files or ``sketch.csv`` names but whose file is absent is refused in one sentence
    naming it (a series with a hole would give wrong segment and alignment figures silently).
    """

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path)
        if not is_sketch_dir(self.path):
            raise InputError(self.path, f"is not a sketch series (no {SKETCH_JSON})")
        self.name = name or self.path.name
        self.meta = read_meta(self.path)
        self.k = int(self.meta["k"])
        self.start_step = int(self.meta["start_step"])
        self.tensors: dict[str, dict] = self.meta["tensors"]
        #: the tensors with triplets (the rest are recorded by their norms only)
        self.decomposed = decomposed_names(self.tensors)
        self.files = step_files(self.path)
        rows, work = [], []
        for step, f in self.files.items():
            md = step_metadata(f)
            if "work" in md:
                work.append({"step": step, **json.loads(md["work"])})
            prev = int(md.get("prev_step", self.start_step))
            if prev != self.start_step and prev not in self.files:
                raise InputError(step_file(self.path, prev), f"is missing: step {step} was recorded after step {prev}, "
                                                              "whose sketch is absent")
            rows.extend(json.loads(md.get("rows", "[]")))
        listed = self._csv_steps()
        gone = sorted(listed - set(self.files))
        if gone:
            raise InputError(step_file(self.path, gone[0]), f"is missing: {SKETCH_CSV} lists step {gone[0]}")
        if not self.files:
            raise InputError(self.path, "holds no recorded step (step-NNNNNNNN.safetensors)")
        self.table = pd.DataFrame(rows, columns=TABLES["sketch"].names)
        #: per recorded step, what its work cost where it ran (seconds, cpu_seconds, routes, products, sigma_bound)
        self.work = pd.DataFrame(work, columns=["step", "seconds", "cpu_seconds", "routes", "products",
                                                "sigma_bound"])

    def _csv_steps(self) -> set[int]:
        """The steps sketch.csv lists, less a last line a crash cut short (the step files are the record)."""
        f = self.path / SKETCH_CSV
        if not f.exists():
            return set()
        lines = f.read_text().split("\n")[1:]
        complete = lines[:-1]  # the text after the last newline is empty, or a line cut short
        steps = {line.split(",", 1)[0] for line in complete if line}
        return {int(s) for s in steps if s.isdigit()}

    @property
    def steps(self) -> list[int]:
        return list(self.files)

    def triplets(self, step: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """{name: (U, S, V)} of every matrix with a kept triplet at ``step`` (one read of its file), in float64, the
        vectors' columns scaled back to unit length (float32 storage leaves them 1 ± 1e-7, enough to put a cosine
        above 1); a matrix with nothing kept (an unchanged one) is absent."""
        out = {}
        with safe_open(self.files[step], "pt") as fh:
            for key in fh.keys():
                if key.endswith("::S"):
                    name = key[: -len("::S")]
                    U, S, V = (fh.get_tensor(f"{name}::{x}").double() for x in "USV")
                    out[name] = (U / U.norm(dim=0), S, V / V.norm(dim=0))
        return out

    def check_base(self, base: str | Path) -> float:
        """Refuse, in one sentence, a base checkpoint that is not the model this series was recorded from: a
        recorded matrix it lacks or holds in another shape, or whose weights are, at the median over matrices,
        at least FOREIGN_MEDIAN of their norm away from the recorded W_0. Otherwise that median distance (0 for the
        recorded start itself; the analysis of a sketch measures from its own W_0 whatever base is given)."""
        from opd_dynamics.io.formats import open_model

        reader = open_model(base)
        for name, info in self.tensors.items():
            shape = tuple(info["shape"])
            if name not in reader or tuple(reader.shape(name)) != shape:
                got = tuple(reader.shape(name)) if name in reader else "no such tensor"
                raise InputError(self.path, f"was recorded from another model than {base}: {name} is {shape} "
                                            f"there, {got} in the base (a sketch series needs no --base: it holds "
                                            "its start)")
        # one matrix of each at a time (base.safetensors also holds a LoRA layer's starting factors: not weights)
        median = median_relative_distance((w, reader.get(n)) for n, w in start_weights(self.path, self.tensors))
        if median >= FOREIGN_MEDIAN:
            raise InputError(self.path, f"was recorded from another model than {base}: its start weights are "
                                        f"{median:.2f} of the base's norm away from them (median over matrices; a "
                                        "sketch series needs no --base: it holds its start)")
        return median

    def __repr__(self) -> str:
        return (f"SketchSeries({str(self.path)!r}, {len(self.files)} steps, {len(self.decomposed)} matrices "
                f"decomposed, {len(self.tensors) - len(self.decomposed)} tensors normed, k={self.k})")

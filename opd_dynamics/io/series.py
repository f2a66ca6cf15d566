"""A run's checkpoint series: the base weights plus (step, directory) pairs, sorted by step.

Recognised step directories: TRL/Trainer `checkpoint-N` (its weights, or its FSDP DCP folder
`pytorch_model_fsdp_0/`), verl `global_step_N/actor/huggingface` (merged weights) or `global_step_N/actor/` (the
raw FSDP rank files), OpenRLHF `global_stepN_hf`, `step_N` / `step-N` / `stepN`, `iter_N` / `iter-N`. Each step
may be in any format `io.reader` reads, and the base in another.
The base is always given explicitly; it is never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import InitVar, dataclass, field
from pathlib import Path

from opd_dynamics.errors import InputError
from opd_dynamics.io.formats import open_full_weights, open_model, reader_class, reader_format
from opd_dynamics.io.reader import ADAPTER_CONFIG, is_adapter_dir, read_settings

_STEP_DIR = re.compile(r"^(?:checkpoint-|global_step_?|step[_-]?|iter[_-]?)(\d+)(?:_hf)?$")
#: where a step directory nests its weights: verl's merged export or raw rank files, accelerate's DCP folder
_NESTED = ("actor/huggingface", "huggingface", "actor", "pytorch_model_fsdp_0")


def _has_weights(p: Path, prefer_format: str | None = None) -> bool:
    try:
        reader_class(p, prefer_format)
        return True
    except InputError:
        return (p / ADAPTER_CONFIG).exists()


def _weights_dir(d: Path, prefer_format: str | None = None) -> Path:
    """The directory inside a step directory that holds its weights (verl nests them under actor/, accelerate's
    FSDP checkpoints under pytorch_model_fsdp_0/)."""
    nested = [d / sub for sub in _NESTED if (d / sub).is_dir()]
    for cand in nested:
        if _has_weights(cand, prefer_format):
            return cand
    # actor/ alone: let the reader say what is there
    return d if _has_weights(d, prefer_format) or not nested else nested[-1]


#: config.json keys that fix an architecture: the steps of one run share them with their base
ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "intermediate_size", "vocab_size", "head_dim", "num_experts", "num_local_experts")


#: the median over matrices of ‖W − W_ref‖F / ‖W_ref‖F at or above which two sets of weights are not one run's
#: (fine-tuning moves weights by a few percent; another model by about √2)
FOREIGN_MEDIAN = 0.5


def median_relative_distance(pairs) -> float:
    """The median over (weights, reference) pairs of ‖W − W_ref‖F / ‖W_ref‖F (float64 sums)."""
    from opd_dynamics.numerics import fro2

    rel = sorted((fro2(w.float() - ref.float()) / max(fro2(ref.float()), 1e-300)) ** 0.5 for w, ref in pairs)
    return rel[len(rel) // 2] if rel else 0.0


def check_same_architecture(series: CheckpointSeries, force_hint: str = "") -> None:
    """Refuse a step whose config.json declares another architecture than the base's (a key of ARCH_KEYS both
    state and differ on), naming the step: a Qwen2 base for a Llama run is analysed silently otherwise."""
    from opd_dynamics.io.model_dir import find_config

    base = find_config(series.base) if not is_adapter_dir(series.base) else {}
    if not base:
        return
    for _, path in series.steps:
        if is_adapter_dir(path):
            continue
        cfg = find_config(path)
        for key in ARCH_KEYS:
            a, b = base.get(key), cfg.get(key)
            if a is not None and b is not None and a != b:
                raise InputError(path, f"is another model than the base {series.base}: its config {key} is {b}, the "
                                       f"base's {a}" + (f" ({force_hint})" if force_hint else ""))


@dataclass
class CheckpointSeries:
    """Base weights plus the checkpoints of one run, sorted by step, and how they are read: every command that
    reads a series opens its weights through it (`open`, `open_full`), so the reading settings travel with it."""

    name: str
    base: Path
    steps: list[tuple[int, Path]] = field(default_factory=list)
    #: deprecated (one release): ``read`` and ``weights`` in one (`reader.read_settings` maps it)
    load_mode: InitVar[str | None] = None
    #: the format to read where a directory holds weights in several (`reader.reader_class`)
    prefer_format: str | None = None
    #: how bytes are read (`reader.READS`: pread or mmap)
    read: str = "pread"
    #: which weights of a checkpoint that holds two (`reader.WEIGHTS`: model, or a DeepSpeed step's fp32 masters)
    weights: str = "model"

    def __post_init__(self, load_mode: str | None) -> None:
        self.read, self.weights = read_settings(self.read, self.weights, load_mode)
        self.base = Path(self.base)
        self.steps = sorted(((int(s), Path(p)) for s, p in self.steps), key=lambda x: x[0])
        seen: dict[int, Path] = {}
        for s, p in self.steps:
            if s in seen:
                raise InputError(p, f"repeats step {s} (also {seen[s]})")
            seen[s] = p
        if not self.steps:
            raise InputError(None, f"run {self.name!r} has no checkpoints")
        if is_adapter_dir(self.base):
            raise InputError(self.base, "is a LoRA adapter; the base must be full model weights")
        for p in (self.base, *(p for _, p in self.steps)):  # fails early with a clear sentence
            reader_class(p, self.prefer_format)

    @classmethod
    def discover(cls, run_dir: str | Path, base: str | Path, name: str | None = None,
                 steps: Iterable[int] | None = None, load_mode: str | None = None,
                 prefer_format: str | None = None, read: str = "pread", weights: str = "model") -> CheckpointSeries:
        """Find the checkpoints of a run directory; `steps` keeps only those steps. Where a step is saved twice
        (a ZeRO folder beside an HF export), ``prefer_format`` picks, else ``weights``: the ZeRO folder for the
        masters, the export otherwise. ``load_mode`` is deprecated (`reader.read_settings`)."""
        read, weights = read_settings(read, weights, load_mode)
        run = Path(run_dir)
        if base is None:
            raise InputError(run, "needs an explicit base (the weights every step is compared with)")
        if not run.exists():
            raise InputError(run, "does not exist")
        if not run.is_dir():
            raise InputError(run, "is not a directory")
        by_step: dict[int, list[Path]] = {}
        for d in sorted(run.iterdir()):
            m = _STEP_DIR.match(d.name)
            if d.is_dir() and m:
                by_step.setdefault(int(m.group(1)), []).append(_weights_dir(d, prefer_format))
        found: list[tuple[int, Path]] = []
        for s, dirs in by_step.items():
            # OpenRLHF saves global_stepN (DeepSpeed ZeRO) beside global_stepN_hf (an HF export): take the export,
            # unless prefer_format says which, or the fp32 masters were asked for (weights "masters"), which only the
            # ZeRO state holds
            with_weights = [d for d in dirs if _has_weights(d, prefer_format)]
            formats = [reader_format(d, prefer_format) for d in with_weights]
            if len(with_weights) > 1 and "deepspeed-zero" in formats and len(set(formats)) == len(formats):
                pref = prefer_format if prefer_format in formats else \
                    "deepspeed-zero" if weights == "masters" else "safetensors"
                with_weights = [d for d, f in zip(with_weights, formats) if f == pref] or with_weights
            found += [(s, d) for d in (with_weights or dirs[:1])]
        if not found:
            entries = sorted(p.name for p in run.iterdir())
            if not entries:
                raise InputError(run, "is empty: no checkpoints found")
            raise InputError(run, "has no recognisable checkpoints (expected checkpoint-N, global_step_N, "
                                  f"step_N or iter_N directories; found {', '.join(entries[:6])})")
        if steps is not None:
            keep = set(int(s) for s in steps)
            absent = sorted(keep - {s for s, _ in found})
            if absent:
                raise InputError(run, f"has no checkpoint for step(s) {', '.join(map(str, absent))} (it has "
                                      f"{', '.join(str(s) for s in sorted(by_step))})")
            found = [x for x in found if x[0] in keep]
        return cls(name=name or run.name, base=Path(base), steps=found, prefer_format=prefer_format, read=read,
                   weights=weights)

    @classmethod
    def from_list(cls, pairs: Sequence[tuple[int, str | Path]], base: str | Path, name: str = "run",
                  load_mode: str | None = None, prefer_format: str | None = None, read: str = "pread",
                  weights: str = "model") -> CheckpointSeries:
        """An explicit list of (step, path)."""
        read, weights = read_settings(read, weights, load_mode)
        return cls(name=name, base=Path(base), steps=list(pairs), prefer_format=prefer_format, read=read,
                   weights=weights)

    @property
    def step_numbers(self) -> list[int]:
        return [s for s, _ in self.steps]

    def open(self, path: str | Path):
        """A reader of the weights (or adapter) at ``path`` (the base or a step), read as this series says."""
        return open_model(path, self.read, self.prefer_format, weights=self.weights)

    def open_full(self, path: str | Path):
        """As `open`, for full weights only (an adapter refused: `formats.open_full_weights`)."""
        return open_full_weights(path, self.read, self.prefer_format, weights=self.weights)

    def open_step(self, step: int):
        return self.open(dict(self.steps)[step])

    def __repr__(self) -> str:
        return f"CheckpointSeries({self.name!r}, base={str(self.base)!r}, steps={self.step_numbers})"

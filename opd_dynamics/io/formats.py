"""The factory: which reader fits what is at a path, chosen by the files present (`reader_class`), and the calls
that open one (`open_model`, `open_full_weights`). Every format module imports only the interface
(`io.reader`); this module imports them all, so the dependency runs one way."""

from __future__ import annotations

from pathlib import Path

from opd_dynamics.errors import InputError
from opd_dynamics.io.dcp import DCPDir, is_dcp_dir
from opd_dynamics.io.deepspeed import ZeroCheckpoint, is_zero_dir
from opd_dynamics.io.fsdp_shards import FSDPShards, has_rank_files, rank_files
from opd_dynamics.io.lora import LoraAdapter
from opd_dynamics.io.model_dir import EntryReader, ModelDir, find_weight_files, has_safetensors
from opd_dynamics.io.reader import FORMATS, is_adapter_dir, read_settings
from opd_dynamics.io.torch_files import BinDir, has_bin


def formats_present(path: str | Path) -> list[str]:
    """The weight formats whose files lie directly in ``path`` (checked without reading any header), in the order
    `reader_class` knows them."""
    p = Path(path)
    found = [("safetensors", has_safetensors(p)), ("pytorch-bin", has_bin(p)), ("dcp", is_dcp_dir(p)),
             ("fsdp-shards", p.is_dir() and has_rank_files(p)), ("deepspeed-zero", is_zero_dir(p))]
    return [name for name, here in found if here]


def reader_class(path: str | Path, prefer_format: str | None = None) -> type[EntryReader] | type[LoraAdapter]:
    """The reader for what is at ``path``, chosen by the files present; an InputError naming the path and what is
    there instead when no reader fits (checked without reading any header). A directory holding weights in two
    formats (a step's safetensors beside another step's rank files, say) is refused, naming both, unless
    ``prefer_format`` picks one of them: which holds the step cannot be told from the files."""
    p = Path(path)
    if is_adapter_dir(p):
        return LoraAdapter
    present = formats_present(p)
    if prefer_format is not None and prefer_format not in FORMATS:
        raise InputError(None, f"prefer_format {prefer_format!r} is not one of {', '.join(FORMATS)}",
                         ("prefer_format",))
    if len(present) > 1:
        if prefer_format not in present:
            raise InputError(p, f"holds weights in {len(present)} formats ({' and '.join(present)}), which may be "
                                f"different steps or runs; pass prefer_format to say which to read",
                             ("prefer_format",))
        present = [prefer_format]
    fmt = present[0] if present else None
    if fmt == "fsdp-shards":
        rank_files(p)  # a missing rank or mixed world sizes: said now, before any step is read
    if fmt is None:
        find_weight_files(p)  # says what is there instead
    return {c.FORMAT: c for c in (ModelDir, BinDir, DCPDir, FSDPShards, ZeroCheckpoint)}.get(fmt, ModelDir)


def open_full_weights(path: str | Path, read: str = "pread", prefer_format: str | None = None, *,
                      weights: str = "model", load_mode: str | None = None) -> EntryReader:
    """A model's full weights in any format; an adapter is refused in one sentence (extrapolation, unlike
    analysis, needs the weights themselves, not an update). ``read`` and ``weights`` as `open_model`."""

    read, weights = read_settings(read, weights, load_mode)
    if is_adapter_dir(path):
        raise InputError(path, "is a LoRA adapter; merge it into its base model first (extrapolation works on "
                               "full weights)")
    return reader_class(path, prefer_format)(path, read, weights)


def reader_format(path: str | Path, prefer_format: str | None = None) -> str:
    """The format `reader_class` detects at ``path`` (safetensors, pytorch-bin, fsdp-shards, dcp,
    deepspeed-zero, lora)."""
    cls = reader_class(path, prefer_format)
    return getattr(cls, "FORMAT", cls.__name__)


def open_model(path: str | Path, read: str = "pread", prefer_format: str | None = None, *, weights: str = "model",
               load_mode: str | None = None) -> EntryReader | LoraAdapter:
    """Open a model directory (any format; ``prefer_format`` where it holds several), a single .safetensors file,
    or a PEFT LoRA adapter directory. ``read``: how bytes are read (`READS`); ``weights``: which weights of a
    checkpoint that holds two (`WEIGHTS`: a DeepSpeed ZeRO step's fp32 masters); ``load_mode``: deprecated, both
    in one (`read_settings`)."""
    read, weights = read_settings(read, weights, load_mode)
    return reader_class(path, prefer_format)(path, read, weights)

"""The reader interface every checkpoint format implements, and the factory that picks one by the files present.

A reader opens only headers; `get(name)` reads one tensor, so memory holds the tensors in use and never a
whole model. Implementations, each in its own module: `ModelDir` (safetensors: single, sharded with an index, or
shards without one), `BinDir` (`pytorch_model.bin`, single or index-sharded), `FSDPShards` (verl's
``model_world_size_W_rank_R.pt`` rank files), `DCPDir` (torch Distributed Checkpoint, as accelerate and the Trainer
write it under FSDP) and, for updates rather than weights, `LoraAdapter` (PEFT LoRA). A new format adds one
`TensorReader` subclass and one clause in `reader_class`. `ZeroCheckpoint` reads DeepSpeed ZeRO-1/2/3
``global_stepN/`` directories (model-states weights, or with load mode "masters" the fp32 master weights).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the implementations import this module
    from opd_dynamics.io.lora import LoraAdapter
    from opd_dynamics.io.model_dir import EntryReader

#: how a reader reads a tensor: one positioned read per tensor (bounded memory, network filesystems), or mmap;
#: "masters" reads DeepSpeed ZeRO checkpoints' fp32 master weights instead of their model-states weights (every
#: other format reads as with pread)
LOAD_MODES = ("pread", "mmap", "masters")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"


class TensorReader(ABC):
    """One model's weights, read one tensor at a time.

    Attributes every reader sets: ``path``; ``files`` (the files read); ``header_sha256`` (a digest of what
    describes the tensors); ``identity`` (what tells these weights apart from others for a cache: the header
    digest plus each file's path and identity as it was read).
    """

    path: Path
    files: list[Path]
    header_sha256: str
    identity: str

    @abstractmethod
    def names(self) -> list[str]:
        """Every tensor's name, in file order."""

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape as stored."""

    @abstractmethod
    def dtype(self, name: str) -> torch.dtype:
        """A tensor's dtype as stored (the dtype `get` returns)."""

    @abstractmethod
    def stored_dtype(self, name: str) -> str:
        """The stored dtype's code (safetensors' 'BF16', 'F32', 'F8_E4M3' …)."""

    @abstractmethod
    def nbytes(self, name: str | None = None) -> int:
        """Bytes one tensor (or, without a name, every tensor) occupies as stored."""

    def tied_names(self) -> dict[str, str]:
        """{name: the tensor it shares storage with} for weights saved once under another name."""
        return {}

    @abstractmethod
    def get(self, name: str) -> torch.Tensor:
        """One tensor in its stored dtype, on the CPU."""

    def get_rows(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor's first dimension. A format that can read a row range alone
        overrides this (memory then holds only those rows); this fallback reads the whole tensor."""
        return self.get(name)[start:stop]

    def close(self) -> None:  # noqa: B027 - a hook: readers without open files need not close anything
        """Release open files (the reader can still be used: files are reopened on demand)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_adapter_dir(path: str | Path) -> bool:
    """A PEFT adapter directory (it holds adapter_config.json)."""
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).exists()


def formats_present(path: str | Path) -> list[str]:
    """The weight formats whose files lie directly in ``path`` (checked without reading any header), in the order
    `reader_class` knows them."""
    from opd_dynamics.io.dcp import is_dcp_dir
    from opd_dynamics.io.deepspeed import is_zero_dir
    from opd_dynamics.io.fsdp_shards import has_rank_files
    from opd_dynamics.io.model_dir import has_safetensors
    from opd_dynamics.io.torch_files import has_bin

    p = Path(path)
    found = [("safetensors", has_safetensors(p)), ("pytorch-bin", has_bin(p)), ("dcp", is_dcp_dir(p)),
             ("fsdp-shards", p.is_dir() and has_rank_files(p)), ("deepspeed-zero", is_zero_dir(p))]
    return [name for name, here in found if here]


#: the formats a reader exists for, by the name `reader_format` gives (what ``prefer_format`` takes)
FORMATS = ("safetensors", "pytorch-bin", "dcp", "fsdp-shards", "deepspeed-zero")


def reader_class(path: str | Path, prefer_format: str | None = None) -> type[EntryReader] | type[LoraAdapter]:
    """The reader for what is at ``path``, chosen by the files present; an InputError naming the path and what is
    there instead when no reader fits (checked without reading any header). A directory holding weights in two
    formats (a step's safetensors beside another step's rank files, say) is refused, naming both, unless
    ``prefer_format`` picks one of them: which holds the step cannot be told from the files."""
    from opd_dynamics.errors import InputError
    from opd_dynamics.io.dcp import DCPDir
    from opd_dynamics.io.deepspeed import ZeroCheckpoint
    from opd_dynamics.io.fsdp_shards import FSDPShards, rank_files
    from opd_dynamics.io.lora import LoraAdapter
    from opd_dynamics.io.model_dir import ModelDir, find_weight_files
    from opd_dynamics.io.torch_files import BinDir

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


def open_full_weights(path: str | Path, load_mode: str = "pread", prefer_format: str | None = None) -> EntryReader:
    """A model's full weights in any format; an adapter is refused in one sentence (extrapolation, unlike
    analysis, needs the weights themselves, not an update)."""
    from opd_dynamics.errors import InputError

    if is_adapter_dir(path):
        raise InputError(path, "is a LoRA adapter; merge it into its base model first (extrapolation works on "
                               "full weights)")
    return reader_class(path, prefer_format)(path, load_mode=load_mode)


def reader_format(path: str | Path, prefer_format: str | None = None) -> str:
    """The format `reader_class` detects at ``path`` (safetensors, pytorch-bin, fsdp-shards, dcp,
    deepspeed-zero, lora)."""
    cls = reader_class(path, prefer_format)
    return getattr(cls, "FORMAT", cls.__name__)


def open_model(path: str | Path, load_mode: str = "pread", prefer_format: str | None = None
               ) -> EntryReader | LoraAdapter:
    """Open a model directory (any format; ``prefer_format`` where it holds several), a single .safetensors file,
    or a PEFT LoRA adapter directory."""
    return reader_class(path, prefer_format)(path, load_mode=load_mode)

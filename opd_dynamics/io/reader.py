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


def reader_class(path: str | Path) -> type[EntryReader] | type[LoraAdapter]:
    """The reader for what is at ``path``, chosen by the files present (safetensors first: a directory holding
    both a merged export and raw shards is read from the export); an InputError naming the path and what is
    there instead when no reader fits (checked without reading any header)."""
    from opd_dynamics.io.dcp import DCPDir, is_dcp_dir
    from opd_dynamics.io.deepspeed import ZeroCheckpoint, is_zero_dir
    from opd_dynamics.io.fsdp_shards import FSDPShards, has_rank_files, rank_files
    from opd_dynamics.io.lora import LoraAdapter
    from opd_dynamics.io.model_dir import ModelDir, find_weight_files, has_safetensors
    from opd_dynamics.io.torch_files import BinDir, has_bin

    p = Path(path)
    if is_adapter_dir(p):
        return LoraAdapter
    if has_safetensors(p):
        return ModelDir
    if has_bin(p):
        return BinDir
    if is_dcp_dir(p):
        return DCPDir
    if p.is_dir() and has_rank_files(p):
        rank_files(p)  # a missing rank or mixed world sizes: said now, before any step is read
        return FSDPShards
    if is_zero_dir(p):
        return ZeroCheckpoint
    find_weight_files(p)  # says what is there instead
    return ModelDir


def open_full_weights(path: str | Path, load_mode: str = "pread") -> EntryReader:
    """A model's full weights in any format; an adapter is refused in one sentence (extrapolation, unlike
    analysis, needs the weights themselves, not an update)."""
    from opd_dynamics.errors import InputError

    if is_adapter_dir(path):
        raise InputError(path, "is a LoRA adapter; merge it into its base model first (extrapolation works on "
                               "full weights)")
    return reader_class(path)(path, load_mode=load_mode)


def reader_format(path: str | Path) -> str:
    """The format `reader_class` detects at ``path`` (safetensors, pytorch-bin, fsdp-shards, dcp,
    deepspeed-zero, lora)."""
    cls = reader_class(path)
    return getattr(cls, "FORMAT", cls.__name__)


def open_model(path: str | Path, load_mode: str = "pread") -> EntryReader | LoraAdapter:
    """Open a model directory, a single .safetensors file, or a PEFT LoRA adapter directory."""
    return reader_class(path)(path, load_mode=load_mode)

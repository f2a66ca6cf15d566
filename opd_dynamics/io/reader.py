"""The reader interface every checkpoint format implements (`io.formats` picks one by the files present).

A reader opens only headers; `get(name)` reads one tensor, so memory holds the tensors in use and never a
whole model. Implementations, each in its own module: `ModelDir` (safetensors: single, sharded with an index, or
shards without one), `BinDir` (`pytorch_model.bin`, single or index-sharded), `FSDPShards` (verl's
``model_world_size_W_rank_R.pt`` rank files), `DCPDir` (torch Distributed Checkpoint, as accelerate and the Trainer
write it under FSDP) and, for updates rather than weights, `LoraAdapter` (PEFT LoRA). `ZeroCheckpoint` reads
DeepSpeed ZeRO-1/2/3 ``global_stepN/`` directories (model-states weights, or with ``weights="masters"`` the fp32
master weights). A new format adds one `TensorReader` subclass, its name in `FORMATS` and its detection in
`io.formats`.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from opd_dynamics.errors import InputError

#: how a reader reads a tensor's bytes (``read``): one positioned read per tensor (bounded memory, network
#: filesystems), or mmap
READS = ("pread", "mmap")
#: which weights of a checkpoint that holds two (``weights``): a DeepSpeed ZeRO checkpoint's model-states weights
#: (the training dtype) or its fp32 master weights; every other format holds one and reads it either way. Series
#: discovery follows it: with "masters", a ZeRO folder over an HF export of the same step
WEIGHTS = ("model", "masters")
#: the values of the deprecated ``load_mode`` (0.x; one release): pread/mmap → ``read``, masters → ``weights``
LOAD_MODES = ("pread", "mmap", "masters")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
#: the formats a reader exists for, by the name each reader class gives as FORMAT (what ``prefer_format`` takes)
FORMATS = ("safetensors", "pytorch-bin", "dcp", "fsdp-shards", "deepspeed-zero")


def read_settings(read: str | None = "pread", weights: str | None = "model", load_mode: str | None = None
                  ) -> tuple[str, str]:
    """``(read, weights)`` checked against READS and WEIGHTS (an InputError naming the setting otherwise). The
    deprecated ``load_mode`` (and "masters" given as ``read``, where it used to be the load mode) maps with a
    DeprecationWarning: pread/mmap → ``read``, masters → ``weights="masters"`` read by pread."""
    read, weights = read or "pread", weights or "model"
    if read == "masters" and load_mode is None:  # a positional load mode of the 0.x calls
        read, load_mode = "pread", "masters"
    if load_mode is not None:
        if load_mode not in LOAD_MODES:
            raise InputError(None, f"load_mode {load_mode!r} is not one of {', '.join(LOAD_MODES)}",
                             ("load_mode",))
        warnings.warn(f"load_mode is deprecated: use {DEPRECATED_LOAD_MODE[load_mode]}", DeprecationWarning,
                      stacklevel=3)
        if load_mode == "masters":
            weights = "masters"
        else:
            read = load_mode
    if read not in READS:
        raise InputError(None, f"read {read!r} is not one of {', '.join(READS)}", ("read",))
    if weights not in WEIGHTS:
        raise InputError(None, f"weights {weights!r} is not one of {', '.join(WEIGHTS)}", ("weights",))
    return read, weights


#: what each deprecated load mode is now (the deprecation's sentence names it)
DEPRECATED_LOAD_MODE = {"pread": "read='pread'", "mmap": "read='mmap'", "masters": "weights='masters'"}


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
    #: how this reader reads bytes (one of READS; a format that can only map its files says "mmap")
    read: str = "pread"

    @property
    def load_mode(self) -> str:
        """Deprecated name of ``read`` (one release)."""
        return self.read

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

    #: True for a reader of updates rather than weights (a LoRA adapter): a weight it does not hold is unchanged
    #: at that step, not missing
    holds_updates: bool = False

    def is_factored(self, name: str) -> bool:
        """Whether this reader holds ``name``'s update as low-rank factors (ΔW = s·B·A, never formed whole unless
        asked: `delta`, `delta_rows`) instead of the weight itself (`get`)."""
        return False

    def delta(self, name: str, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """A factored update, formed dense in ``dtype`` on ``device`` (only where `is_factored`)."""
        raise NotImplementedError(f"{type(self).__name__} holds weights, not factored updates")

    def delta_rows(self, name: str, start: int, stop: int, dtype: torch.dtype = torch.float32,
                   transposed: bool = False) -> torch.Tensor:
        """Rows of a factored update as the base stores it (only where `is_factored`)."""
        raise NotImplementedError(f"{type(self).__name__} holds weights, not factored updates")

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

"""`torch.save` weight files read safely and lazily, and the `pytorch_model.bin` reader.

Every `.bin`/`.pt` goes through `load_weights_file`: the zip format only (mapped with ``mmap=True``, so names,
shapes and dtypes cost nothing and a tensor's pages are read when it is used), ``weights_only=True`` (a pickle
holding anything but tensors and plain containers is refused, never run), torch ≥ 2.6 (older torch had a
``weights_only`` bypass, CVE-2025-32434), and ``map_location='cpu'`` (files saved from CUDA tensors).

`BinDir` reads ``pytorch_model.bin`` and index-sharded ``pytorch_model-0000k-of-0000n.bin`` with
``pytorch_model.bin.index.json`` (what transformers 4 wrote with ``safe_serialization=False``, and many older
hub models hold): the stored dtype is analysed as it is.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path

import torch

from opd_dynamics.errors import InputError
from opd_dynamics.io.model_dir import DTYPE_CODES, EntryReader, TensorEntry, file_identity, index_files

BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
#: the first torch whose weights_only unpickler has no known bypass
MIN_TORCH = (2, 6)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def require_safe_torch(path: Path) -> None:
    """Refuse to unpickle anything with a torch whose weights_only loader had a known bypass."""
    if _torch_version() < MIN_TORCH:
        raise InputError(path, f"is a torch pickle; reading one safely needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} "
                               f"(its weights_only loader), this is torch {torch.__version__}")


def check_torch_file(path: Path) -> None:
    """A `torch.save` file that can be mapped (zip format), read by a torch that loads it safely."""
    require_safe_torch(path)
    try:
        if not zipfile.is_zipfile(path):
            raise InputError(path, "is not a zip-format torch file (a legacy pre-1.6 file, or damaged), so it cannot "
                                   "be mapped; re-save it with torch.save (zip format) or as safetensors")
    except OSError as e:
        raise InputError(path, f"cannot be read: {e.strerror or e}") from e


def load_weights_file(path: Path) -> dict:
    """The mapping a `torch.save` weights file holds, its tensors mapped from the file (module docstring)."""
    check_torch_file(path)
    import torch.distributed.tensor as _dtensor  # noqa: F401 - registers DTensor and its placements as safe to load

    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputError(path, "is not a weights file: its pickle holds objects other than tensors, so it was "
                               f"refused unread ({str(e).splitlines()[0][:160]})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise InputError(path, f"is not a readable torch weights file ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(obj, dict):
        raise InputError(path, f"holds a {type(obj).__name__}, not a state dict of tensors")
    return obj


def dtype_code(path: Path, name: str, dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (the readers' common currency), or an InputError."""
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise InputError(path, f"holds tensor {name!r} of unsupported dtype {dtype}") from None


def bin_files(path: Path) -> list[Path]:
    """The .bin files of a model directory (an index's shards, or the single file)."""
    if (path / BIN_INDEX).exists():
        return index_files(path / BIN_INDEX)
    if (path / BIN_FILE).exists():
        return [path / BIN_FILE]
    raise InputError(path, f"holds no {BIN_FILE} and no {BIN_INDEX}")


def has_bin(path: Path) -> bool:
    return path.is_dir() and ((path / BIN_FILE).exists() or (path / BIN_INDEX).exists())


class BinDir(EntryReader):
    """`pytorch_model.bin`, single or index-sharded, one tensor at a time (each file mapped, never read whole)."""

    FORMAT = "pytorch-bin"

    def __init__(self, path: str | Path, load_mode: str = "mmap"):
        self.path = Path(path)
        self.load_mode = "mmap"  # a pickled file is mapped whatever the caller asked: no byte range to pread
        self.files = bin_files(self.path)
        self.entries: dict[str, TensorEntry] = {}
        self._where: dict[str, Path] = {}
        self._loaded: dict = {}
        digest = hashlib.sha256()
        for f in self.files:
            sd = load_weights_file(f)
            ident = file_identity(f.stat())
            for name, t in sd.items():
                if not isinstance(t, torch.Tensor):
                    continue  # e.g. a stray integer: not a weight
                if name in self.entries:
                    raise InputError(f, f"repeats tensor {name!r} already in {self._where[name].name}")
                code = dtype_code(f, name, t.dtype)
                nbytes = t.numel() * t.element_size()
                self.entries[name] = TensorEntry(f, code, tuple(t.shape), 0, nbytes, ident)
                self._where[name] = f
                digest.update(f"{name}:{code}:{tuple(t.shape)};".encode())
        if not self.entries:
            raise InputError(self.path, "holds no tensors")
        self._set_identity(digest.hexdigest())

    def get(self, name: str) -> torch.Tensor:
        """One tensor, copied out of the mapping (a tensor of its own, like the other readers')."""
        self._check(name)
        return self._mapped(name)[name].detach().clone()

    def get_rows(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows of a tensor, copied from the mapping: only their pages are read."""
        self._check(name)
        return self._mapped(name)[name][start:stop].detach().clone()

    def _check(self, name: str) -> None:
        if name not in self._where:
            raise InputError(self.path, f"has no tensor {name!r}")

    def _mapped(self, name: str) -> dict:
        """The mapping of the file holding ``name``, kept while that tensor is read (its row blocks): moving on
        to the next tensor unmaps the file, so the pages read stay page cache and never pile up in this
        process's memory (parsing a file's pickle again costs milliseconds)."""
        if self._loaded.get("name") != name:
            self._loaded = {"name": name, "sd": load_weights_file(self._where[name])}
        return self._loaded["sd"]

    def close(self) -> None:
        self._loaded.clear()

    def __repr__(self) -> str:
        return f"BinDir({str(self.path)!r}, {len(self.entries)} tensors, {len(self.files)} files)"

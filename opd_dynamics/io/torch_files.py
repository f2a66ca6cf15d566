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
import io
import math
import pickle
import struct
import zipfile
from pathlib import Path

import torch

from opd_dynamics.errors import InputError
from opd_dynamics.io.model_dir import (
    _FDS,
    DTYPE_CODES,
    EntryReader,
    TensorEntry,
    _pread_tensor,
    file_identity,
    index_files,
)

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


_STORAGE_DTYPES = {"DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


class _Storage:
    def __init__(self, dtype: torch.dtype, key: str):
        self.dtype, self.key = dtype, key


class _TensorRef:
    """Where a plain tensor of a `torch.save` archive lives: its storage and its view (nothing is read)."""

    def __init__(self, storage: _Storage, offset: int, size, stride, *rest):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

    @property
    def contiguous(self) -> bool:
        want, expected = 1, []
        for n in reversed(self.size):
            expected.append(want)
            want *= n
        return tuple(reversed(expected)) == self.stride or math.prod(self.size) <= 1


class _LayoutUnpickler(pickle.Unpickler):
    """Reads a state dict's data.pkl into _TensorRefs: storage types, the tensor rebuilder and plain containers
    only; anything else (a DTensor, an object) makes the caller fall back to the mapped load."""

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _TensorRef
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        kind, dtype, key, _location, _numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError("not a storage")
        return _Storage(dtype, str(key))


def tensor_layout(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]] | None:
    """{name: (dtype, shape, absolute byte offset)} of a `torch.save` state dict whose tensors are plain,
    contiguous and stored uncompressed, so each can be read with one positioned read like a safetensors tensor;
    None when the file holds anything else (it is then read through the mapped load)."""
    with zipfile.ZipFile(path) as z:
        pkl = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            return None
        prefix = pkl[0][: -len("data.pkl")]
        try:
            sd = _LayoutUnpickler(io.BytesIO(z.read(pkl[0]))).load()
        except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, EOFError):
            return None
        if not isinstance(sd, dict):
            return None
        out = {}
        with open(path, "rb") as fh:
            for name, ref in sd.items():
                if not isinstance(ref, _TensorRef) or not ref.contiguous:
                    return None
                info = z.getinfo(f"{prefix}data/{ref.storage.key}")
                if info.compress_type != zipfile.ZIP_STORED:
                    return None
                fh.seek(info.header_offset + 26)
                n_name, n_extra = struct.unpack("<HH", fh.read(4))
                start = info.header_offset + 30 + n_name + n_extra + ref.offset * ref.storage.dtype.itemsize
                out[name] = (ref.storage.dtype, ref.size, start)
        return out


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
    """`pytorch_model.bin`, single or index-sharded, one tensor at a time: plain contiguous tensors (what
    transformers saves) by one positioned read of their bytes in the zip archive, as safetensors are read, so
    memory holds the tensor in use; a file holding anything else through the mapped `weights_only` load."""

    FORMAT = "pytorch-bin"

    def __init__(self, path: str | Path, load_mode: str = "pread"):
        self.path = Path(path)
        self.load_mode = "pread"
        self.files = bin_files(self.path)
        self.entries: dict[str, TensorEntry] = {}
        self._mapped_files: set[Path] = set()
        self._loaded: dict = {}
        digest = hashlib.sha256()
        for f in self.files:
            check_torch_file(f)
            ident = file_identity(f.stat())
            layout = tensor_layout(f)  # only storages, the tensor rebuilder and dicts: weights by construction
            if layout is None:
                sd = load_weights_file(f)
                layout = {n: (t.dtype, tuple(t.shape), None) for n, t in sd.items() if isinstance(t, torch.Tensor)}
                self._mapped_files.add(f)
            for name, (dtype, shape, at) in layout.items():
                if name in self.entries:
                    raise InputError(f, f"repeats tensor {name!r} already in {self.entries[name].file.name}")
                code = dtype_code(f, name, dtype)
                nbytes = math.prod(shape) * dtype.itemsize
                start = 0 if at is None else at
                self.entries[name] = TensorEntry(f, code, tuple(shape), start, start + nbytes, ident)
                digest.update(f"{name}:{code}:{tuple(shape)};".encode())
        if not self.entries:
            raise InputError(self.path, "holds no tensors")
        self._set_identity(digest.hexdigest())

    def get(self, name: str) -> torch.Tensor:
        return self.get_rows(name)

    def get_rows(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows of a tensor (the whole tensor without them), reading only their bytes."""
        entry = self.entries.get(name)
        if entry is None:
            raise InputError(self.path, f"has no tensor {name!r}")
        if entry.file in self._mapped_files:
            return self._mapped(name)[name][start:stop].detach().clone()
        rows = None
        if start is not None or stop is not None:
            lo, hi, _ = slice(start, stop).indices(entry.shape[0] if entry.shape else 0)
            rows = (lo, max(lo, hi))
        return _pread_tensor(entry, rows)

    def _mapped(self, name: str) -> dict:
        """The mapping of the file holding ``name``, kept while that tensor is read (its row blocks): moving on
        to the next tensor unmaps the file, so the pages read stay page cache and never pile up in this
        process's memory (parsing a file's pickle again costs milliseconds)."""
        if self._loaded.get("name") != name:
            self._loaded = {"name": name, "sd": load_weights_file(self.entries[name].file)}
        return self._loaded["sd"]

    def close(self) -> None:
        self._loaded.clear()
        _FDS.close(set(self.files))

    def __repr__(self) -> str:
        return f"BinDir({str(self.path)!r}, {len(self.entries)} tensors, {len(self.files)} files)"

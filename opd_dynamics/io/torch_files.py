"""`torch.save` weight files read safely and lazily, and the `pytorch_model.bin` reader.

Every `.bin`/`.pt` that `archive_layout` (below) does not admit goes through `load_weights_file`: the zip format
only (mapped with ``mmap=True``, so names, shapes and dtypes cost nothing and a tensor's pages are read when it is
used), ``weights_only=True`` (a pickle holding anything but tensors and plain containers is refused, never run),
torch ≥ 2.6 (older torch had a ``weights_only`` bypass, CVE-2025-32434), and ``map_location='cpu'`` (files saved
from CUDA tensors).

Where a file allows it, nothing is mapped: `archive_layout` reads the archive's ``data.pkl`` with a restricted
unpickler that builds no tensor and runs nothing (storage types, the tensor rebuilder, plain containers, torch.Size
and dtypes; for verl's rank files also the names a DTensor pickle uses, as inert recording stand-ins) and gives each
tensor's dtype, view and absolute byte offset in the zip (storages are stored uncompressed), so a reader fetches it
with one positioned read straight into the output, as safetensors are read; a DTensor comes with its global shape
and placements. Any other global sends the file to the mapped ``weights_only`` load. The same mechanism locates a
DCP chunk (a small archive at a byte range of a ``.distcp`` file) and DeepSpeed's model-states weights.

`BinDir` reads ``pytorch_model.bin`` and index-sharded ``pytorch_model-0000k-of-0000n.bin`` with
``pytorch_model.bin.index.json`` (what transformers 4 wrote with ``safe_serialization=False``, and many older
hub models hold): the stored dtype is analysed as it is.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from opd_dynamics.errors import InputError
from opd_dynamics.io.model_dir import (
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
_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in DTYPE_CODES}


class _StateDict(dict):
    """collections.OrderedDict as `Module.state_dict()` pickles it: the dict, its ``_metadata`` attribute (module
    versions) set by BUILD and dropped."""

    def __setstate__(self, state):
        pass


class _Storage:
    def __init__(self, dtype: torch.dtype, key: str):
        self.dtype, self.key = dtype, key


class _TensorRef:
    """Where a plain tensor of a `torch.save` archive lives: its storage and its view (nothing is read)."""

    def __init__(self, storage: _Storage, offset: int, size, stride, *rest):
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError("a tensor without a storage")
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)


@dataclass(frozen=True)
class StoredTensor:
    """A plain tensor of a `torch.save` archive, located: its dtype, view (shape, stride) and the absolute byte
    offset of its first element in the file, so it can be read with one positioned read (nothing is read here)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    start: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def contiguous(self) -> bool:
        want, expected = 1, []
        for n in reversed(self.shape):
            expected.append(want)
            want *= n
        return tuple(reversed(expected)) == self.stride or math.prod(self.shape) <= 1


@dataclass(frozen=True)
class StoredDTensor:
    """A DTensor of one rank's `torch.save` file (verl's FSDP rank files): its local tensor, located, its global
    shape and its placements over the device mesh's dims (the Shard dim, or None for Replicate)."""

    local: StoredTensor
    shape: tuple[int, ...]
    placements: tuple[int | None, ...]

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype


# -- DTensor pickles, recorded, never built ----------------------------------------------------------------------
# torch pickles a DTensor as _rebuild_from_type_v2(_rebuild_wrapper_subclass, DTensor, (DTensor, dtype, global
# size, stride, offset, layout, device, requires_grad), (None, {"_local_tensor": tensor, "_spec": DTensorSpec}))
# (read from the files FSDP2 writes with torch 2.13). The classes it names become the inert stand-ins below:
# nothing of torch.distributed is imported or run, and any other global sends the file to the mapped
# weights_only load.


class _Record:
    """Stands in for an object of a DTensor pickle: keeps the arguments and state it is given, runs nothing."""

    def __new__(cls, *args):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __setstate__(self, state):
        self.state = state

    def attrs(self) -> dict:
        """The recorded state as one dict (a (dict, slots dict) pair merged)."""
        return _attrs(self.state)


def _attrs(state) -> dict:
    out: dict = {}
    for part in (state if isinstance(state, tuple) else (state,)):
        if isinstance(part, dict):
            out.update(part)
        elif part is not None:
            raise pickle.UnpicklingError("an object state that is not a dict")
    return out


class _Shard(_Record):
    pass


class _Replicate(_Record):
    pass


_WRAPPER_SUBCLASS = object()  # torch._utils._rebuild_wrapper_subclass, never called
_DTENSOR = object()  # the DTensor class


def _rebuild_dtensor(func, new_type, args, state) -> _DTensorRef:
    """torch._tensor._rebuild_from_type_v2, for a DTensor only: what its pickle says, checked, built of nothing."""
    if func is not _WRAPPER_SUBCLASS or new_type is not _DTENSOR or len(args) < 3 or args[0] is not _DTENSOR:
        raise pickle.UnpicklingError("a tensor subclass other than DTensor")
    attrs = _attrs(state)
    local, spec = attrs.get("_local_tensor"), attrs.get("_spec")
    if not isinstance(local, _TensorRef) or not isinstance(spec, _Record):
        raise pickle.UnpicklingError("a DTensor without its local tensor or spec")
    placements = []
    for p in spec.attrs().get("placements", ()):
        if isinstance(p, _Shard):
            placements.append(int(p.attrs()["dim"]))
        elif isinstance(p, _Replicate):
            placements.append(None)
        else:
            raise pickle.UnpicklingError("a DTensor placement other than Shard and Replicate")
    shape = tuple(int(n) for n in args[2])
    if not placements or any(n < 0 for n in shape) or any(d is not None and not 0 <= d < len(shape)
                                                          for d in placements):
        raise pickle.UnpicklingError("a DTensor without valid placements or shape")
    return _DTensorRef(local, shape, tuple(placements))


class _DTensorRef:
    def __init__(self, local: _TensorRef, shape: tuple[int, ...], placements: tuple[int | None, ...]):
        self.local, self.shape, self.placements = local, shape, placements


def _get_layout(name: str) -> str:
    if name != "torch.strided":
        raise pickle.UnpicklingError(f"a tensor of layout {name}")
    return name


_DTENSOR_NAMES = {
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_dtensor,
    ("torch._utils", "_rebuild_wrapper_subclass"): _WRAPPER_SUBCLASS,
    ("torch.distributed.tensor", "DTensor"): _DTENSOR,
    ("torch.distributed.tensor._api", "DTensor"): _DTENSOR,
    ("torch.distributed.tensor.placement_types", "Shard"): _Shard,
    ("torch.distributed.tensor.placement_types", "Replicate"): _Replicate,
    ("torch.serialization", "_get_layout"): _get_layout,
    ("torch", "device"): lambda *a: "device",
    ("torch", "Size"): tuple,
    **{("torch.distributed.tensor._dtensor_spec", c): type(c, (_Record,), {})
       for c in ("DTensorSpec", "TensorMeta", "ShardOrderEntry")},
    ("torch.distributed.device_mesh", "DeviceMesh"): type("DeviceMesh", (_Record,), {}),
    **{("torch.distributed._mesh_layout", c): type(c, (_Record,), {}) for c in ("_MeshLayout", "_FlatLayout")},
}


class _LayoutUnpickler(pickle.Unpickler):
    """Reads a `torch.save` archive's data.pkl into _TensorRefs (and, with ``dtensors``, _DTensorRefs): storage
    types, the tensor rebuilder, plain containers, torch.Size and dtypes only (and the DTensor names above, as
    inert stand-ins); anything else makes the caller fall back to the mapped weights_only load."""

    def __init__(self, file, dtensors: bool = False):
        super().__init__(file)
        self.dtensors = dtensors

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _TensorRef
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return _StateDict
        if (module, name) == ("torch", "Size"):
            return tuple
        if module == "torch" and name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
        if self.dtensors and (module, name) in _DTENSOR_NAMES:
            return _DTENSOR_NAMES[module, name]
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5):
            raise pickle.UnpicklingError("not a storage")
        kind, dtype, key, _location, _numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError("not a storage")
        return _Storage(dtype, str(key))


class _Window(io.RawIOBase):
    """Bytes ``base … base+length`` of an open file as a seekable file of their own (a DCP chunk's archive)."""

    def __init__(self, fd: int, base: int, length: int):
        super().__init__()
        self.fd, self.base, self.length, self.pos = fd, base, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, pos + (0, self.pos, self.length)[whence])
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        data = os.pread(self.fd, n, self.base + self.pos) if n else b""
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


_UNREADABLE = (pickle.UnpicklingError, ValueError, TypeError, AttributeError, EOFError, KeyError, IndexError,
               zipfile.BadZipFile, struct.error, RecursionError, OSError)


class _Located:
    """Turns the _TensorRefs of one archive's unpickled tree into StoredTensors (absolute byte offsets)."""

    def __init__(self, z: zipfile.ZipFile, prefix: str, fd: int, base: int, end: int):
        self.z, self.prefix, self.fd, self.base, self.end = z, prefix, fd, base, end
        self.storages: dict[str, tuple[int, int]] = {}

    def storage(self, key: str) -> tuple[int, int]:
        """(absolute start, byte size) of a storage: its zip entry must be stored, not compressed."""
        if key not in self.storages:
            info = self.z.getinfo(f"{self.prefix}data/{key}")
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError("a compressed storage")
            n_name, n_extra = struct.unpack("<HH", os.pread(self.fd, 4, self.base + info.header_offset + 26))
            at = self.base + info.header_offset + 30 + n_name + n_extra
            if at + info.file_size > self.end:
                raise ValueError("a storage outside the archive")
            self.storages[key] = (at, info.file_size)
        return self.storages[key]

    def tensor(self, ref: _TensorRef) -> StoredTensor:
        at, nbytes = self.storage(ref.storage.key)
        size = ref.storage.dtype.itemsize
        t = StoredTensor(ref.storage.dtype, ref.size, ref.stride, at + ref.offset * size)
        span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride)) if math.prod(t.shape) else 0
        if ref.offset < 0 or any(n < 0 for n in t.shape) or any(s < 0 for s in t.stride) or \
                (ref.offset + span) * size > nbytes:
            raise ValueError("a tensor outside its storage")
        return t

    def resolve(self, obj):
        if isinstance(obj, _TensorRef):
            return self.tensor(obj)
        if isinstance(obj, _DTensorRef):
            return StoredDTensor(self.tensor(obj.local), obj.shape, obj.placements)
        if isinstance(obj, dict):
            return {k: self.resolve(v) for k, v in obj.items()}  # (a _StateDict becomes a dict)
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.resolve(v) for v in obj)
        if isinstance(obj, _Record):
            raise ValueError("an object outside a DTensor")
        return obj


def archive_layout(path: Path, base: int = 0, length: int | None = None, dtensors: bool = False,
                   fd: int | None = None):
    """What a `torch.save` archive holds (a zip whose storages are stored uncompressed), every plain tensor a
    `StoredTensor` and, with ``dtensors``, every DTensor a `StoredDTensor`: its containers (dicts, lists, tuples)
    and plain values as pickled, read by `_LayoutUnpickler`, so nothing but those is built. ``base`` and
    ``length``: an archive embedded in a larger file (a DCP chunk); ``fd``: an open descriptor of ``path``.
    None when the archive holds anything else or cannot be located (the caller then uses the mapped
    weights_only load, which refuses what is not weights)."""
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        length = size - base if length is None else length
        if base < 0 or length < 0 or base + length > size:
            return None
        window = io.BufferedReader(_Window(fd, base, length), buffer_size=1 << 16)
        with zipfile.ZipFile(window) as z:
            pkl = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pkl) != 1:
                return None
            tree = _LayoutUnpickler(io.BytesIO(z.read(pkl[0])), dtensors).load()
            return _Located(z, pkl[0][: -len("data.pkl")], fd, base, base + length).resolve(tree)
    except _UNREADABLE:
        return None
    finally:
        if own:
            os.close(fd)


def tensor_layout(path: Path, dtensors: bool = False) -> dict[str, StoredTensor | StoredDTensor] | None:
    """{name: located tensor} of a `torch.save` state dict whose tensors are plain and contiguous (with
    ``dtensors``: or DTensors whose local tensor is), each then read with one positioned read like a safetensors
    tensor; None when the file holds anything else (it is then read through the mapped load)."""
    sd = archive_layout(path, dtensors=dtensors)
    if not isinstance(sd, dict):
        return None
    for t in sd.values():
        local = t.local if isinstance(t, StoredDTensor) else t
        if not isinstance(local, StoredTensor) or not local.contiguous:
            return None
    return sd


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
                layout = {n: StoredTensor(t.dtype, tuple(t.shape), tuple(t.stride()), None)
                          for n, t in sd.items() if isinstance(t, torch.Tensor)}
                self._mapped_files.add(f)
            for name, t in layout.items():
                if name in self.entries:
                    raise InputError(f, f"repeats tensor {name!r} already in {self.entries[name].file.name}")
                code = dtype_code(f, name, t.dtype)
                start = 0 if t.start is None else t.start
                self.entries[name] = TensorEntry(f, code, tuple(t.shape), start, start + t.nbytes, ident)
                digest.update(f"{name}:{code}:{tuple(t.shape)};".encode())
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
        super().close()

    def __repr__(self) -> str:
        return f"BinDir({str(self.path)!r}, {len(self.entries)} tensors, {len(self.files)} files)"

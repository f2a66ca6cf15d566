"""`torch.save` weight files read safely and lazily, and the `pytorch_model.bin` reader.

Nothing in such a file is trusted (docs/SECURITY.md). `archive_layout` checks that a file is the zip archive
`torch.save` writes (every entry stored, no TorchScript code or constants, one ``data.pkl``: `archive_pickle`),
then reads its ``data.pkl`` with the toolkit's one allow-list (`io.safe_pickle`: storage types, the tensor and
parameter rebuilders, plain containers, torch.Size and dtypes; for verl's rank files also the names a DTensor
pickle uses, and for DeepSpeed's optimizer states its three objects, as inert stand-ins), which builds no tensor
and runs nothing, and gives each tensor's dtype, view and absolute byte offset in the zip, so a reader fetches it
with one positioned read straight into the output, as safetensors are read; a DTensor comes with its global
shape and placements. A pickle naming anything else is refused unread, in one sentence naming the file. The same
mechanism locates a DCP chunk (a small archive at a byte range of a ``.distcp`` file) and DeepSpeed's weights.

A file whose admitted pickle holds a tensor that is not plain and contiguous (a strided view) goes through
`load_weights_file`: torch's ``weights_only`` load (torch ≥ 2.6, whose loader has no known bypass, CVE-2025-32434),
mapped with ``mmap=True``, after the allow-list above admitted the same pickle. No path loads with
``weights_only=False``, and no legacy (tar or plain pickle) file is read.

`BinDir` reads ``pytorch_model.bin`` and index-sharded ``pytorch_model-0000k-of-0000n.bin`` with
``pytorch_model.bin.index.json`` (what transformers 4 wrote with ``safe_serialization=False``, and many older
hub models hold): the stored dtype is analysed as it is.
"""

from __future__ import annotations

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
from opd_dynamics.io.reader import read_settings
from opd_dynamics.io.safe_pickle import (
    DTENSOR,
    MAX_PICKLE_BYTES,
    WEIGHTS,
    DTensorRef,
    Names,
    Refused,
    TensorRef,
    loads,
    torch_storage,
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


def load_weights_file(path: Path, dtensors: bool = False) -> dict:
    """The mapping a `torch.save` weights file holds, its tensors mapped from the file: for the files whose tensors
    cannot each be read with one positioned read (strided views). The pickle is admitted by the toolkit's own
    allow-list first (`archive_layout`), so torch's ``weights_only`` unpickler only ever sees what that admits."""
    check_torch_file(path)
    archive_layout(path, names=DTENSOR if dtensors else WEIGHTS)
    if dtensors:
        import torch.distributed.tensor as _dtensor  # noqa: F401 - registers DTensor and its placements

    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputError(path, f"is not a weights file: torch refused its pickle ({first_sentence(e)})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise InputError(path, f"is not a readable torch weights file ({first_sentence(e)})") from None
    if not isinstance(obj, dict):
        raise InputError(path, f"holds a {type(obj).__name__}, not a state dict of tensors")
    return obj


def first_sentence(e: BaseException) -> str:
    """An exception's first sentence, whole (torch's messages run on with advice that does not apply here)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    end = text.find(". ")
    return text[: end + 1] if end >= 0 else text


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
               zipfile.BadZipFile, struct.error, RecursionError, OverflowError, MemoryError, NotImplementedError)
#: entries that make a zip a TorchScript archive (code and constants torch.jit.load would run), not weights
_TORCHSCRIPT = ("constants.pkl", "/code/", ".debug_pkl", "bytecode.pkl")


def archive_pickle(z: zipfile.ZipFile) -> str:
    """The name of a `torch.save` archive's one ``data.pkl``, after checking the archive is what torch.save writes:
    every entry stored uncompressed (so no entry expands: no zip bomb, no nested archive to unpack), no TorchScript
    code or constants, exactly one data.pkl. `safe_pickle.Refused` otherwise."""
    pkl = []
    for info in z.infolist():
        name = info.filename
        if any(mark in f"/{name}" for mark in _TORCHSCRIPT):
            raise Refused(f"TorchScript content ({name}), which torch.jit.load would run")
        if info.compress_type != zipfile.ZIP_STORED:
            raise Refused(f"a compressed entry ({name}); torch.save stores every entry uncompressed")
        if name.endswith("/data.pkl") or name == "data.pkl":
            pkl.append(info)
    if len(pkl) != 1:
        raise Refused(f"{len(pkl)} data.pkl entries where torch.save writes one")
    if pkl[0].file_size > MAX_PICKLE_BYTES:
        raise Refused(f"a data.pkl of {pkl[0].file_size} bytes (at most {MAX_PICKLE_BYTES} are read)")
    return pkl[0].filename


class _Located:
    """Turns the TensorRefs of one archive's unpickled tree into StoredTensors (absolute byte offsets)."""

    def __init__(self, z: zipfile.ZipFile, prefix: str, fd: int, base: int, end: int):
        self.z, self.prefix, self.fd, self.base, self.end = z, prefix, fd, base, end
        self.storages: dict[str, tuple[int, int]] = {}

    def storage(self, key: str) -> tuple[int, int]:
        """(absolute start, byte size) of a storage (its entry is stored, `archive_pickle` checked)."""
        if key not in self.storages:
            info = self.z.getinfo(f"{self.prefix}data/{key}")
            n_name, n_extra = struct.unpack("<HH", os.pread(self.fd, 4, self.base + info.header_offset + 26))
            at = self.base + info.header_offset + 30 + n_name + n_extra
            if at + info.file_size > self.end:
                raise ValueError("a storage outside the archive")
            self.storages[key] = (at, info.file_size)
        return self.storages[key]

    def tensor(self, ref: TensorRef) -> StoredTensor:
        at, nbytes = self.storage(ref.storage.key)
        size = ref.storage.dtype.itemsize
        t = StoredTensor(ref.storage.dtype, ref.size, ref.stride, at + ref.offset * size)
        span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride)) if math.prod(t.shape) else 0
        if ref.offset < 0 or any(n < 0 for n in t.shape) or any(s < 0 for s in t.stride) or \
                (ref.offset + span) * size > nbytes:
            raise ValueError("a tensor outside its storage")
        return t

    def resolve(self, obj):
        if isinstance(obj, TensorRef):
            return self.tensor(obj)
        if isinstance(obj, DTensorRef):
            return StoredDTensor(self.tensor(obj.local), obj.shape, obj.placements)
        if isinstance(obj, dict):
            return {k: self.resolve(v) for k, v in obj.items()}  # (a StateDict becomes a dict)
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.resolve(v) for v in obj)
        return obj


def archive_layout(path: Path, base: int = 0, length: int | None = None, names: Names = WEIGHTS,
                   fd: int | None = None, what: str = "", kind: str = "weights file"):
    """What a `torch.save` archive holds, every plain tensor a `StoredTensor` and (with ``names`` admitting them)
    every DTensor a `StoredDTensor`: its containers and plain values as pickled, unpickled by
    `safe_pickle.loads` with the allow-list ``names``, so nothing but those is built; other objects stay their
    inert stand-ins. The archive is checked first (`archive_pickle`). ``base`` and ``length``: an archive
    embedded in a larger file (a DCP chunk; ``what`` names it); ``fd``: an open descriptor of ``path``; ``kind``:
    what the file should be, for the refusal.
    An InputError naming the file for anything refused or unreadable: nothing of it is ever loaded otherwise."""
    own = fd is None
    try:
        if own:
            fd = os.open(path, os.O_RDONLY)
        size = os.fstat(fd).st_size
        length = size - base if length is None else length
        if base < 0 or length < 0 or base + length > size:
            raise InputError(path, f"is truncated: {what or 'its archive'} needs bytes {base}…{base + length} of "
                                   f"{size}")
        window = io.BufferedReader(_Window(fd, base, length), buffer_size=1 << 16)
        with zipfile.ZipFile(window) as z:
            pkl = archive_pickle(z)
            tree = loads(z.read(pkl), names, torch_storage)
            return _Located(z, pkl[: -len("data.pkl")], fd, base, base + length).resolve(tree)
    except Refused as e:
        raise InputError(path, f"is not a {kind}: {what or 'it'} holds {e}; refused unread (nothing in it was "
                               "run)") from None
    except OSError as e:
        raise InputError(path, f"cannot be read: {e.strerror or e}") from None
    except _UNREADABLE as e:
        raise InputError(path, f"is not a readable torch archive{' (' + what + ')' if what else ''}: "
                               f"{type(e).__name__}: {first_sentence(e)}") from None
    finally:
        if own and fd is not None:
            os.close(fd)


def tensor_layout(path: Path, dtensors: bool = False) -> dict[str, StoredTensor | StoredDTensor] | None:
    """{name: located tensor} of a `torch.save` state dict (with ``dtensors``, of DTensors too), each tensor then
    read with one positioned read like a safetensors tensor; None when the file holds a tensor that is not plain
    and contiguous (a strided view: it is then read through the mapped load, its pickle admitted here first).
    An InputError for a file that is not a state dict of weights."""
    sd = archive_layout(path, names=DTENSOR if dtensors else WEIGHTS)
    if not isinstance(sd, dict):
        raise InputError(path, f"holds a {type(sd).__name__}, not a state dict of tensors")
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

    def __init__(self, path: str | Path, read: str = "pread", weights: str = "model", *, load_mode: str | None = None):
        read_settings(read, weights, load_mode)  # checked; always read by positioned reads, one set of weights
        self.path = Path(path)
        self.read = "pread"
        self.files = bin_files(self.path)
        self.entries: dict[str, TensorEntry] = {}
        self._mapped_files: set[Path] = set()
        self._loaded: dict = {}
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
        if not self.entries:
            raise InputError(self.path, "holds no tensors")
        self._set_identity()

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

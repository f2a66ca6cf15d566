"""Lazy, per-tensor access to one model directory's safetensors weights.

A `ModelDir` reads only headers when opened; each `get(name)` reads one tensor, one of two ways
(``read``): `pread` (default) reads the tensor's byte range with one positioned read, so memory holds exactly the
tensors in use and nothing stays mapped (safetensors' mmap storage is not freed on `del`, and mmap is
slow on network filesystems); `mmap` uses `safetensors.safe_open`. Open file descriptors are shared in
one small LRU cache so a series of hundreds of shards never exhausts the process's limit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from opd_dynamics.errors import InputError
from opd_dynamics.io.reader import ADAPTER_FILE, TensorReader, read_settings

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
#: quantised codes: a weight is these times a scale stored in another tensor, so never analysed as they are
FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}
#: the scale tensors of FP8 (and similar) quantised checkpoints
QUANT_SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale", "input_scale", "activation_scale")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype code, shape, absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    ident: tuple = ()  # the file's identity when its header was read (see file_identity)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


#: the output head that tie_word_embeddings ties to the input embedding
TIED_HEAD = "lm_head.weight"


def file_identity(st: os.stat_result) -> tuple:
    """What tells a file apart from one rewritten at the same path: device, inode, size, modification time."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str], bytes]:
    """Parse one safetensors header; raise InputError naming the file if it is truncated or corrupt
    (offsets outside the data, overlapping, or not matching a tensor's shape and dtype)."""
    try:
        st = path.stat()
        size = st.st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(path, f"is not a safetensors file: only {size} bytes, too short for a header")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise InputError(path, f"has a corrupt or truncated safetensors header (declares {n} header "
                                       f"bytes, file has {size})")
            raw = f.read(n)
    except OSError as e:
        raise InputError(path, f"cannot be read: {e.strerror or e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InputError(path, f"has a corrupt safetensors header (not valid JSON: {str(e)[:160]})") from None
    if not isinstance(header, dict):
        raise InputError(path, "has a corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InputError(path, "has a corrupt safetensors header (__metadata__ is not a map of strings)")
    base, ident = 8 + n, file_identity(st)
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        try:
            dtype, shape, (a, b) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = all(type(x) is int and x >= 0 for x in (*shape, a, b)) and a <= b
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise InputError(path, f"has a corrupt safetensors header entry for {name!r}")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise InputError(path, f"holds tensor {name!r} of unsupported dtype {dtype}")
        if base + b > size:
            raise InputError(path, f"is truncated: tensor {name!r} ends at byte {base + b} but the file has "
                                   f"{size} bytes")
        want = math.prod(shape) * DTYPES[dtype].itemsize
        if b - a != want:
            raise InputError(path, f"has a corrupt safetensors header: tensor {name!r} spans {b - a} bytes, but "
                                   f"shape {list(shape)} of {dtype} needs {want}")
        entries[name] = TensorEntry(path, dtype, shape, base + a, base + b, ident)
    spans = sorted(entries.values(), key=lambda e: (e.start, e.end))
    for prev, cur in zip(spans, spans[1:]):
        if cur.start < prev.end:
            names = {id(e): k for k, e in entries.items()}
            raise InputError(path, f"has a corrupt safetensors header: tensors {names[id(prev)]!r} and "
                                   f"{names[id(cur)]!r} overlap")
    return entries, meta, raw


class FdCache:
    """Process-wide LRU of open read-only file descriptors (bounded; thread-safe). A descriptor is used only
    for the file whose header was read: a file rewritten at the same path since then is an error, never a
    silent read of the old (or the new) bytes against the other's header."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._fds: OrderedDict[Path, tuple[int, tuple]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path, ident: tuple) -> int:
        with self._lock:
            fd, fid = self._fds.pop(path, (None, None))
            if fd is not None and fid != ident:
                os.close(fd)
                fd = None
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                fid = file_identity(os.fstat(fd))
                if ident and fid != ident:
                    os.close(fd)
                    raise InputError(path, "changed on disk after its header was read; run again")
                while len(self._fds) >= self.capacity:
                    _, (old, _) = self._fds.popitem(last=False)
                    os.close(old)
            self._fds[path] = (fd, fid)
            return fd

    def close(self, paths: set[Path]) -> None:
        with self._lock:
            for p in list(self._fds):
                if p in paths:
                    os.close(self._fds.pop(p)[0])


_FDS = FdCache()


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor to read a tensor's bytes into, its memory a numpy buffer (plain malloc, freed
    with the tensor; no zero-fill, which `bytearray` does). Measured on the norm-only pass
    (`benchmarks/bench_formats.py`, 5 runs each): `torch.empty`'s aligned allocations peaked at 50 to 94 MB on
    safetensors where these stay at 50 MB in most runs; anonymous mmaps (returned to the system on free) hold
    every format at its floor (48 MB, 77 MB in float32) but fault every page in again, 1.5 to 2.5 times slower."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(np.empty(nbytes, dtype=np.uint8)).view(dtype).reshape(shape)


def pread_into(file: Path, ident: tuple, start: int, dest: torch.Tensor) -> None:
    """Fill the contiguous tensor ``dest`` with the bytes of ``file`` from ``start`` on, by positioned reads straight
    into its memory (no intermediate buffer); ``ident``: the file's identity when its layout was read."""
    nbytes = dest.numel() * dest.element_size()
    if nbytes == 0:
        return
    if not dest.is_contiguous():
        raise ValueError("pread_into needs a contiguous destination")
    view, got = memoryview(dest.reshape(-1).view(torch.uint8).numpy()), 0
    fd = _FDS.get(file, ident)
    while got < nbytes:
        try:
            chunk = os.preadv(fd, [view[got:]], start + got)
        except OSError as e:  # EIO, a vanished network mount: say which input, not where we were writing
            raise InputError(file, f"could not be read ({e.strerror or e})") from e
        if chunk == 0:
            raise InputError(file, "ended before the tensor data the header promises (truncated file)")
        got += chunk


def _pread_tensor(entry: TensorEntry, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The tensor (or rows ``start:stop`` of its first dimension) with one positioned read of its bytes."""
    shape, start = entry.shape, entry.start
    if rows is not None:
        row_bytes = entry.nbytes // shape[0] if shape and shape[0] else 0
        shape = (rows[1] - rows[0], *shape[1:])
        start = entry.start + rows[0] * row_bytes
    out = empty(shape, DTYPES[entry.dtype])
    pread_into(entry.file, entry.ident, start, out)
    return out


def file_beside(listing: Path, name, what: str) -> Path:
    """The file ``name`` that ``listing`` (an index, DCP metadata) names in its own directory. A name with a
    directory part (``../other-run/model.safetensors``, an absolute path) is refused: an untrusted listing must not
    make the reader open files outside the checkpoint (a symlink placed in the directory is the user's choice)."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise InputError(listing, f"lists {what} {name!r} outside its directory; only plain file names in "
                                  f"{listing.parent} are read")
    return listing.parent / name


def index_files(index: Path) -> list[Path]:
    """The shard files a `*.index.json` (safetensors' or pytorch_model.bin's) lists, each a plain file name beside
    it (`file_beside`), checked to exist."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = set(weight_map.values())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError, AttributeError) as e:
        raise InputError(index, "is not a valid shard index (no 'weight_map' of tensor names to files)") from e
    except OSError as e:
        raise InputError(index, f"cannot be read: {e.strerror or e}") from None
    files = sorted(file_beside(index, f, "a shard") for f in shards)
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise InputError(index, f"lists shards that are missing: {', '.join(missing[:5])}")
    return files


def has_safetensors(path: Path) -> bool:
    """A .safetensors file, or a directory holding safetensors weights (not only an adapter's)."""
    if path.is_file():
        return path.suffix == ".safetensors"
    return path.is_dir() and ((path / INDEX_FILE).exists() or
                              any(p.name != ADAPTER_FILE for p in path.glob("*.safetensors")))


def find_weight_files(path: Path) -> list[Path]:
    """The safetensors files holding a model's weights, or an InputError saying what is there instead."""
    if not path.exists():
        raise InputError(path, "does not exist")
    if path.is_file():
        if path.suffix == ".safetensors":
            return [path]
        raise InputError(path, "is a file, not a model directory or a .safetensors file")
    index = path / INDEX_FILE
    if index.exists():
        return index_files(index)
    if (path / SINGLE_FILE).exists():
        return [path / SINGLE_FILE]
    # shards without an index: model-*.safetensors when there are such (an optimizer.safetensors or a
    # value_head.safetensors beside them is not weights), else every .safetensors file but an adapter's
    shards = sorted(path.glob("model*.safetensors")) or \
        sorted(p for p in path.glob("*.safetensors") if p.name != ADAPTER_FILE)
    if shards:
        return shards
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    if not names:
        raise InputError(path, "is empty: no model weights found")
    if any(n.startswith("pytorch_model") and n.endswith(".bin") for n in names):
        raise InputError(path, "holds pytorch_model*.bin shards without pytorch_model.bin.index.json, so their "
                               "order is unknown; restore the index")
    if any(n.endswith("_optim_states.pt") for n in names):
        raise InputError(path, "holds DeepSpeed optimizer states without their *_model_states.pt file")
    raise InputError(path, "holds no model weights (no safetensors, pytorch_model.bin, FSDP rank files or DCP "
                           ".metadata)")


#: torch dtype → safetensors dtype code (the code every reader's TensorEntry carries)
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
CONFIG_FILE = "config.json"


def find_config(path: str | Path) -> dict:
    """A model's config.json: in its directory, its ``huggingface/`` (verl) or its parent (a DCP folder inside
    ``checkpoint-N/``); {} for a single file or when there is none."""
    path = Path(path)
    if not path.is_dir():
        return {}
    for cfg in (path / CONFIG_FILE, path / "huggingface" / CONFIG_FILE, path.parent / CONFIG_FILE):
        if cfg.exists():
            try:
                return json.loads(cfg.read_text())
            except json.JSONDecodeError as e:
                raise InputError(cfg, f"is not valid JSON ({e})") from e
    return {}


class EntryReader(TensorReader):
    """A reader whose tensors are listed in ``entries`` (name → TensorEntry): what every format shares. A
    subclass sets ``path``, ``files``, ``entries``, ``header_sha256`` and ``identity`` and implements ``get``.
    The model's config.json is looked for in the directory, its ``huggingface/`` (verl) and its parent
    (a DCP folder inside ``checkpoint-N/``)."""

    FORMAT = "?"
    entries: dict[str, TensorEntry]
    metadata: dict[str, str] = {}

    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.entries[name].dtype]

    def stored_dtype(self, name: str) -> str:
        return self.entries[name].dtype

    def tied_names(self) -> dict[str, str]:
        """{head name: the embedding it is tied to}, with ``tie_word_embeddings`` (the default of most configs):
        transformers saves the input embedding once and leaves ``lm_head.weight`` out of the files; a file that
        holds it anyway is a tied copy when it equals the embedding bit for bit (read once and remembered)."""
        if not hasattr(self, "_tied"):
            self._tied = self._find_tied()
        return self._tied

    def _find_tied(self) -> dict[str, str]:
        cfg = self.config
        if not cfg or not cfg.get("tie_word_embeddings", True):
            return {}
        emb = [n for n in self.entries if n.endswith(("embed_tokens.weight", "wte.weight"))]
        if len(emb) != 1:
            return {}
        if TIED_HEAD not in self.entries:
            return {TIED_HEAD: emb[0]}
        e, h = self.entries[emb[0]], self.entries[TIED_HEAD]
        if e.shape == h.shape and e.dtype == h.dtype and torch.equal(self.get(TIED_HEAD), self.get(emb[0])):
            return {TIED_HEAD: emb[0]}
        return {}

    def nbytes(self, name: str | None = None) -> int:
        if name is not None:
            return self.entries[name].nbytes
        return sum(e.nbytes for e in self.entries.values())

    @property
    def config(self) -> dict:
        return find_config(self.path)

    def get_rows(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows of a tensor: formats that cannot read a row range alone assemble the tensor once and serve its row
        blocks from that one copy (the analysis reads big tensors block by block; reassembling per block made the
        pass quadratic in the blocks). Memory: one tensor beside the blocks."""
        cached = getattr(self, "_rows_cache", None)
        if cached is None or cached[0] != name:
            cached = self._rows_cache = (name, self.get(name))
        return cached[1][start:stop]

    def close(self) -> None:
        """Drop the assembled tensor kept for row blocks and this reader's cached file descriptors (every entry
        reader reads ``self.files`` through `_FDS`)."""
        self._rows_cache = None
        _FDS.close(set(self.files))

    def _set_identity(self, digest: str | None = None, tag: str = "") -> None:
        """header_sha256 and identity from a digest of what describes the tensors (by default: ``tag`` and each
        entry's name, dtype code and shape, in order) and each file's identity."""
        if digest is None:
            h = hashlib.sha256(tag.encode())
            for name, e in self.entries.items():
                h.update(f"{name}:{e.dtype}:{tuple(e.shape)};".encode())
            digest = h.hexdigest()
        self.header_sha256 = digest
        idents = {e.file: e.ident for e in self.entries.values()}
        # a header alone is shared by every model of one architecture (a Base and its Instruct), so each file's
        # resolved path and identity go in too, as they were when the header was read
        self.identity = hashlib.sha256("\x1f".join(
            [digest, *(f"{f.resolve()}:{i}" for f, i in sorted(idents.items()))]).encode()).hexdigest()[:24]


class ModelDir(EntryReader):
    """Lazy reader for one model directory (single file, sharded with index, or shards without one)."""

    FORMAT = "safetensors"

    def __init__(self, path: str | Path, read: str = "pread", weights: str = "model", *, load_mode: str | None = None):
        self.read, _ = read_settings(read, weights, load_mode)  # one set of weights: ``weights`` changes nothing
        self.path = Path(path)
        self.files = find_weight_files(self.path)
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, str] = {}
        digest = hashlib.sha256()
        for f in self.files:
            entries, meta, raw = read_header(f)
            digest.update(raw)
            self.metadata.update(meta)
            for name, e in entries.items():
                if name in self.entries:
                    raise InputError(f, f"repeats tensor {name!r} already in {self.entries[name].file.name}")
                self.entries[name] = e
        if not self.entries:
            raise InputError(self.path, "holds no tensors")
        self._check_index()
        self._set_identity(digest.hexdigest())  # the engine reopens a reader whose identity is not the run's
        self._handles: dict[Path, object] = {}

    def _check_index(self) -> None:
        """Every tensor the index lists must be in the shard it names (a stale index is not trusted)."""
        index = self.path / INDEX_FILE
        if not (self.path.is_dir() and index.exists()):
            return
        for name, fname in json.loads(index.read_text())["weight_map"].items():
            e = self.entries.get(name)
            if e is None or e.file.name != fname:
                where = "no shard holds it" if e is None else f"it is in {e.file.name}"
                raise InputError(index, f"lists {name!r} in {fname}, but {where}")

    # -- data -----------------------------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        """One tensor in its stored dtype, on CPU."""
        return self.get_rows(name)

    def get_rows(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor's first dimension (the whole tensor without them), reading only
        their bytes: safetensors stores tensors row-major, so a row range is one contiguous byte range."""
        try:
            entry = self.entries[name]
        except KeyError:
            raise InputError(self.path, f"has no tensor {name!r}") from None
        rows = None
        if start is not None or stop is not None:
            n = entry.shape[0] if entry.shape else 0
            lo, hi, _ = slice(start, stop).indices(n)
            rows = (lo, max(lo, hi))
        if self.read == "pread":
            return _pread_tensor(entry, rows)
        from safetensors import safe_open

        h = self._handles.get(entry.file)
        if h is None:
            h = self._handles[entry.file] = safe_open(str(entry.file), framework="pt")
        return h.get_tensor(name) if rows is None else h.get_slice(name)[rows[0]:rows[1]]

    def close(self) -> None:
        self._handles.clear()
        super().close()

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r}, {len(self.entries)} tensors, {len(self.files)} files)"

"""torch Distributed Checkpoint directories (``.metadata`` + ``__R_0.distcp``): what accelerate, the transformers
Trainer and TRL write under FSDP's SHARDED_STATE_DICT (``checkpoint-N/pytorch_model_fsdp_0/``), read in place one
tensor at a time, with no process group.

``.metadata`` is a pickle: it is read with the toolkit's allow-list (`safe_pickle.DCP_METADATA`: DCP's own
metadata classes, by exact module and name, as inert records of their pickled fields, and torch's sizes and
dtypes), so nothing of torch.distributed is imported (0.1 to 0.7 s saved) and a file naming anything else is
refused unread. A tensor is assembled from the
chunks that hold it, each a `torch.save` archive at a byte range of a ``.distcp`` file: the chunk's own zip
headers and pickle are read by the restricted layout unpickler (`torch_files.archive_layout`) to find its one
stored storage, whose bytes are then read with one positioned read straight into the output (a chunk of whole
rows, what FSDP saves, into those rows; another box through one chunk-sized buffer), so memory holds that tensor
and no chunk copy; a row range reads only the chunks' rows it covers. A chunk the allow-list admits but that is
not one plain stored tensor (a strided view) is loaded from its bytes with ``weights_only=True``; one naming
anything else is refused unread. accelerate saves ``{"model": state_dict}``, whose keys DCP flattens
to ``model.<name>``; that one wrapper level is removed. DCP of FSDP holds the sharded master weights (float32
when the run keeps fp32 masters), read in their stored dtype.
"""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path

import torch

from opd_dynamics.errors import InputError
from opd_dynamics.io.model_dir import _FDS, EntryReader, TensorEntry, empty, file_beside, file_identity, pread_into
from opd_dynamics.io.reader import read_settings
from opd_dynamics.io.safe_pickle import DCP_METADATA, MAX_PICKLE_BYTES, Refused, loads
from opd_dynamics.io.torch_files import StoredTensor, archive_layout, dtype_code, first_sentence

METADATA = ".metadata"


def is_dcp_dir(path: Path) -> bool:
    return path.is_dir() and (path / METADATA).is_file()


def read_metadata(path: Path):
    """The Metadata object of a DCP directory, its fields as inert records (`safe_pickle.DCP_METADATA`: nothing of
    torch.distributed is imported or run); a pickle naming anything else is refused unread."""
    f = path / METADATA
    try:
        data = f.read_bytes() if f.stat().st_size <= MAX_PICKLE_BYTES else b""
        if not data:
            raise InputError(f, f"is {f.stat().st_size} bytes, not DCP checkpoint metadata")
        md = loads(data, DCP_METADATA)
    except Refused as e:
        raise InputError(f, f"is not DCP checkpoint metadata: it holds {e}, which DCP metadata does not; refused "
                            "unread (nothing in it was run)") from None
    except OSError as e:
        raise InputError(f, f"cannot be read: {e.strerror or e}") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError, KeyError,
            RecursionError, OverflowError, MemoryError, NotImplementedError) as e:
        raise InputError(f, f"is not readable DCP checkpoint metadata ({type(e).__name__}: {str(e)[:160]})") \
            from None
    if not hasattr(md, "state_dict_metadata") or not hasattr(md, "storage_data"):
        raise InputError(f, "is not DCP checkpoint metadata")
    return md


class DCPDir(EntryReader):
    """One DCP checkpoint directory (module docstring)."""

    FORMAT = "dcp"

    def __init__(self, path: str | Path, read: str = "pread", weights: str = "model", *, load_mode: str | None = None):
        read_settings(read, weights, load_mode)  # checked; always read by positioned reads, one set of weights
        self.path = Path(path)
        self.read = "pread"
        md = read_metadata(self.path)
        try:
            self._index(md)
        except (AttributeError, TypeError, ValueError, KeyError, IndexError) as e:  # admitted, but not DCP's shape
            raise InputError(self.path / METADATA, f"is DCP metadata of an unexpected form ({type(e).__name__}: "
                                                   f"{first_sentence(e)})") from None

    def _index(self, md) -> None:
        """The tensors, chunks and files the metadata lists, each checked."""
        keys = [k for k, v in md.state_dict_metadata.items() if type(v).__name__ == "TensorStorageMetadata"]
        if not keys:
            raise InputError(self.path / METADATA, "lists no tensors")
        planner = getattr(md, "planner_data", None) or {}
        heads = {planner[k][0] if isinstance(planner.get(k), tuple) and len(planner[k]) > 1 else None for k in keys}
        strip = next(iter(heads)) + "." if len(heads) == 1 and None not in heads else ""
        self._chunks: dict[str, list] = {}
        for idx, info in md.storage_data.items():
            self._chunks.setdefault(idx.fqn, []).append((idx, info))
        files = sorted({file_beside(self.path / METADATA, info.relative_path, "a data file")
                        for chunks in self._chunks.values() for _, info in chunks})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise InputError(self.path / METADATA, f"names data files that are absent: {', '.join(missing[:4])}")
        self.files = files
        self._idents = idents = {f: file_identity(f.stat()) for f in files}
        self.entries: dict[str, TensorEntry] = {}
        self._meta: dict[str, tuple[str, object]] = {}
        self._where: dict[tuple[Path, int], object] = {}  # a chunk's StoredTensor (None: not located)
        for k in keys:
            tm = md.state_dict_metadata[k]
            name = k[len(strip):] if strip and k.startswith(strip) else k
            code = dtype_code(self.path, k, tm.properties.dtype)
            shape = tuple(tm.size)
            first = self.path / self._chunks[k][0][1].relative_path if self._chunks.get(k) else files[0]
            numel = 1
            for n in shape:
                numel *= n
            self.entries[name] = TensorEntry(first, code, shape, 0, numel * tm.properties.dtype.itemsize,
                                             idents.get(first, ()))
            self._meta[name] = (k, tm)
        self._set_identity()

    def _chunk_plan(self, key: str, tm) -> list[tuple[object, Path, tuple]]:
        """(chunk metadata, its file, its storage info) for every chunk of a tensor, each checked to be stored."""
        by_offset = {tuple(idx.offset): info for idx, info in self._chunks.get(key, [])}
        plan = []
        for chunk in tm.chunks:
            info = by_offset.get(tuple(chunk.offsets))
            if info is None:
                raise InputError(self.path / METADATA, f"lists a chunk of {key!r} at {tuple(chunk.offsets)} with no "
                                                       "storage entry")
            if getattr(info, "transform_descriptors", None):
                raise InputError(self.path, f"stores {key!r} with stream transforms {info.transform_descriptors} "
                                            "(compression), which this reader does not decode")
            if len(chunk.offsets) != len(tm.size) or len(chunk.sizes) != len(tm.size) or \
                    any(o < 0 or n < 0 or o + n > m for o, n, m in zip(chunk.offsets, chunk.sizes, tm.size)):
                raise InputError(self.path / METADATA, f"lists a chunk of {key!r} at {tuple(chunk.offsets)} of size "
                                                       f"{tuple(chunk.sizes)} outside its shape {tuple(tm.size)}")
            plan.append((chunk, self.path / info.relative_path, info))
        if sum(math.prod(c.sizes) for c, _, _ in plan) != math.prod(tm.size):
            raise InputError(self.path / METADATA, f"has chunks of {key!r} covering "
                                                   f"{sum(math.prod(c.sizes) for c, _, _ in plan)} of "
                                                   f"{math.prod(tm.size)} entries")
        return plan

    def _located(self, f: Path, info, dtype: torch.dtype, sizes: tuple) -> StoredTensor | None:
        """Where a chunk's tensor lies in its .distcp file, from the chunk's own zip headers and pickle (read by
        the restricted layout unpickler); None for anything but one plain contiguous tensor of the chunk's dtype
        and size stored uncompressed (it is then loaded from its bytes, weights-only)."""
        where = (f, info.offset)
        if where not in self._where:  # (row blocks of one tensor locate its chunks once)
            try:
                fd = _FDS.get(f, self._idents[f])
            except OSError as e:
                raise InputError(f, f"cannot be read: {e.strerror or e}") from e
            self._where[where] = archive_layout(f, info.offset, info.length, fd=fd,
                                                 what=f"the chunk at byte {info.offset}")
        t = self._where[where]
        if not isinstance(t, StoredTensor) or not t.contiguous or t.dtype != dtype or \
                math.prod(t.shape) != math.prod(sizes):
            return None
        return t

    def _loaded(self, key: str, f: Path, info, dtype: torch.dtype, sizes: tuple) -> torch.Tensor:
        """A chunk's tensor loaded from its bytes with torch.load(weights_only=True): a chunk the allow-list admitted
        (`_located` read its pickle first) that is not one plain contiguous stored tensor."""
        try:
            with open(f, "rb") as fh:
                fh.seek(info.offset)
                raw = fh.read(info.length)
        except OSError as e:
            raise InputError(f, f"cannot be read: {e.strerror or e}") from e
        if len(raw) != info.length:
            raise InputError(f, f"is truncated: {key!r} needs bytes {info.offset}…{info.offset + info.length}")
        try:
            t = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            raise InputError(f, f"holds a chunk of {key!r} that is not a readable tensor ({first_sentence(e)})") \
                from None
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.numel() != math.prod(sizes):
            raise InputError(f, f"holds a chunk of {key!r} that is not the {dtype} tensor of {tuple(sizes)} its "
                                ".metadata lists")
        return t.reshape(sizes)

    def get(self, name: str) -> torch.Tensor:
        """The tensor assembled from its chunks, each chunk's bytes read straight into its box of the output."""
        return self.get_rows(name)

    def get_rows(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows of a tensor (all of them without a range), reading only the chunks, and of row chunks (what FSDP
        saves: each rank's rows, every column) only the rows, that the range covers: a chunk's rows are one
        positioned read into the output's rows."""
        try:
            key, tm = self._meta[name]
        except KeyError:
            raise InputError(self.path, f"has no tensor {name!r}") from None
        size, dtype = tuple(tm.size), tm.properties.dtype
        lo, hi = 0, size[0] if size else 0
        if size and (start is not None or stop is not None):
            lo, hi, _ = slice(start, stop).indices(size[0])
            hi = max(lo, hi)
        out = empty((hi - lo, *size[1:]) if size else (), dtype)
        for chunk, f, info in self._chunk_plan(key, tm):
            offs, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            a, b = (max(lo, offs[0]), min(hi, offs[0] + sizes[0])) if size else (0, 0)
            if size and a >= b:
                continue  # a chunk outside the rows asked for (or empty)
            rows_only = all(o == 0 for o in offs[1:]) and sizes[1:] == size[1:]
            t = self._located(f, info, dtype, sizes)
            if t is not None and rows_only and size:
                row_bytes = math.prod(sizes[1:]) * dtype.itemsize
                pread_into(f, self._idents[f], t.start + (a - offs[0]) * row_bytes, out[a - lo:b - lo])
                continue
            if t is not None:
                part = empty(sizes, dtype)
                pread_into(f, self._idents[f], t.start, part)
            else:
                part = self._loaded(key, f, info, dtype, sizes)
            if not size:
                out.copy_(part.reshape(()))
                continue
            box = (slice(a - lo, b - lo), *(slice(o, o + n) for o, n in zip(offs[1:], sizes[1:])))
            out[box] = part[a - offs[0]:b - offs[0]]
        return out

    def __repr__(self) -> str:
        return f"DCPDir({str(self.path)!r}, {len(self.entries)} tensors, {len(self.files)} files)"

"""torch Distributed Checkpoint directories (``.metadata`` + ``__R_0.distcp``): what accelerate, the transformers
Trainer and TRL write under FSDP's SHARDED_STATE_DICT (``checkpoint-N/pytorch_model_fsdp_0/``), read in place one
tensor at a time, with no process group.

``.metadata`` is a pickle: it is read with an unpickler that admits only DCP's own metadata classes and torch's
sizes and dtypes, so a directory that is not a DCP checkpoint is refused, not run. A tensor is assembled from the
chunks that hold it (each chunk a `torch.save` archive at a byte range of a ``.distcp`` file, loaded with
``weights_only=True``), so memory holds that tensor and one chunk. accelerate saves ``{"model": state_dict}``, whose
keys DCP flattens to ``model.<name>``; that one wrapper level is removed. DCP of FSDP holds the sharded master
weights (float32 when the run keeps fp32 masters), read in their stored dtype.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import torch

from opd_dynamics.errors import InputError
from opd_dynamics.io.model_dir import EntryReader, TensorEntry, file_identity
from opd_dynamics.io.torch_files import dtype_code, require_safe_torch

METADATA = ".metadata"
_ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                    "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint._extension")
_ALLOWED_TORCH = {"Size", "strided", "sparse_coo", "contiguous_format", "channels_last", "preserve_format",
                  *(str(d).removeprefix("torch.") for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                                            torch.int64, torch.int32, torch.int16, torch.int8,
                                                            torch.uint8, torch.bool))}


_ALLOWED_NAMES = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                  ("torch.serialization", "_get_layout"),  # how torch pickles a layout: by its name
                  *(("pathlib", c) for c in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")),
                  *(("pathlib._local", c) for c in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"))}
# (storage_meta records the checkpoint id, a path)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in _ALLOWED_MODULES or (module == "torch" and name in _ALLOWED_TORCH) or \
                (module, name) in _ALLOWED_NAMES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata")


def is_dcp_dir(path: Path) -> bool:
    return path.is_dir() and (path / METADATA).is_file()


def read_metadata(path: Path):
    """The Metadata object of a DCP directory, unpickled with the restricted unpickler."""
    f = path / METADATA
    require_safe_torch(f)
    import torch.distributed.checkpoint.metadata  # noqa: F401 - the classes the unpickler admits

    try:
        with open(f, "rb") as fh:
            md = _MetadataUnpickler(fh).load()
    except pickle.UnpicklingError as e:
        raise InputError(f, f"is not DCP checkpoint metadata ({e}); refused unread") from None
    except (OSError, EOFError, AttributeError, TypeError, ValueError) as e:
        raise InputError(f, f"is not readable DCP checkpoint metadata ({str(e)[:160]})") from None
    if not hasattr(md, "state_dict_metadata") or not hasattr(md, "storage_data"):
        raise InputError(f, "is not DCP checkpoint metadata")
    return md


class DCPDir(EntryReader):
    """One DCP checkpoint directory (module docstring)."""

    FORMAT = "dcp"

    def __init__(self, path: str | Path, load_mode: str = "pread"):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = Path(path)
        self.load_mode = "pread"
        md = read_metadata(self.path)
        keys = [k for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)]
        if not keys:
            raise InputError(self.path / METADATA, "lists no tensors")
        planner = getattr(md, "planner_data", None) or {}
        heads = {planner[k][0] if isinstance(planner.get(k), tuple) and len(planner[k]) > 1 else None for k in keys}
        strip = next(iter(heads)) + "." if len(heads) == 1 and None not in heads else ""
        self._chunks: dict[str, list] = {}
        for idx, info in md.storage_data.items():
            self._chunks.setdefault(idx.fqn, []).append((idx, info))
        files = sorted({self.path / info.relative_path for chunks in self._chunks.values() for _, info in chunks})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise InputError(self.path / METADATA, f"names data files that are absent: {', '.join(missing[:4])}")
        self.files = files
        idents = {f: file_identity(f.stat()) for f in files}
        self.entries: dict[str, TensorEntry] = {}
        self._meta: dict[str, tuple[str, object]] = {}
        digest = hashlib.sha256()
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
            digest.update(f"{name}:{code}:{shape};".encode())
        self._set_identity(digest.hexdigest())

    def get(self, name: str) -> torch.Tensor:
        """The tensor assembled from its chunks (each read from its byte range and loaded weights-only)."""
        try:
            key, tm = self._meta[name]
        except KeyError:
            raise InputError(self.path, f"has no tensor {name!r}") from None
        out = torch.empty(tuple(tm.size), dtype=tm.properties.dtype)
        covered = 0
        by_offset = {tuple(idx.offset): info for idx, info in self._chunks.get(key, [])}
        for chunk in tm.chunks:
            info = by_offset.get(tuple(chunk.offsets))
            if info is None:
                raise InputError(self.path / METADATA, f"lists a chunk of {key!r} at {tuple(chunk.offsets)} with no "
                                                       "storage entry")
            if getattr(info, "transform_descriptors", None):
                raise InputError(self.path, f"stores {key!r} with stream transforms {info.transform_descriptors} "
                                            "(compression), which this reader does not decode")
            f = self.path / info.relative_path
            try:
                with open(f, "rb") as fh:
                    fh.seek(info.offset)
                    raw = fh.read(info.length)
            except OSError as e:
                raise InputError(f, f"cannot be read: {e.strerror or e}") from e
            if len(raw) != info.length:
                raise InputError(f, f"is truncated: {key!r} needs bytes {info.offset}…{info.offset + info.length}")
            part = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
            box = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))
            out[box] = part.reshape(tuple(chunk.sizes))
            covered += part.numel()
        if covered != out.numel():
            raise InputError(self.path / METADATA, f"has chunks of {key!r} covering {covered} of {out.numel()} entries")
        return out

    def __repr__(self) -> str:
        return f"DCPDir({str(self.path)!r}, {len(self.entries)} tensors, {len(self.files)} files)"

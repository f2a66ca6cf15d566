"""verl's raw FSDP checkpoints: ``model_world_size_W_rank_R.pt``, one per rank, each `torch.save` of the sharded
state dict (DTensor values; FSDP1 with a device mesh and FSDP2 alike), read in place one tensor at a time.

No rank file is mapped or read whole: each one's ``data.pkl`` is read once by the restricted layout unpickler
(`torch_files.archive_layout`, which records a DTensor's local tensor, global shape and placements through inert
stand-ins and builds nothing), and a tensor is its local shards over the ranks of one replica (HSDP's leading
`Replicate` dim: the first replica), each read with one positioned read straight into its rows of the output
(`Shard(0)`, what FSDP writes; another shard dim reads each shard and concatenates), so memory holds that tensor
and nothing stays mapped; a row range reads only the ranks' rows it covers. A rank file whose pickle names anything
else is refused unread; one holding a strided view (admitted) is read through the mapped `weights_only` load
(`torch_files.load_weights_file`). Names lose
FSDP's ``_fsdp_wrapped_module.`` and torch.compile's ``_orig_mod.``. The config comes from
``huggingface/config.json`` beside the rank files. verl's actor keeps its master weights in float32, so these
files are the fp32 masters: a truer update than a bf16 export of the same step (verl's model_merger casts to bf16).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from opd_dynamics.errors import InputError
from opd_dynamics.io.model_dir import EntryReader, TensorEntry, empty, file_identity, pread_into
from opd_dynamics.io.reader import read_settings
from opd_dynamics.io.torch_files import (
    StoredDTensor,
    StoredTensor,
    check_torch_file,
    dtype_code,
    load_weights_file,
    tensor_layout,
)

RANK_FILE = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")
FSDP_CONFIG = "fsdp_config.json"
_PREFIXES = ("_fsdp_wrapped_module.", "_orig_mod.")


def rank_files(path: Path) -> dict[int, Path]:
    """{rank: file} of one world size; an InputError for mixed world sizes or a missing rank."""
    found: dict[int, dict[int, Path]] = {}
    for p in path.iterdir():
        m = RANK_FILE.match(p.name)
        if m:
            found.setdefault(int(m.group(1)), {})[int(m.group(2))] = p
    if not found:
        raise InputError(path, "holds no model_world_size_W_rank_R.pt files")
    if len(found) > 1:
        raise InputError(path, f"mixes rank files of world sizes {', '.join(map(str, sorted(found)))}; keep one run's "
                               "files per directory")
    (world, ranks), = found.items()
    missing = sorted(set(range(world)) - set(ranks))
    if missing:
        names = ", ".join(f"model_world_size_{world}_rank_{r}.pt" for r in missing[:4])
        raise InputError(path, f"lacks rank file(s) {names} of world size {world}")
    cfg = path / FSDP_CONFIG
    if cfg.exists():
        declared = json.loads(cfg.read_text()).get("world_size")
        if declared is not None and int(declared) != world:
            raise InputError(cfg, f"declares world size {declared}, but the rank files are of world size {world}")
    return dict(sorted(ranks.items()))


def has_rank_files(path: Path) -> bool:
    return path.is_dir() and any(RANK_FILE.match(p.name) for p in path.iterdir())


def _clean(name: str) -> str:
    for p in _PREFIXES:
        name = name.replace(p, "")
    return name


def _shard_dim(t) -> int | None:
    """The dim a DTensor is sharded along over the last mesh dim (None: replicated there)."""
    from torch.distributed.tensor import Replicate, Shard

    pl = t.placements[-1]
    if isinstance(pl, Shard):
        return pl.dim
    if isinstance(pl, Replicate):
        return None
    raise ValueError(f"placement {pl} is not supported (only Shard and Replicate)")


class FSDPShards(EntryReader):
    """One verl ``actor/`` directory of FSDP rank files (module docstring)."""

    FORMAT = "fsdp-shards"

    def __init__(self, path: str | Path, read: str = "pread", weights: str = "model", *, load_mode: str | None = None):
        read_settings(read, weights, load_mode)  # checked; how it reads follows from its files, one set of weights
        self.path = Path(path)
        ranks = rank_files(self.path)
        self.files = list(ranks.values())
        for f in self.files:
            check_torch_file(f)
        self._idents = [file_identity(f.stat()) for f in self.files]
        # each rank's tensors located in its file by the restricted layout unpickler (DTensors recorded, not built);
        # a rank file naming anything else is refused; one holding a strided view is read through the mapped load
        layouts = [tensor_layout(f, dtensors=True) for f in self.files]
        self._layouts: list[dict] | None = None if any(x is None for x in layouts) else layouts
        self._sds = [load_weights_file(f, dtensors=True) for f in self.files] if self._layouts is None else []
        self.read = "mmap" if self._layouts is None else "pread"
        sds = self._layouts if self._layouts is not None else self._sds
        self.entries: dict[str, TensorEntry] = {}
        self._keys: dict[str, str] = {}
        first = sds[0]
        for f, sd in zip(self.files[1:], sds[1:]):
            if set(sd) != set(first):
                diff = sorted(set(sd) ^ set(first))[:3]
                raise InputError(f, f"holds other tensors than {self.files[0].name} ({', '.join(diff)}): rank files "
                                    "of different runs or steps mixed in one directory")
        for key, t in first.items():
            if not isinstance(t, (torch.Tensor, StoredTensor, StoredDTensor)):
                continue
            name = _clean(key)
            code = dtype_code(self.files[0], key, t.dtype)
            shape = tuple(t.shape)  # a DTensor's shape is the global one
            for f, sd in zip(self.files[1:], sds[1:]):
                other = sd[key]
                if getattr(other, "dtype", None) != t.dtype or tuple(getattr(other, "shape", ())) != shape:
                    raise InputError(f, f"holds {key!r} unlike {self.files[0].name} (another dtype or global shape): "
                                        "rank files of different runs mixed in one directory")
            self.entries[name] = TensorEntry(self.files[0], code, shape, 0, math.prod(shape) * t.dtype.itemsize,
                                             self._idents[0])
            self._keys[name] = key
        if not self.entries:
            raise InputError(self.path, "holds no tensors")
        self._set_identity()

    def _key(self, name: str) -> str:
        try:
            return self._keys[name]
        except KeyError:
            raise InputError(self.path, f"has no tensor {name!r}") from None

    def _pieces(self, name: str) -> tuple[int | None, list[tuple[int, StoredTensor, int]]]:
        """(dim, [(rank, its local tensor, its offset along dim)]): the shards that tile the tensor along its shard
        dim over the last mesh dim (dim None: one rank's copy holds it all). Ranks in order until their shards tile
        the dim: all of them, or HSDP's first replica (ranks are replica-major), without the pickled device mesh
        (its attributes change across torch versions)."""
        key = self._key(name)
        t0 = self._layouts[0][key]
        if isinstance(t0, StoredTensor):  # a plain tensor (not sharded)
            return None, [(0, t0, 0)]
        if any(p is not None for p in t0.placements[:-1]):
            raise InputError(self.files[0], f"holds {key!r} sharded over more than one mesh dim {t0.placements} "
                                            "(only FSDP's Shard and HSDP's leading Replicate are supported)")
        dim = t0.placements[-1]
        if dim is None:
            if t0.local.shape != t0.shape:
                raise InputError(self.files[0], f"holds {key!r} replicated with a local shape {t0.local.shape} "
                                                f"other than its global shape {t0.shape}")
            return None, [(0, t0.local, 0)]
        want, pieces, have = t0.shape[dim], [], 0
        for r, sd in enumerate(self._layouts):
            if have >= want and pieces:
                break
            local = sd[key].local
            if local.shape[:dim] + local.shape[dim + 1:] != t0.shape[:dim] + t0.shape[dim + 1:]:
                have = -1
                break
            pieces.append((r, local, have))
            have += local.shape[dim]
        if have != want:
            raise InputError(self.path, f"holds shards of {key!r} that do not join to its global shape {t0.shape}")
        return dim, pieces

    def get(self, name: str) -> torch.Tensor:
        """The full tensor: the local shards of one replica, each read with one positioned read into its rows
        of the output (Shard(0), what FSDP writes), or read and concatenated along another shard dim."""
        if self._layouts is None:
            return self._mapped_get(name)
        dim, pieces = self._pieces(name)
        if dim is None or dim == 0:
            return self.get_rows(name)
        parts = []
        for r, local, _ in pieces:
            part = empty(local.shape, local.dtype)
            pread_into(self.files[r], self._idents[r], local.start, part)
            parts.append(part)
        return torch.cat(parts, dim=dim)

    def get_rows(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows of a tensor, reading only their bytes: a row range of a Shard(0) tensor is a row range of one or
        a few ranks' shards, each read with one positioned read into the output."""
        if self._layouts is None:
            return super().get_rows(name, start, stop)
        dim, pieces = self._pieces(name)
        if dim not in (None, 0):
            return super().get_rows(name, start, stop)  # assembled once, served in row blocks
        shape = self.entries[name].shape
        if not shape:  # a scalar
            out = empty((), pieces[0][1].dtype)
            pread_into(self.files[0], self._idents[0], pieces[0][1].start, out)
            return out
        lo, hi, _ = slice(start, stop).indices(shape[0])
        hi = max(lo, hi)
        out = empty((hi - lo, *shape[1:]), pieces[0][1].dtype)
        row_bytes = math.prod(shape[1:]) * out.element_size()
        for r, local, at in pieces:
            a, b = max(lo, at), min(hi, at + local.shape[0])
            if a < b:
                pread_into(self.files[r], self._idents[r], local.start + (a - at) * row_bytes, out[a - lo:b - lo])
        return out

    # -- the mapped weights_only load, for admitted rank files holding strided views -------------------------------
    def _mapped_get(self, name: str) -> torch.Tensor:
        key = self._key(name)
        t0 = self._sds[0][key]
        if not hasattr(t0, "placements"):  # a plain tensor (not sharded)
            return t0.detach().clone()
        try:
            dim = _shard_dim(t0)
        except ValueError as e:
            raise InputError(self.files[0], f"holds {key!r} with {e}") from None
        if dim is None:
            return t0._local_tensor.detach().clone()
        want, parts, have = self.entries[name].shape[dim], [], 0
        for sd in self._sds:
            if have >= want and parts:
                break
            local = sd[key]._local_tensor
            parts.append(local)
            have += local.shape[dim]
        out = torch.cat(parts, dim=dim).detach()
        if tuple(out.shape) != self.entries[name].shape:
            raise InputError(self.path, f"holds shards of {key!r} that join to {tuple(out.shape)}, not its global "
                                        f"shape {self.entries[name].shape}")
        return out

    def __repr__(self) -> str:
        return f"FSDPShards({str(self.path)!r}, {len(self.entries)} tensors, world size {len(self.files)})"

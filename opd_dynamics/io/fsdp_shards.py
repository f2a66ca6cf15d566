"""verl's raw FSDP checkpoints: ``model_world_size_W_rank_R.pt``, one per rank, each `torch.save` of the sharded
state dict (DTensor values; FSDP1 with a device mesh and FSDP2 alike), read in place one tensor at a time.

Every rank file is mapped (`torch_files.load_weights_file`), never read whole; a tensor is the concatenation of
its local shards along its `Shard` dim over the ranks of one replica (HSDP's leading `Replicate` dim: the first
replica), so memory holds one full tensor. Names lose FSDP's ``_fsdp_wrapped_module.`` and torch.compile's
``_orig_mod.``. The config comes from ``huggingface/config.json`` beside the rank files. verl's actor keeps its
master weights in float32, so these files are the fp32 masters: a truer update than a bf16 export of the same
step (verl's model_merger casts to bf16).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from opd_dynamics.errors import InputError
from opd_dynamics.io.model_dir import EntryReader, TensorEntry, file_identity
from opd_dynamics.io.torch_files import dtype_code, load_weights_file

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

    def __init__(self, path: str | Path, load_mode: str = "mmap"):
        self.path = Path(path)
        self.load_mode = "mmap"
        ranks = rank_files(self.path)
        self.files = list(ranks.values())
        self._sds = [load_weights_file(f) for f in self.files]
        self.entries: dict[str, TensorEntry] = {}
        self._keys: dict[str, str] = {}
        digest = hashlib.sha256()
        first = self._sds[0]
        for f, sd in zip(self.files[1:], self._sds[1:]):
            if set(sd) != set(first):
                diff = sorted(set(sd) ^ set(first))[:3]
                raise InputError(f, f"holds other tensors than {self.files[0].name} ({', '.join(diff)}): rank files "
                                    "of different runs or steps mixed in one directory")
        ident = file_identity(self.files[0].stat())
        for key, t in first.items():
            if not isinstance(t, torch.Tensor):
                continue
            name = _clean(key)
            code = dtype_code(self.files[0], key, t.dtype)
            shape = tuple(t.shape)  # a DTensor's shape is the global one
            self.entries[name] = TensorEntry(self.files[0], code, shape, 0, t.numel() * t.element_size(), ident)
            self._keys[name] = key
            digest.update(f"{name}:{code}:{shape};".encode())
        if not self.entries:
            raise InputError(self.path, "holds no tensors")
        self._set_identity(digest.hexdigest())

    def get(self, name: str) -> torch.Tensor:
        """The full tensor: the local shards of one replica concatenated along their shard dim."""
        try:
            key = self._keys[name]
        except KeyError:
            raise InputError(self.path, f"has no tensor {name!r}") from None
        t0 = self._sds[0][key]
        if not hasattr(t0, "placements"):  # a plain tensor (not sharded)
            return t0.detach().clone()
        try:
            dim = _shard_dim(t0)
        except ValueError as e:
            raise InputError(self.files[0], f"holds {key!r} with {e}") from None
        if dim is None:
            return t0._local_tensor.detach().clone()
        # ranks in order until their shards tile the dim: all of them, or HSDP's first replica (ranks are
        # replica-major), without touching the pickled device mesh (its attributes change across torch versions)
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

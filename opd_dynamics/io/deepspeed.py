"""DeepSpeed ZeRO checkpoints (``global_stepN/`` as OpenRLHF and the transformers Trainer save them), read in
place one tensor at a time: ``mp_rank_00_model_states.pt`` (ZeRO-1/2) or ``zero_pp_rank_R_mp_rank_00_model_states.pt``
(ZeRO-3) and the ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`` partitions.

Two precisions. ``masters=False`` (ZeRO-1/2 only): the model-states ``module`` weights, in the training dtype (bf16
for OpenRLHF), exactly what the model computed with. ``masters=True`` (always for ZeRO-3, whose module holds only
placeholders): the fp32 master weights, rebuilt as DeepSpeed's own ``zero_to_fp32`` does but one tensor at a time
from the partitions (only the bytes of that tensor are read). The masters are the truer update when the
base is the same run's start: bf16 weights lose updates smaller than their rounding.

The model-states ``module`` weights and the optimizer files' flat fp32 groups are located by the toolkit's
allow-list unpickler (`torch_files.archive_layout` with `safe_pickle.WEIGHTS` and `safe_pickle.DEEPSPEED_OPTIM`:
tensors, plain containers and, for the optimizer files, DeepSpeed's loss scaler, ZeRO stage enum and fragment
addresses as inert placeholders whose code is never imported) and read by positioned reads, nothing mapped;
a file naming anything else is refused unread.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from opd_dynamics.errors import InputError
from opd_dynamics.io.model_dir import EntryReader, TensorEntry, _pread_tensor, empty, file_identity, pread_into
from opd_dynamics.io.reader import read_settings
from opd_dynamics.io.safe_pickle import DEEPSPEED_OPTIM
from opd_dynamics.io.torch_files import StoredTensor, archive_layout, check_torch_file, dtype_code, load_weights_file

MODEL_STATES = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_00_model_states\.pt$")
OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


@dataclass(frozen=True)
class _Flat:
    """One flat fp32 group of an optimizer-state file, located."""

    file: Path
    ident: tuple
    tensor: StoredTensor

    @property
    def numel(self) -> int:
        return math.prod(self.tensor.shape)


def load_optim_states(path: Path) -> dict:
    """An optim_states file's tree, its tensors located (`StoredTensor`: read later by positioned reads) and its
    DeepSpeed objects inert placeholders: unpickled with the allow-list `safe_pickle.DEEPSPEED_OPTIM`, nothing run
    or mapped."""
    check_torch_file(path)
    states = archive_layout(path, names=DEEPSPEED_OPTIM, kind="DeepSpeed optimizer state")
    if not isinstance(states, dict) or not isinstance(states.get("optimizer_state_dict"), dict):
        raise InputError(path, "is not a DeepSpeed optimizer state (no optimizer_state_dict)")
    return states


def _model_states(path: Path) -> dict:
    """A model-states file: its ``module`` weights located by the restricted layout unpickler (each then read with
    one positioned read; the file holds plain tensors, torch.Size and plain values only), or, when it holds
    anything else, the mapped weights_only load."""
    check_torch_file(path)
    states = archive_layout(path)
    if isinstance(states, dict) and isinstance(states.get("module"), dict) and \
            all(isinstance(t, StoredTensor) and t.contiguous for t in states["module"].values()):
        return states
    return load_weights_file(path)


def is_zero_dir(path: Path) -> bool:
    return path.is_dir() and any(MODEL_STATES.match(p.name) for p in path.iterdir())


def _ranked(path: Path, pattern: re.Pattern, what: str) -> list[Path]:
    files = {int(m.group(1)): p for p in path.iterdir() if (m := pattern.match(p.name)) and m.group(1) is not None}
    missing = sorted(set(range(len(files) and max(files) + 1)) - set(files))
    if missing:
        raise InputError(path, f"lacks the {what} of rank(s) {', '.join(map(str, missing[:4]))}")
    return [files[r] for r in sorted(files)]


class ZeroCheckpoint(EntryReader):
    """One DeepSpeed ``global_stepN/`` directory (module docstring)."""

    FORMAT = "deepspeed-zero"

    def __init__(self, path: str | Path, read: str = "pread", weights: str = "model", *, masters: bool = False,
                 load_mode: str | None = None):
        self.path = Path(path)
        _, weights = read_settings(read, weights, load_mode)  # positioned reads where the pickle allows, or mapped
        masters = masters or weights == "masters"
        stage3 = _ranked(self.path, MODEL_STATES, "model states")
        states_file = stage3[0] if stage3 else self.path / "mp_rank_00_model_states.pt"
        states = _model_states(states_file)
        self._pread = all(isinstance(t, StoredTensor) for t in states["module"].values())
        self.read = "pread" if self._pread or masters else "mmap"
        world = int(states.get("dp_world_size", 1))
        shapes: dict[str, torch.Size] = {}
        self._group_of: dict[str, int] = {}
        for g, group in enumerate(states["param_shapes"]):
            shapes.update(group)
            self._group_of.update(dict.fromkeys(group, g))
        self.stage3 = bool(stage3)
        self.masters = masters or self.stage3
        self.files = [states_file]
        self._groups: list[list[_Flat]] = []
        if self.masters:
            optim = _ranked(self.path, OPTIM_STATES, "optimizer states")
            if not optim:
                raise InputError(self.path, "has no *_optim_states.pt files, which hold the fp32 master weights"
                                            + (" (ZeRO-3 keeps its weights only there)" if self.stage3 else ""))
            if len(optim) != world:
                raise InputError(self.path, f"holds {len(optim)} optimizer-state files for a world size of {world}")
            for f in optim:
                osd = load_optim_states(f)["optimizer_state_dict"]
                key = "fp32_flat_groups" if self.stage3 else "single_partition_of_fp32_groups"
                flats = osd.get(key)
                if not isinstance(flats, list) or not all(isinstance(t, StoredTensor) and t.contiguous and
                                                          t.dtype == torch.float32 for t in flats):
                    raise InputError(f, f"holds no float32 {key} (the master weights)")
                ident = file_identity(f.stat())
                self._groups.append([_Flat(f, ident, t) for t in flats])
            self.files += optim
        self._states = states
        self._shapes = shapes
        self._layout = self._plan(shapes, world) if self.masters else {}
        self.entries: dict[str, TensorEntry] = {}
        ident = file_identity(states_file.stat())
        module = states["module"]
        for name, shape in shapes.items():
            dtype = torch.float32 if self.masters else module[name].dtype
            code = dtype_code(states_file, name, dtype)
            located = self._pread and not self.masters
            start = module[name].start if located else 0
            if located and tuple(module[name].shape) != tuple(shape):
                raise InputError(states_file, f"holds {name!r} of shape {tuple(module[name].shape)} in its module, "
                                              f"{tuple(shape)} in its param_shapes")
            self.entries[name] = TensorEntry(states_file, code, tuple(shape), start,
                                             start + math.prod(shape) * dtype.itemsize, ident)
        if not self.entries:
            raise InputError(states_file, "lists no parameters")
        self._set_identity(tag=f"masters={self.masters};")

    def _plan(self, shapes: dict[str, torch.Size], world: int) -> dict[str, tuple[int, int]]:
        """name → (offset, length): ZeRO-1/2, where the tensor lies in its param group's concatenation of every
        rank's partition (params of a group back to back, in param_shapes order); ZeRO-3, where its piece of
        ceil(numel/W) lies in each rank's flat buffer (every group's params in order)."""
        layout, offset = {}, {}
        for name, shape in shapes.items():
            numel = math.prod(shape)
            g = 0 if self.stage3 else self._group_of[name]
            at = offset.get(g, 0)
            layout[name] = (at, math.ceil(numel / world) if self.stage3 else numel)
            offset[g] = at + layout[name][1]
        for g, need in offset.items():
            avail = sum(t.numel for t in self._groups[0]) if self.stage3 else \
                sum(groups[g].numel for groups in self._groups)
            if need > avail:
                raise InputError(self.path, f"holds {avail} master weights in param group {g}, fewer than the {need} "
                                            "its parameter shapes need")
        return layout

    @staticmethod
    def _span(flats: list[_Flat], lo: int, n: int) -> torch.Tensor:
        """Elements lo … lo+n of the concatenation of ``flats``, each piece one positioned read of its bytes."""
        out, start, at = empty((n,), torch.float32), 0, 0
        for f in flats:
            end = start + f.numel
            if end > lo and start < lo + n:
                a, b = max(lo, start) - start, min(lo + n, end) - start
                pread_into(f.file, f.ident, f.tensor.start + a * 4, out[at:at + b - a])
                at += b - a
            start = end
        if at != n:
            raise InputError(flats[0].file, f"holds {at} of the {n} master weights asked for")
        return out

    def get(self, name: str) -> torch.Tensor:
        if name not in self.entries:
            raise InputError(self.path, f"has no tensor {name!r}")
        shape = self.entries[name].shape
        if not self.masters:
            if self._pread:
                return _pread_tensor(self.entries[name])
            return self._states["module"][name].detach().clone()
        offset, n = self._layout[name]
        if self.stage3:
            pieces = [self._span(groups, offset, n) for groups in self._groups]
            return torch.cat(pieces)[: math.prod(shape)].reshape(shape)
        g = self._group_of[name]
        return self._span([groups[g] for groups in self._groups], offset, n).reshape(shape)  # rank-major

    def get_rows(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows of a tensor: of the model-states weights, read by one positioned read of their bytes."""
        entry = self.entries.get(name)
        if entry is None or self.masters or not self._pread or not entry.shape:
            return super().get_rows(name, start, stop)
        lo, hi, _ = slice(start, stop).indices(entry.shape[0])
        return _pread_tensor(entry, (lo, max(lo, hi)))

    def __repr__(self) -> str:
        kind = "fp32 masters" if self.masters else "model states"
        return f"ZeroCheckpoint({str(self.path)!r}, ZeRO-{3 if self.stage3 else '1/2'}, {kind})"

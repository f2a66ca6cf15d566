"""The one allow-list for every pickle the toolkit reads, and the restricted unpickler that enforces it.

Nothing in a checkpoint file is trusted (docs/SECURITY.md). A pickle is a program: its GLOBAL opcodes name any
importable object and REDUCE calls it. So every pickle read here (a `torch.save` archive's ``data.pkl``: `.bin`,
verl's rank files, DeepSpeed's model and optimizer states, each DCP chunk; DCP's ``.metadata``) goes through
`loads`, which

- reads at most `MAX_PICKLE_BYTES` and refuses the opcodes torch never writes and that build objects by other
  routes (INST, OBJ, NEWOBJ_EX, the EXT registry codes, text PERSID), before anything is unpickled;
- resolves a global only by an exact (module, name) pair of one table below, never by import or attribute lookup:
  a dotted name (``os.system`` inside an allowed module, which protocol 4 resolves) or ``__builtin__`` aliasing
  finds nothing, and every object a table yields is an inert stand-in of this module (it records what it is
  given and runs nothing), a dtype, or a plain container type;
- hands persistent ids (torch's storages) to the caller's ``persistent_load``, which checks them.

The tables: `WEIGHTS` (what `torch.save` writes for a state dict of plain tensors and `nn.Parameter`s),
`DTENSOR` (plus verl's DTensor pickles), `DEEPSPEED_OPTIM` (plus DeepSpeed's loss scaler, ZeRO stage enum and
fragment address as placeholders) and `DCP_METADATA` (DCP's ``.metadata`` dataclasses as field records). Anything
else is refused with the name it carried. Read from the files torch 2.13, DeepSpeed 0.19 and DCP write.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from collections.abc import Callable, Mapping

import torch

#: no pickle read here may be larger: torch's data.pkl of a 70B state dict is well under 1 MB
MAX_PICKLE_BYTES = 64 << 20
#: opcodes torch.save, DCP and DeepSpeed never write, each another way to build an object than GLOBAL + REDUCE
FORBIDDEN_OPCODES = frozenset({"INST", "OBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "PERSID"})
#: opcodes that store the top of the stack in the memo (MEMOIZE at the next index; the others at the one they name)
MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})


class Refused(pickle.UnpicklingError):
    """A pickle that names something outside the allow-list (or uses an opcode it refuses): never run."""


# -- inert stand-ins ----------------------------------------------------------------------------------------------


class Storage:
    """A storage of a `torch.save` archive: its dtype and key (the zip entry ``data/<key>`` holding its bytes)."""

    def __init__(self, dtype: torch.dtype, key: str):
        self.dtype, self.key = dtype, key


class TensorRef:
    """Where a plain tensor of a `torch.save` archive lives: its storage and its view (nothing is read)."""

    def __init__(self, storage: Storage, offset: int, size, stride, *rest):
        if not isinstance(storage, Storage):
            raise Refused("a tensor without a storage")
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(n) for n in size), tuple(int(n) for n in stride)


class Record:
    """Stands in for an object of a pickle: keeps the arguments and state it is given, runs nothing."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def attrs(self) -> dict:
        """The recorded state as one dict (a (dict, slots dict) pair merged)."""
        return fields(self.state)


def fields(state) -> dict:
    """An object's pickled state (a dict, or a (dict, slots dict) pair) as one dict."""
    out: dict = {}
    for part in (state if isinstance(state, tuple) else (state,)):
        if isinstance(part, dict):
            out.update(part)
        elif part is not None:
            raise Refused("an object state that is not a dict")
    return out


class Fields(Record):
    """A dataclass pickled as its fields (DCP's metadata): the fields become attributes."""

    def __setstate__(self, state):
        self.__dict__.update(fields(state))


class StateDict(dict):
    """collections.OrderedDict as `Module.state_dict()` pickles it: the dict; its ``_metadata`` attribute (module
    versions), set by BUILD, dropped."""

    def __setstate__(self, state):
        pass


def _record(name: str, base: type = Record) -> type:
    return type(name, (base,), {})


class Shard(Record):
    pass


class Replicate(Record):
    pass


class DTensorRef:
    """A DTensor of a rank file: its local tensor, global shape and placements (a Shard dim, or None)."""

    def __init__(self, local: TensorRef, shape: tuple[int, ...], placements: tuple[int | None, ...]):
        self.local, self.shape, self.placements = local, shape, placements


_WRAPPER_SUBCLASS = object()  # torch._utils._rebuild_wrapper_subclass, never called
_DTENSOR = object()  # the DTensor class
_TENSOR = object()  # torch.Tensor (a plain tensor pickled with its __dict__: DeepSpeed's ZeRO-3 flat groups)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None) -> TensorRef:
    """torch._utils._rebuild_parameter(_with_state): an nn.Parameter is its data."""
    if not isinstance(data, TensorRef):
        raise Refused("a parameter without a tensor")
    return data


def _rebuild_from_type(func, new_type, args, state):
    """torch._tensor._rebuild_from_type_v2 for the two cases torch writes here: a DTensor (verl's rank files) and
    a plain tensor with attributes (DeepSpeed's flat groups). What the pickle says, checked, built of nothing."""
    if func is TensorRef and new_type is _TENSOR:
        return TensorRef(*args)
    if func is not _WRAPPER_SUBCLASS or new_type is not _DTENSOR or len(args) < 3 or args[0] is not _DTENSOR:
        raise Refused("a tensor subclass other than DTensor")
    attrs = fields(state)
    local, spec = attrs.get("_local_tensor"), attrs.get("_spec")
    if not isinstance(local, TensorRef) or not isinstance(spec, Record):
        raise Refused("a DTensor without its local tensor or spec")
    placements = []
    for p in spec.attrs().get("placements", ()):
        if isinstance(p, Shard):
            placements.append(int(p.attrs()["dim"]))
        elif isinstance(p, Replicate):
            placements.append(None)
        else:
            raise Refused("a DTensor placement other than Shard and Replicate")
    shape = tuple(int(n) for n in args[2])
    if not placements or any(n < 0 for n in shape) or any(d is not None and not 0 <= d < len(shape)
                                                          for d in placements):
        raise Refused("a DTensor without valid placements or shape")
    return DTensorRef(local, shape, tuple(placements))


def _layout(name: str) -> str:
    if name != "torch.strided":
        raise Refused(f"a tensor of layout {name}")
    return name


class _DCPProperties(Record):
    """DCP's TensorProperties, pickled as (dtype, layout, requires_grad, memory-format code, pin_memory)."""

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[0], torch.dtype)):
            raise Refused("tensor properties that are not (dtype, layout, …)")
        self.dtype = state[0]


# -- the allow-list -----------------------------------------------------------------------------------------------

_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)
_STORAGES = {"DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
             "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
             "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
             "BoolStorage": torch.bool}
_PLAIN = {("collections", "OrderedDict"): StateDict, ("torch", "Size"): tuple,
          **{("torch", str(d).removeprefix("torch.")): d for d in _DTYPES}}

Names = Mapping[tuple[str, str], object]

#: a `torch.save` state dict of plain tensors and parameters
WEIGHTS: Names = {
    **_PLAIN,
    ("torch._utils", "_rebuild_tensor_v2"): TensorRef,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): dtype for name, dtype in _STORAGES.items()},
}

#: verl's FSDP rank files: DTensors, as torch pickles them, recorded (read from FSDP2's files, torch 2.13)
DTENSOR: Names = {
    **WEIGHTS,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch._utils", "_rebuild_wrapper_subclass"): _WRAPPER_SUBCLASS,
    ("torch.distributed.tensor", "DTensor"): _DTENSOR,
    ("torch.distributed.tensor._api", "DTensor"): _DTENSOR,
    ("torch.distributed.tensor.placement_types", "Shard"): Shard,
    ("torch.distributed.tensor.placement_types", "Replicate"): Replicate,
    ("torch.serialization", "_get_layout"): _layout,
    ("torch", "device"): lambda *a: "device",
    **{("torch.distributed.tensor._dtensor_spec", c): _record(c) for c in ("DTensorSpec", "TensorMeta",
                                                                          "ShardOrderEntry")},
    ("torch.distributed.device_mesh", "DeviceMesh"): _record("DeviceMesh"),
    **{("torch.distributed._mesh_layout", c): _record(c) for c in ("_MeshLayout", "_FlatLayout")},
}


def _reconstructor(cls, base, state):
    """copyreg._reconstructor, for a placeholder class only (protocol 2's way to pickle a plain object)."""
    if not (isinstance(cls, type) and issubclass(cls, Record)) or base is not object:
        raise Refused("an object other than a DeepSpeed placeholder")
    return cls()


#: DeepSpeed's optimizer-state files: tensors, and its loss scaler, ZeRO stage and fragment addresses as
#: placeholders (their code is never imported)
DEEPSPEED_OPTIM: Names = {
    **WEIGHTS,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): _TENSOR,
    ("torch", "device"): lambda *a: "device",
    ("copyreg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): object, ("__builtin__", "object"): object,
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
    **{k: _record(k[1]) for k in (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                                  ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                                  ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                                  ("deepspeed.utils.tensor_fragment", "fragment_address"))},
}

_DCP = "torch.distributed.checkpoint"
#: DCP's ``.metadata``: its dataclasses as field records, torch's sizes and dtypes, and the paths and sets it holds
DCP_METADATA: Names = {
    **{(f"{_DCP}.metadata", c): _record(c, Fields) for c in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "MetadataIndex",
        "StorageMeta")},
    (f"{_DCP}.metadata", "TensorProperties"): _record("TensorProperties", _DCPProperties),
    (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"): int,
    (f"{_DCP}.filesystem", "_StorageInfo"): _record("_StorageInfo", Fields),
    ("torch.serialization", "_get_layout"): str,
    ("collections", "OrderedDict"): dict, ("torch", "Size"): tuple,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    **{(m, c): (lambda *parts: "/".join(str(p) for p in parts)) for m in ("pathlib", "pathlib._local")
       for c in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")},
    **{("torch", str(d).removeprefix("torch.")): d for d in _DTYPES},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves globals by exact (module, name) lookup in ``names`` only (module docstring)."""

    def __init__(self, file, names: Names, persistent_load: Callable | None = None):
        super().__init__(file)
        self._names = names
        self._persistent = persistent_load

    def find_class(self, module: str, name: str):
        try:
            return self._names[module, name]
        except (KeyError, TypeError):
            raise Refused(f"the global {module}.{name}") from None

    def persistent_load(self, pid):
        if self._persistent is None:
            raise Refused("a persistent id")
        return self._persistent(pid)


def check_opcodes(data: bytes) -> None:
    """Refuse a pickle over `MAX_PICKLE_BYTES`, using a `FORBIDDEN_OPCODES` opcode, or storing an object at a memo
    index beyond the objects stored so far (before unpickling it). The last: the C unpickler grows its memo to twice
    the index and zeroes it, so a 10-byte pickle whose LONG_BINPUT names index 1.5e9 takes 24 GB (it killed a test
    worker); a pickler numbers what it stores from 0, one by one."""
    if len(data) > MAX_PICKLE_BYTES:
        raise Refused(f"a pickle of {len(data)} bytes (at most {MAX_PICKLE_BYTES} are read)")
    stored = 0  # objects stored in the memo so far
    try:
        for op, arg, _pos in pickletools.genops(data):
            if op.name in FORBIDDEN_OPCODES:
                raise Refused(f"the pickle opcode {op.name}, which these files never use")
            if op.name in MEMO_PUTS:
                if arg is not None and arg > stored:
                    raise Refused(f"a memo index {arg} after {stored} stored objects")
                stored += 1
    except (ValueError, EOFError) as e:  # genops' word for a malformed pickle; the unpickler says it too
        raise pickle.UnpicklingError(f"a malformed pickle ({e})") from None


def loads(data: bytes, names: Names, persistent_load: Callable | None = None):
    """The object a pickle describes, built only of what ``names`` allows (module docstring); `Refused` for a
    pickle that names anything else, another UnpicklingError (or EOFError, ValueError …) for a damaged one."""
    check_opcodes(data)
    return RestrictedUnpickler(io.BytesIO(data), names, persistent_load).load()


def torch_storage(pid) -> Storage:
    """torch's persistent id of a storage, ('storage', storage type, key, location, numel), checked."""
    if not (isinstance(pid, tuple) and len(pid) == 5):
        raise Refused("a persistent id that is not a storage")
    kind, dtype, key, _location, _numel = pid
    if kind != "storage" or not isinstance(dtype, torch.dtype):
        raise Refused("a persistent id that is not a storage")
    return Storage(dtype, str(key))

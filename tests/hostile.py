"""The hostile corpus: checkpoint files an attacker (or a broken job) could leave on a shared cluster, in place of
every file the toolkit unpickles. Each case is a run directory, its base, the flags that make the toolkit reach the
file, and a marker path that a payload would create if anything in it ran.

    python tests/hostile.py OUT      # writes OUT/<case>/ and prints the case names (tests/test_hostile.py builds
                                     # the same cases in a temporary directory)

Payloads (`PICKLES`): a `__reduce__` of os.system and of builtins.exec; dotted globals (``os.system`` looked up
inside a module the readers allow, which pickle protocol 4 resolves) at every protocol 0–5, by GLOBAL and by
STACK_GLOBAL; objects built through BUILD, INST, OBJ, NEWOBJ_EX and an extension code. Archive-level cases
(`ARCHIVES`): a TorchScript archive whose ``__setstate__`` creates the marker (torch.load hands such a zip to
torch.jit.load), a legacy tar archive and a legacy plain pickle (torch.load's pre-1.6 paths), a zip bomb (a
deflated data.pkl of 80 MB of zeros), a zip whose header claims a 1 TB data.pkl, and an archive nested as the
data.pkl of another. File types (`PLACES`): pytorch_model.bin, a verl rank file, DCP .metadata, a DCP chunk,
DeepSpeed model states, DeepSpeed optimizer states (reached with --load-mode masters), a PEFT adapter's .bin.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import shutil
import struct
import sys
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from builders import LLAMA_CONFIG, llama_like, write_dir  # noqa: E402

DEEPSPEED = Path(__file__).resolve().parent / "data" / "deepspeed"


def _op_global(module: str, name: str, stack: bool) -> bytes:
    if stack:  # STACK_GLOBAL: module and name as two SHORT_BINUNICODE strings
        m, n = module.encode(), name.encode()
        return b"\x8c" + bytes([len(m)]) + m + b"\x8c" + bytes([len(n)]) + n + b"\x93"
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def pickles(marker: Path) -> dict[str, bytes]:
    """Payload pickles, each of which creates ``marker`` if it is run."""
    cmd = f"touch {marker}"
    code = f"open({str(marker)!r}, 'w').close()"
    out = {
        "reduce-os-system": b"\x80\x02" + _op_global("posix", "system", False) + _str(cmd) + b"\x85R.",
        "reduce-exec": b"\x80\x02" + _op_global("builtins", "exec", False) + _str(code) + b"\x85R.",
    }
    for proto in range(6):
        head = b"\x80" + bytes([proto]) if proto >= 2 else b""
        for module in ("torch.distributed.checkpoint.filesystem", "torch._utils"):
            for stack in ((False, True) if proto >= 4 else (False,)):
                arg = _str(cmd) if proto >= 1 else b"V" + cmd.encode() + b"\n"
                tup = b"\x85" if proto >= 2 else b"(" + arg + b"t"
                body = _op_global(module, "os.system", stack) + (arg + tup if proto >= 2 else tup) + b"R."
                out[f"dotted-p{proto}-{'stack' if stack else 'global'}-{module.split('.')[-1]}"] = head + body
    # BUILD: an allowed object whose state names os.system (torch's _rebuild_tensor_v2 result set up by BUILD)
    out["build"] = (b"\x80\x02" + _op_global("collections", "OrderedDict", False) + b")R" + b"}" +
                    _str("x") + _op_global("posix", "system", False) + _str(cmd) + b"\x85R" + b"sb.")
    out["inst"] = b"(" + b"V" + cmd.encode() + b"\n" + b"iposix\nsystem\n."
    out["obj"] = b"(" + _op_global("posix", "system", False) + b"V" + cmd.encode() + b"\no."
    out["newobj-ex"] = (b"\x80\x04" + _op_global("subprocess", "Popen", True) + _str("sh") + b"\x85" + b"}" +
                        _str("args") + _str(cmd) + b"s" + b"\x92.")
    out["ext1"] = b"\x80\x02\x82\x01" + _str(cmd) + b"\x85R."
    return out


def _zip(entries: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compress) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def archive_with(data_pkl: bytes, name: str = "archive") -> bytes:
    """A zip laid out as torch.save lays it out, its data.pkl replaced."""
    return _zip({f"{name}/data.pkl": data_pkl, f"{name}/byteorder": b"little", f"{name}/.format_version": b"1",
                 f"{name}/version": b"3\n"})


def torchscript(marker: Path) -> bytes:
    """A TorchScript archive whose __setstate__ creates the marker (torch.from_file with shared=True creates it)."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.path = str(marker)

        def forward(self, x):
            return x

        @torch.jit.export
        def __getstate__(self):
            return (self.path, self.training)

        @torch.jit.export
        def __setstate__(self, state: tuple[str, bool]):
            self.path = state[0]
            self.training = state[1]
            torch.from_file(self.path, True, 8)

    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(M()), buf)
    if marker.exists():  # scripting and saving must not run it
        marker.unlink()
    return buf.getvalue()


def _legacy_tar(payload: bytes) -> bytes:
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        for member, data in (("sys_info", pickle.dumps({"protocol_version": 1001, "little_endian": True,
                                                          "type_sizes": {}})), ("pickle", payload),
                             ("storages", pickle.dumps(0)), ("tensors", pickle.dumps(0))):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return tar.getvalue()


def _huge_header() -> bytes:
    huge = bytearray(archive_with(b"\x80\x02}."))
    # claim a 1 TB data.pkl in the central directory (compressed and uncompressed sizes) and the local header
    for sig in (b"PK\x01\x02", b"PK\x03\x04"):
        at = huge.find(sig)
        off = 20 if sig == b"PK\x01\x02" else 18
        huge[at + off:at + off + 8] = struct.pack("<II", 0xFFFFFFF0, 0xFFFFFFF0)
    return bytes(huge)


def archives(marker: Path) -> dict[str, Callable[[], bytes]]:
    """Whole files that are not torch.save zip archives of weights (each made when called)."""
    payload = pickles(marker)["reduce-os-system"]
    return {
        "torchscript": lambda: torchscript(marker),
        "legacy-tar": lambda: _legacy_tar(payload),
        # torch's legacy magic number, then the payload
        "legacy-pickle": lambda: b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19." + payload,
        "zip-bomb": lambda: _zip({"archive/data.pkl": b"\x80\x02}" + b"\x00" * (80 << 20) + b"."},
                                 zipfile.ZIP_DEFLATED),
        "huge-header": _huge_header,
        "nested-zip": lambda: archive_with(archive_with(payload)),
    }


# -- where each file type lives, and what reaches it ---------------------------------------------------------------


def _base(root: Path) -> Path:
    return write_dir(root / "base", llama_like())


def _bin(root: Path, data: bytes) -> tuple[Path, Path, list[str], str]:
    d = root / "run" / "checkpoint-1"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    (d / "pytorch_model.bin").write_bytes(data)
    return root / "run", _base(root), [], "pytorch_model.bin"


def _rank_file(root: Path, data: bytes):
    d = root / "run" / "global_step_1" / "actor"
    (d / "huggingface").mkdir(parents=True)
    (d / "huggingface" / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    (d / "model_world_size_1_rank_0.pt").write_bytes(data)
    return root / "run", _base(root), [], "model_world_size_1_rank_0.pt"


def _dcp_metadata(root: Path, data: bytes):
    d = root / "run" / "checkpoint-1" / "pytorch_model_fsdp_0"
    d.mkdir(parents=True)
    (d / ".metadata").write_bytes(data)
    return root / "run", _base(root), [], ".metadata"


def _dcp_chunk(root: Path, data: bytes):
    """A real DCP checkpoint (written by torch.distributed.checkpoint, one process) whose .metadata points every
    chunk at the hostile bytes."""
    import torch.distributed.checkpoint as dcp

    d = root / "run" / "checkpoint-1" / "pytorch_model_fsdp_0"
    dcp.save({"model": llama_like()}, checkpoint_id=str(d))
    md = pickle.loads((d / ".metadata").read_bytes())  # the test's own file, written just now
    for f in d.glob("*.distcp"):
        f.unlink()
    (d / "__0_0.distcp").write_bytes(data)
    md.storage_data = {k: dataclasses.replace(v, relative_path="__0_0.distcp", offset=0, length=len(data))
                       for k, v in md.storage_data.items()}
    (d / ".metadata").write_bytes(pickle.dumps(md))
    return root / "run", _base(root), [], "__0_0.distcp"


def _zero_model_states(root: Path, data: bytes):
    d = root / "run" / "global_step1"
    shutil.copytree(DEEPSPEED / "zero2" / "global_step1", d)
    (d / "mp_rank_00_model_states.pt").write_bytes(data)
    return root / "run", DEEPSPEED / "base", [], "mp_rank_00_model_states.pt"


def _zero_optim_states(root: Path, data: bytes):
    d = root / "run" / "global_step1"
    shutil.copytree(DEEPSPEED / "zero2" / "global_step1", d)
    name = "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    (d / name).write_bytes(data)
    return root / "run", DEEPSPEED / "base", ["--load-mode", "masters"], name


def _adapter_bin(root: Path, data: bytes):
    d = root / "run" / "checkpoint-1"
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                       "target_modules": ["q_proj"]}))
    (d / "adapter_model.bin").write_bytes(data)
    return root / "run", _base(root), [], "adapter_model.bin"


#: file type → (builder, whether the file is a torch.save zip archive (payload pickles are wrapped in one))
PLACES: dict[str, tuple[Callable, bool]] = {
    "bin": (_bin, True), "rank-file": (_rank_file, True), "dcp-metadata": (_dcp_metadata, False),
    "dcp-chunk": (_dcp_chunk, True), "zero-model-states": (_zero_model_states, True),
    "zero-optim-states": (_zero_optim_states, True), "adapter-bin": (_adapter_bin, True)}


@dataclasses.dataclass
class Case:
    name: str
    run: Path
    base: Path
    args: list[str]
    file: str  # the name the refusal must give
    marker: Path


def case_names() -> list[tuple[str, str]]:
    """(place, payload) of every case, without building anything."""
    marker = Path("/nonexistent")
    payloads = sorted(pickles(marker)) + list(archives(marker))
    return [(place, p) for place in PLACES for p in payloads]


def build(root: Path, place: str, payload: str) -> Case:
    """One case under ``root`` (a fresh directory)."""
    root.mkdir(parents=True, exist_ok=True)
    marker = root / "PWNED"
    make, is_archive = PLACES[place]
    pk = pickles(marker)
    data = (archive_with(pk[payload]) if is_archive else pk[payload]) if payload in pk else archives(marker)[payload]()
    run, base, args, file = make(root, data)
    return Case(f"{place}/{payload}", run, base, args, file, marker)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for place, payload in case_names():
        c = build(out / place / payload, place, payload)
        print(c.name, c.run, c.base, " ".join(c.args))

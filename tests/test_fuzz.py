"""Property-based fuzzing of what parses untrusted bytes: the safetensors header parser, the torch archive reader
with its restricted unpickler, and DCP's metadata unpickler. Whatever the bytes, the outcome is a parsed layout
that stays inside the file, or an InputError naming the file: never another exception, never anything run."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from opd_dynamics.errors import InputError
from opd_dynamics.io.model_dir import read_header
from opd_dynamics.io.safe_pickle import DCP_METADATA, DTENSOR, loads
from opd_dynamics.io.torch_files import archive_layout

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_SD = {"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b.bias": torch.ones(3, dtype=torch.bfloat16)}


def _safetensors_bytes() -> bytes:
    return save(_SD, metadata={"format": "pt"})


def _torch_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save(_SD, buf)
    return buf.getvalue()


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    b = bytearray(data)
    for at, value in edits:
        b[at % len(b)] = value
    return bytes(b[:cut] if cut is not None else b)


_EDITS = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=8)
_CUT = st.one_of(st.none(), st.integers(0, 4096))


def _check_safetensors(path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        entries, _meta, _raw = read_header(path)
    except InputError as e:
        assert str(path) in str(e)
        return
    spans = sorted((e.start, e.end) for e in entries.values())
    assert all(8 <= a <= b <= len(data) for a, b in spans)
    assert all(p[1] <= q[0] for p, q in zip(spans, spans[1:]))


@SETTINGS
@given(edits=_EDITS, cut=_CUT)
def test_a_damaged_safetensors_file_is_parsed_in_bounds_or_refused(tmp_path, edits, cut):
    _check_safetensors(tmp_path / "m.safetensors", _mutate(_safetensors_bytes(), edits, cut))


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2, 1 << 40) | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                  max_size=4), max_leaves=20)
_ENTRY = st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "I64", "X"]) | _JSON,
                                "shape": st.lists(st.integers(-1, 8), max_size=3) | _JSON,
                                "data_offsets": st.lists(st.integers(-1, 200), min_size=2, max_size=2) | _JSON})


@SETTINGS
@given(header=st.dictionaries(st.text(max_size=6), _ENTRY | _JSON, max_size=4), body=st.binary(max_size=256),
       declared=st.one_of(st.none(), st.integers(0, (1 << 64) - 1)))
def test_any_safetensors_header_is_parsed_in_bounds_or_refused(tmp_path, header, body, declared):
    raw = json.dumps(header).encode()
    n = len(raw) if declared is None else declared
    _check_safetensors(tmp_path / "m.safetensors", struct.pack("<Q", n) + raw + body)


@SETTINGS
@given(edits=_EDITS, cut=_CUT)
def test_a_damaged_torch_archive_is_located_in_bounds_or_refused(tmp_path, edits, cut):
    data = _mutate(_torch_bytes(), edits, cut)
    f = tmp_path / "pytorch_model.bin"
    f.write_bytes(data)
    try:
        tree = archive_layout(f, names=DTENSOR)
    except InputError as e:
        assert str(f) in str(e)
        return
    for t in (tree.values() if isinstance(tree, dict) else ()):
        if hasattr(t, "start"):
            assert 0 <= t.start and t.start + t.nbytes <= len(data)


def _data_pkl() -> bytes:
    with zipfile.ZipFile(io.BytesIO(_torch_bytes())) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


_ALLOWED_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError,
                   RecursionError, OverflowError, MemoryError, struct.error, UnicodeDecodeError)


@SETTINGS
@given(edits=_EDITS, cut=_CUT, extra=st.binary(max_size=64))
def test_the_restricted_unpicklers_raise_only_unpickling_errors(edits, cut, extra):
    """A damaged torch data.pkl, or random bytes, through each allow-list: an object of the stand-ins, or an
    error of the kinds the readers turn into one sentence."""
    for data in (_mutate(_data_pkl(), edits, cut) + extra, extra):
        for names in (DTENSOR, DCP_METADATA):
            try:
                loads(data, names, lambda pid: None)
            except _ALLOWED_ERRORS:
                pass

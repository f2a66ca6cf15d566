"""Reading real safetensors model directories in every layout, and refusing bad ones clearly."""

import json
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from opd_dynamics.errors import InputError
from opd_dynamics.io.formats import open_model
from opd_dynamics.io.model_dir import FdCache, ModelDir

from builders import llama_like, write_dir


@pytest.mark.parametrize("layout", ["single", "sharded", "noindex"])
@pytest.mark.parametrize("mode", ["pread", "mmap"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_every_layout_reads_back_bit_exact(tmp_path, layout, mode, dtype):
    sd = llama_like(dtype=dtype)
    m = open_model(write_dir(tmp_path / "m", sd, layout, n_shards=3), load_mode=mode)
    assert sorted(m.names()) == sorted(sd)
    assert len(m.files) == (1 if layout == "single" else 3)
    for name, t in sd.items():
        got = m.get(name)
        assert got.dtype == dtype and m.shape(name) == tuple(t.shape)
        assert torch.equal(got, t)
    assert m.nbytes() == sum(t.numel() * t.element_size() for t in sd.values())
    m.close()


def test_single_file_path_and_header_hash_is_stable(tmp_path):
    sd = llama_like()
    d = write_dir(tmp_path / "m", sd)
    a, b = ModelDir(d), ModelDir(d / "model.safetensors")
    assert a.header_sha256 == b.header_sha256 and a.config["model_type"] == "llama"


def test_non_float_tensors_are_readable(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    save_file({"ids": torch.arange(5), "w": torch.ones(2, 2)}, str(d / "model.safetensors"))
    assert torch.equal(ModelDir(d).get("ids"), torch.arange(5))


def test_fd_cache_is_bounded_and_closes_what_it_evicts(tmp_path):
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    cache = FdCache(capacity=3)
    files = []
    before = open_fds()
    for i in range(6):
        p = tmp_path / f"{i}.bin"
        p.write_bytes(b"x")
        files.append(p)
        cache.get(p, ())
    assert len(cache._fds) == 3 and list(cache._fds) == files[3:]
    assert open_fds() - before == 3  # evicted descriptors were closed
    cache.close(set(files))
    assert not cache._fds and open_fds() == before


def test_a_checkpoint_rewritten_at_the_same_path_is_read_afresh(tmp_path):
    """A directory deleted and written again: a new reader sees the new bytes (the descriptor cache once
    served the deleted file); an old reader refuses instead of mixing its header with the new data."""
    sd = llama_like()
    d = write_dir(tmp_path / "m", sd)
    name = "model.layers.0.mlp.up_proj.weight"
    old = ModelDir(d)
    assert torch.equal(old.get(name), sd[name])
    stamp = (d / "model.safetensors").stat().st_mtime_ns
    shutil.rmtree(d)
    sd2 = {k: v + 1 for k, v in sd.items()}
    write_dir(d, sd2)
    t = stamp + 10**9  # written a second later, as a real rewrite is (the inode number may be reused)
    os.utime(d / "model.safetensors", ns=(t, t))
    new = ModelDir(d)
    assert new.identity != old.identity and torch.equal(new.get(name), sd2[name])
    with pytest.raises(InputError, match="changed on disk after its header was read"):
        old.get(name)


def test_header_hash_is_the_sha256_of_the_header_bytes(tmp_path):
    import hashlib

    d = write_dir(tmp_path / "m", llama_like())
    raw = (d / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert ModelDir(d).header_sha256 == hashlib.sha256(raw[8:8 + n]).hexdigest()


def _bad(tmp_path, content: bytes, name="model.safetensors"):
    d = tmp_path / "bad"
    d.mkdir()
    (d / name).write_bytes(content)
    return d


@pytest.mark.parametrize("content,phrase", [
    (b"abc", "too short"),
    (struct.pack("<Q", 10**9) + b"{}", "corrupt or truncated"),
    (struct.pack("<Q", 5) + b"nope!", "not valid JSON"),
    (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
])
def test_corrupt_headers_name_the_file(tmp_path, content, phrase):
    d = _bad(tmp_path, content)
    with pytest.raises(InputError, match=phrase) as e:
        ModelDir(d)
    assert "model.safetensors" in str(e.value)


def _raw_file(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize("header,phrase", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, "corrupt safetensors header entry for 'a'"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "corrupt safetensors header entry for 'a'"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, "corrupt safetensors header entry"),
    ({"a": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}}, "spans 8 bytes, but shape \\[4, 4\\]"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "tensors 'a' and 'b' overlap"),
    ({"__metadata__": ["x"], "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "__metadata__"),
])
def test_inconsistent_headers_name_the_file(tmp_path, header, phrase):
    d = _bad(tmp_path, _raw_file(header, bytes(16)))
    for mode in ("pread", "mmap"):
        with pytest.raises(InputError, match=phrase) as e:
            ModelDir(d, load_mode=mode)
        assert "model.safetensors" in str(e.value)


def test_a_stale_index_is_refused_and_stray_safetensors_ignored(tmp_path):
    sd = llama_like()
    d = write_dir(tmp_path / "m", sd, "sharded", n_shards=2)
    index = d / "model.safetensors.index.json"
    meta = json.loads(index.read_text())
    meta["weight_map"]["model.layers.0.extra.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="lists 'model.layers.0.extra.weight' in model-00001-of-00002.safetensors, "
                                         "but no shard holds it"):
        ModelDir(d)
    n = write_dir(tmp_path / "n", sd, "noindex", n_shards=2)
    save_file({"exp_avg": torch.zeros(3)}, str(n / "optimizer.safetensors"))
    assert sorted(ModelDir(n).names()) == sorted(sd)


def test_truncated_data_is_reported(tmp_path):
    d = write_dir(tmp_path / "m", llama_like())
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(InputError, match="is truncated"):
        ModelDir(d)


def test_missing_empty_bin_and_fsdp_dirs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        ModelDir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="is empty"):
        ModelDir(tmp_path / "empty")
    d = _bad(tmp_path, b"\x80", "pytorch_model.bin")
    with pytest.raises(InputError, match="is not a zip-format torch file .a legacy pre-1.6 file, or damaged"):
        open_model(d)
    f = tmp_path / "fsdp"
    f.mkdir()
    (f / "model_world_size_2_rank_0.pt").write_bytes(b"x")
    with pytest.raises(InputError, match="lacks rank file.s. model_world_size_2_rank_1.pt"):
        open_model(f)
    z = tmp_path / "zero"
    z.mkdir()
    (z / "mp_rank_00_model_states.pt").write_bytes(b"x")
    with pytest.raises(InputError, match="mp_rank_00_model_states.pt: is not a zip-format torch file"):
        open_model(z)


def test_index_listing_missing_shard(tmp_path):
    d = write_dir(tmp_path / "m", llama_like(), "sharded", n_shards=2)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InputError, match="missing"):
        ModelDir(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"nothing": 1}))
    with pytest.raises(InputError, match="weight_map"):
        ModelDir(d)


@pytest.mark.parametrize("tied", [True, False])
def test_tied_names_of_a_model_transformers_saved(tmp_path, tied):
    """transformers saves a tied lm_head once (as the input embedding); the reader says which name it shares."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    m = ModelDir(tmp_path / "m")
    assert ("lm_head.weight" in m) is not tied
    assert m.tied_names() == ({"lm_head.weight": "model.embed_tokens.weight"} if tied else {})

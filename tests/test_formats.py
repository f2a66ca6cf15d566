"""Checkpoint formats real runs leave, read in place: pytorch_model.bin (single and index-sharded, torch.save as
transformers 4 wrote it), verl's FSDP2 rank files and accelerate's DCP folder (written by torch FSDP2 over two
spawned gloo processes). Every tensor equals the safetensors reading of the same weights bit for bit; a series
mixing formats against a safetensors base analyses to the same tables; bad input is one sentence."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pandas as pd
import pytest
import torch

from opd_dynamics.errors import InputError
from opd_dynamics.io.formats import open_model, reader_format
from opd_dynamics.io.series import CheckpointSeries

from builders import save_bin, tiny_llama, write_fsdp_step

pytestmark = pytest.mark.xdist_group("formats")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same two steps of one run in every format, and its base in safetensors."""
    root = tmp_path_factory.mktemp("formats")
    tiny_llama(0).save_pretrained(root / "base")
    for step in (3, 6):
        m = tiny_llama(step)
        m.save_pretrained(root / "st" / f"checkpoint-{step}")
        save_bin(m, root / "bin" / f"checkpoint-{step}", shards=1 if step == 3 else 3)
        write_fsdp_step(root, step)
    return root


def _equal_to_safetensors(reader_dir, st_dir):
    with open_model(st_dir) as ref, open_model(reader_dir) as r:
        assert sorted(r.names()) == sorted(ref.names())
        for n in ref.names():
            a, b = ref.get(n), r.get(n)
            assert a.dtype == b.dtype and torch.equal(a, b), n
            assert r.shape(n) == ref.shape(n) and r.stored_dtype(n) == ref.stored_dtype(n)
        assert r.config["model_type"] == "llama"


@pytest.mark.parametrize("fmt, where, step", [
    ("pytorch-bin", "bin/checkpoint-3", 3), ("pytorch-bin", "bin/checkpoint-6", 6),  # single; 3 shards + index
    ("fsdp-shards", "verl/global_step_6/actor", 6), ("dcp", "accelerate/checkpoint-6/pytorch_model_fsdp_0", 6)])
def test_every_tensor_equals_the_safetensors_reading(runs, fmt, where, step):
    assert reader_format(runs / where) == fmt
    _equal_to_safetensors(runs / where, runs / "st" / f"checkpoint-{step}")


def test_discovery_finds_verl_and_accelerate_layouts(runs):
    verl = CheckpointSeries.discover(runs / "verl", base=runs / "base")
    assert [(s, p.name) for s, p in verl.steps] == [(3, "actor"), (6, "actor")]
    acc = CheckpointSeries.discover(runs / "accelerate", base=runs / "base")
    assert [(s, p.name) for s, p in acc.steps] == [(3, "pytorch_model_fsdp_0"), (6, "pytorch_model_fsdp_0")]


def test_a_mixed_format_series_analyses_like_safetensors(runs):
    """Base in safetensors; step 3 a pytorch_model.bin, step 6 verl rank files; norms and spectra equal the
    all-safetensors series' to float rounding."""
    from opd_dynamics import analyze

    st = CheckpointSeries.discover(runs / "st", base=runs / "base", name="r")
    mixed = CheckpointSeries.from_list([(3, runs / "bin" / "checkpoint-3"), (6, runs / "verl" / "global_step_6" /
                                                                            "actor")], base=runs / "base", name="r")
    dcp = CheckpointSeries.discover(runs / "accelerate", base=runs / "base", name="r")
    ref = analyze(st, progress=False)
    for other in (mixed, dcp):
        rep = analyze(other, progress=False)
        for table, cols in (("module_allocation", ["update_norm", "base_norm", "energy_share"]),
                            ("spectrum", ["spectral_norm", "effective_rank", "energy_top1"])):
            a = ref[table].sort_values(["step", "tensor"]).reset_index(drop=True)
            b = rep[table].sort_values(["step", "tensor"]).reset_index(drop=True)
            assert list(a["tensor"]) == list(b["tensor"])
            pd.testing.assert_frame_equal(a[cols], b[cols], rtol=1e-12, atol=0)


def test_describe_prints_each_checkpoints_format(runs):
    from click.testing import CliRunner

    from opd_dynamics.cli import main

    r = CliRunner().invoke(main, ["describe", str(runs / "verl"), "--base", str(runs / "base")])
    assert r.exit_code == 0, r.output
    assert "(safetensors)" in r.output and "step 6: " in r.output and "(fsdp-shards)" in r.output


def test_bad_rank_files_are_one_sentence(runs, tmp_path):
    import shutil

    actor = runs / "verl" / "global_step_6" / "actor"
    one = tmp_path / "one"
    shutil.copytree(actor, one)
    (one / "model_world_size_2_rank_1.pt").unlink()
    with pytest.raises(InputError, match="lacks rank file.s. model_world_size_2_rank_1.pt of world size 2"):
        open_model(one)
    mixed = tmp_path / "mixed"
    shutil.copytree(actor, mixed)
    shutil.copy(actor / "model_world_size_2_rank_0.pt", mixed / "model_world_size_4_rank_0.pt")
    with pytest.raises(InputError, match="mixes rank files of world sizes 2, 4"):
        open_model(mixed)
    other = tmp_path / "other"
    shutil.copytree(actor, other)
    sd = torch.load(actor / "model_world_size_2_rank_1.pt", mmap=True, weights_only=True)
    sd.pop("lm_head.weight")
    torch.save(sd, other / "model_world_size_2_rank_1.pt")
    with pytest.raises(InputError, match="holds other tensors than model_world_size_2_rank_0.pt"):
        open_model(other)


def test_a_dcp_folder_missing_a_data_file_is_refused(runs, tmp_path):
    import shutil

    d = tmp_path / "dcp"
    shutil.copytree(runs / "accelerate" / "checkpoint-6" / "pytorch_model_fsdp_0", d)
    (d / "__1_0.distcp").unlink()
    with pytest.raises(InputError, match=r"names data files that are absent: __1_0.distcp"):
        open_model(d)


class Payload:  # not a weight: torch.save pickles it by reference
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickles_that_are_not_weights_are_refused_unrun(tmp_path, capsys):
    d = tmp_path / "evil"
    d.mkdir()
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "x": Payload()}, d / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"pytorch_model.bin: is not a weights file: it holds the global "
                                         r"__builtin__.print; refused unread"):
        open_model(d)
    assert "must never run" not in capsys.readouterr().out
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save({"w": torch.zeros(2)}, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(InputError, match="is not a zip-format torch file .a legacy pre-1.6 file, or damaged"):
        open_model(legacy)
    dcp = tmp_path / "dcp"
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(InputError, match=r"metadata: is not DCP checkpoint metadata: it holds the global "
                                         r"builtins.print, which DCP"):
        open_model(dcp)
    assert "must never run" not in capsys.readouterr().out


def test_old_torch_is_refused_before_unpickling(tmp_path, monkeypatch):
    from opd_dynamics.io import torch_files

    d = save_bin(tiny_llama(0), tmp_path / "b")
    monkeypatch.setattr(torch_files, "_torch_version", lambda: (2, 5))
    with pytest.raises(InputError, match="reading one safely needs torch >= 2.6"):
        open_model(d)
    assert json.loads((d / "config.json").read_text())["model_type"] == "llama"


def test_extrapolate_and_effopd_read_any_format_and_write_safetensors(runs, tmp_path):
    """From verl rank files and from DCP: the same predicted weights, bit for bit, as from safetensors."""
    from opd_dynamics.effopd.offline import extrapolate_checkpoint
    from opd_dynamics.extrapolate import extrapolate

    outs = {}
    for name, run in (("st", runs / "st"), ("verl", runs / "verl"), ("dcp", runs / "accelerate")):
        s = CheckpointSeries.discover(run, base=runs / "base", name=name)
        outs[name] = extrapolate(s, 12, tmp_path / f"x-{name}", method="linear")
        steps = dict(s.steps)
        extrapolate_checkpoint(steps[3], steps[6], 2.0, tmp_path / f"e-{name}")
    for prefix in ("x", "e"):
        with open_model(tmp_path / f"{prefix}-st") as ref:
            assert reader_format(tmp_path / f"{prefix}-verl") == "safetensors"
            for other in ("verl", "dcp"):
                with open_model(tmp_path / f"{prefix}-{other}") as r:
                    assert sorted(r.names()) == sorted(ref.names())
                    assert all(torch.equal(r.get(n), ref.get(n)) for n in ref.names())


DS = __import__("pathlib").Path(__file__).parent / "data" / "deepspeed"  # written by DeepSpeed: data/make_deepspeed.py


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_masters_equal_deepspeeds_own_reconstruction(stage):
    """ZeRO-2 and ZeRO-3 checkpoints saved by DeepSpeed 0.19.8 on 2 CPU ranks: the fp32 masters rebuilt one
    tensor at a time equal `get_fp32_state_dict_from_zero_checkpoint`'s bit for bit; ZeRO-2's model-states
    weights equal the engine's bf16 module."""
    from safetensors.torch import load_file

    step = DS / f"zero{stage}" / "global_step1"
    assert reader_format(step) == "deepspeed-zero"
    ref = load_file(DS / f"zero{stage}" / "fp32_reference.safetensors")
    with open_model(step, "masters") as r:
        assert sorted(r.names()) == sorted(ref) and r.stored_dtype("lm_head.weight") == "F32"
        assert all(torch.equal(r.get(n), ref[n]) for n in ref)
    if stage == 2:
        module = load_file(DS / "zero2" / "module_reference.safetensors")
        with open_model(step) as r:
            assert r.stored_dtype("lm_head.weight") == "BF16"
            assert all(torch.equal(r.get(n), module[n]) for n in module)


def test_a_deepspeed_step_analyses_against_a_safetensors_base():
    from opd_dynamics import analyze

    s = CheckpointSeries.discover(DS / "zero3", base=DS / "base", load_mode="masters")
    assert s.steps == [(1, DS / "zero3" / "global_step1")]
    rep = analyze(s, progress=False)
    from safetensors.torch import load_file

    ref, base = load_file(DS / "zero3" / "fp32_reference.safetensors"), load_file(DS / "base" / "model.safetensors")
    a = rep.module_allocation.set_index("tensor")["update_norm"]
    for n in ("lm_head.weight", "model.layers.1.mlp.down_proj.weight"):
        assert a[n] == pytest.approx(float(torch.linalg.norm(ref[n].double() - base[n].double())), rel=1e-6)


def test_deepspeed_without_its_optimizer_files_cannot_give_masters(tmp_path):
    import shutil

    z = tmp_path / "global_step1"
    shutil.copytree(DS / "zero2" / "global_step1", z)
    for f in z.glob("*_optim_states.pt"):
        f.unlink()
    with pytest.raises(InputError, match="has no \\*_optim_states.pt files, which hold the fp32 master weights"):
        open_model(z, "masters")
    with open_model(z) as r:  # the model-states weights need no optimizer file
        assert r.stored_dtype("lm_head.weight") == "BF16"
    evil = tmp_path / "evil"
    shutil.copytree(DS / "zero2" / "global_step1", evil)
    torch.save({"optimizer_state_dict": Payload()}, evil / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(InputError, match=r"optim_states.pt: is not a DeepSpeed optimizer state: it holds "
                                         r"the global __builtin__.print; refused"):
        open_model(evil, "masters")


@pytest.mark.parametrize("where", ["bin/checkpoint-6", "verl/global_step_6/actor",
                                   "accelerate/checkpoint-6/pytorch_model_fsdp_0"])
def test_row_blocks_equal_the_safetensors_rows(runs, where):
    """The analysis reads big tensors in row blocks: every format serves them (the 67-row embedding in blocks of
    5, across FSDP's uneven 34/33 split)."""
    with open_model(runs / "st" / "checkpoint-6") as ref, open_model(runs / where) as r:
        for lo in range(0, 67, 5):
            assert torch.equal(r.get_rows("model.embed_tokens.weight", lo, lo + 5),
                               ref.get_rows("model.embed_tokens.weight", lo, lo + 5))


def test_hsdp_rank_files_with_a_compiled_prefix_read_one_replica(runs, tmp_path):
    """4 ranks as 2 replicas × 2 shards, keys under `_orig_mod.`: names lose the prefix, each tensor is the first
    replica's shards joined, equal to the safetensors reading."""
    from builders import hsdp_worker, spawn_gloo

    actor = tmp_path / "global_step_6" / "actor"
    (actor / "huggingface").mkdir(parents=True)
    tiny_llama(0).config.to_json_file(actor / "huggingface" / "config.json")
    spawn_gloo(hsdp_worker, (4, 6, str(actor)), 4)  # rank files are rewritten whole by a second try
    sd = torch.load(actor / "model_world_size_4_rank_0.pt", mmap=True, weights_only=True)
    key = "_orig_mod.model.embed_tokens.weight"
    assert len(sd[key].placements) == 2 and sd[key]._local_tensor.shape[0] == 34  # (Replicate, Shard(0)), 34 of 67
    _equal_to_safetensors(actor, runs / "st" / "checkpoint-6")
    with open_model(actor) as r:  # located by the layout unpickler, read by positioned reads
        assert r.load_mode == "pread"


def test_a_bin_whose_tensors_are_not_plain_is_read_through_the_mapping(tmp_path):
    """transformers saves contiguous tensors, read by byte range; a transposed view (strided) makes the whole file
    go through the mapped weights_only load, with the same values."""
    from opd_dynamics.io.torch_files import tensor_layout

    d = tmp_path / "m"
    d.mkdir()
    w = torch.arange(12.0).reshape(3, 4)
    torch.save({"a.weight": w, "b.weight": w.t()}, d / "pytorch_model.bin")
    assert tensor_layout(d / "pytorch_model.bin") is None
    with open_model(d) as r:
        assert torch.equal(r.get("b.weight"), w.t()) and torch.equal(r.get_rows("b.weight", 1, 3), w.t()[1:3])
    torch.save({"a.weight": w}, d / "pytorch_model.bin")
    assert set(tensor_layout(d / "pytorch_model.bin")) == {"a.weight"}
    with open_model(d) as r:
        assert torch.equal(r.get_rows("a.weight", 1, 2), w[1:2])


def _mapped_paths() -> str:
    maps = "/proc/self/maps"
    return open(maps).read() if __import__("os").path.exists(maps) else ""


def test_fsdp_dcp_and_zero_weights_are_read_by_positioned_reads_nothing_mapped(runs, monkeypatch):
    """The rank files' DTensors, the DCP chunks and the ZeRO model-states weights are located by the restricted
    layout unpickler and read with positioned reads: never the mapped load, no torch.load of a chunk, no file
    left mapped."""
    from opd_dynamics.io import deepspeed, fsdp_shards

    def refused(*a, **k):
        raise AssertionError("the mapped load was used")

    monkeypatch.setattr(fsdp_shards, "load_weights_file", refused)
    monkeypatch.setattr(deepspeed, "load_weights_file", refused)
    monkeypatch.setattr(torch, "load", refused)
    actor = runs / "verl" / "global_step_6" / "actor"
    acc = runs / "accelerate" / "checkpoint-6" / "pytorch_model_fsdp_0"
    for where, ref in ((actor, runs / "st" / "checkpoint-6"), (acc, runs / "st" / "checkpoint-6"),
                       ("tests/data/deepspeed/zero2/global_step1", None)):
        with open_model(where) as r:
            assert r.load_mode == "pread" or r.FORMAT != "fsdp-shards"
            got = {n: r.get(n) for n in r.names()}
            assert all(f.name not in _mapped_paths() for f in r.files), where
        if ref is not None:
            with open_model(ref) as st:
                assert all(torch.equal(got[n], st.get(n)) for n in st.names())


def _rewrite_pickle(src, dst, old: bytes, new: bytes) -> None:
    """A copy of a torch.save archive with bytes of its data.pkl replaced (a global swapped)."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):
                assert old in data
                data = data.replace(old, new)
            zout.writestr(info.filename, data)


def test_an_unknown_global_in_a_rank_file_is_refused_not_run(runs, tmp_path, capsys):
    """A real rank file whose pickle names a function the DTensor pickle does not (builtins.print where torch
    names torch.serialization._get_layout, called with 'torch.strided'): the allow-list refuses the file in one
    sentence, and print never runs."""
    import shutil

    actor = runs / "verl" / "global_step_6" / "actor"
    d = tmp_path / "actor"
    shutil.copytree(actor, d)
    f = d / "model_world_size_2_rank_1.pt"
    _rewrite_pickle(actor / f.name, f, b"ctorch.serialization\n_get_layout\n", b"cbuiltins\nprint\n")
    with pytest.raises(InputError, match="model_world_size_2_rank_1.pt: is not a weights file: it holds the global "
                                         "builtins.print; refused unread"):
        open_model(d)
    assert "torch.strided" not in capsys.readouterr().out


def test_rank_files_holding_parameters_and_strided_views(runs, tmp_path):
    """Rank files that also hold an nn.Parameter are read by positioned reads (the allow-list admits torch's
    parameter rebuilder); ones holding a strided view go through the mapped weights_only load (after the allow-list
    admitted their pickle), with the same values."""
    import torch.distributed.tensor  # noqa: F401 - to load the DTensors

    actor = runs / "verl" / "global_step_6" / "actor"
    for extra, mode in ((torch.nn.Parameter(torch.ones(3)), "pread"), (torch.ones(4, 3).t(), "mmap")):
        d = tmp_path / mode
        (d / "huggingface").mkdir(parents=True)
        (d / "huggingface" / "config.json").write_text((actor / "huggingface" / "config.json").read_text())
        for f in sorted(actor.glob("model_world_size_*.pt")):
            sd = torch.load(f, map_location="cpu", weights_only=True)
            torch.save({**sd, "extra.weight": extra}, d / f.name)
        with open_model(d) as r, open_model(actor) as ref:
            assert r.load_mode == mode and ref.load_mode == "pread"
            assert set(r.names()) == set(ref.names()) | {"extra.weight"}
            for n in ref.names():
                assert torch.equal(r.get(n), ref.get(n)), n
                assert torch.equal(r.get_rows(n, 30, 40), ref.get_rows(n, 30, 40)), n
            assert torch.equal(r.get("extra.weight"), extra.detach())
            if _mapped_paths() and mode == "mmap":  # (the check the positioned-read test makes is not vacuous)
                assert all(f.name in _mapped_paths() for f in r.files)


def test_a_dcp_chunk_the_layout_does_not_locate_is_loaded_from_its_bytes(runs, monkeypatch):
    """A chunk that is not one plain stored tensor is torch.load'ed (weights_only) from its byte range: the same
    values as the positioned reads."""
    from opd_dynamics.io import dcp

    d = runs / "accelerate" / "checkpoint-6" / "pytorch_model_fsdp_0"
    with open_model(d) as r:
        want = {n: r.get(n) for n in r.names()}
    monkeypatch.setattr(dcp, "archive_layout", lambda *a, **k: None)
    with open_model(d) as r:
        for n in r.names():
            assert torch.equal(r.get(n), want[n]) and torch.equal(r.get_rows(n, 30, 40), want[n][30:40]), n


def test_fsdp_and_dcp_are_read_without_importing_torch_distributed_tensor_or_checkpoint(runs):
    """The rank files' DTensors and the DCP metadata are read through inert stand-ins: neither
    torch.distributed.tensor nor torch.distributed.checkpoint is imported (0.5 to 0.7 s, and their code never
    runs on the files' contents)."""
    import subprocess
    import sys

    code = ("import sys\nfrom opd_dynamics.io.formats import open_model\n"
            "for d in sys.argv[1:]:\n"
            "    with open_model(d) as r:\n"
            "        [r.get(n) for n in r.names()]\n"
            "print(sorted(m for m in sys.modules if m.startswith(('torch.distributed.tensor', "
            "'torch.distributed.checkpoint'))))\n")
    out = subprocess.run([sys.executable, "-c", code, str(runs / "verl" / "global_step_6" / "actor"),
                          str(runs / "accelerate" / "checkpoint-6" / "pytorch_model_fsdp_0")],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_rank_files_sharded_along_columns_replicated_or_plain_read_by_byte_range(tmp_path):
    """DTensors placed Shard(1) (uneven), Replicate and Shard(0), and a plain tensor, in rank files written by
    2 gloo ranks: located by the layout unpickler and read by byte range, equal to the tensors distributed."""
    from builders import placements_tensors, placements_worker, spawn_gloo

    actor = tmp_path / "actor"
    actor.mkdir()
    spawn_gloo(placements_worker, (2, str(actor)), 2)
    want = placements_tensors()
    with open_model(actor) as r:
        assert r.load_mode == "pread" and sorted(r.names()) == sorted(want)
        for n, w in want.items():
            assert r.shape(n) == tuple(w.shape) and r.dtype(n) == w.dtype
            assert torch.equal(r.get(n), w), n
            assert torch.equal(r.get_rows(n, 1, 3), w[1:3]), n


def test_a_dcp_chunk_outside_its_tensor_is_refused_before_any_read(runs, tmp_path):
    """A .metadata whose chunk of a tensor lies outside the tensor's shape (a damaged or forged file) is one
    sentence naming the chunk, not a read outside the tensor's bytes."""
    import pickle
    import shutil

    import torch.distributed.checkpoint.metadata as dcpm

    d = tmp_path / "dcp"
    shutil.copytree(runs / "accelerate" / "checkpoint-6" / "pytorch_model_fsdp_0", d)
    md = pickle.loads((d / ".metadata").read_bytes())  # our own fixture, written by torch DCP
    key = "model.model.embed_tokens.weight"
    tm = md.state_dict_metadata[key]
    first = tm.chunks[0]
    bad = dcpm.ChunkStorageMetadata(offsets=torch.Size([1000, 0]), sizes=first.sizes)
    md.state_dict_metadata[key] = dataclasses.replace(tm, chunks=[bad, *tm.chunks[1:]])
    for idx in [i for i in md.storage_data if i.fqn == key and tuple(i.offset) == tuple(first.offsets)]:
        md.storage_data[dataclasses.replace(idx, offset=torch.Size([1000, 0]))] = md.storage_data.pop(idx)
    (d / ".metadata").write_bytes(pickle.dumps(md))
    with open_model(d) as r, pytest.raises(InputError, match=r"lists a chunk of 'model.model.embed_tokens.weight' "
                                                             r"at \(1000, 0\) of size .* outside its shape \(67, 32\)"):
        r.get("model.embed_tokens.weight")

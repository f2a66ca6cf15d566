"""Checkpoints from a shared cluster are untrusted: nothing in them runs, every step is read from the one format the
user means, and any format can be the base (issue 26, items 1, 2, 4, 5; the hostile corpus is test_hostile.py)."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from opd_dynamics.cli import main

from builders import LLAMA_CONFIG, llama_like, perturb, write_dir


def _bin_dir(path, sd):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    torch.save(sd, path / "pytorch_model.bin")
    return path


def _run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


@pytest.fixture()
def run(tmp_path):
    sd0 = llama_like()
    write_dir(tmp_path / "base", sd0)
    _bin_dir(tmp_path / "base_bin", sd0)
    for step in (1, 2):
        write_dir(tmp_path / "run" / f"checkpoint-{step}", perturb(sd0, 1e-3 * step, step))
    return tmp_path


def test_a_step_directory_holding_two_formats_is_refused_naming_both(run):
    """model.safetensors of step 2 beside another step's pytorch_model.bin: which one is step 2 cannot be told
    from the files, so the directory is refused (it was read silently from the safetensors); --prefer-format
    picks one."""
    other = perturb(llama_like(), 5e-3, 9)
    torch.save(other, run / "run" / "checkpoint-2" / "pytorch_model.bin")
    code, out = _run("describe", run / "run", "--base", run / "base")
    assert code == 2, out
    assert out.strip().splitlines()[-1] == (
        f"error: {run / 'run' / 'checkpoint-2'}: holds weights in 2 formats (safetensors and pytorch-bin), which "
        "may be different steps or runs; pass --prefer-format to say which to read")
    for fmt, want in (("pytorch-bin", other), ("safetensors", None)):
        out_dir = run / f"out-{fmt}"
        code, out = _run("analyze", run / "run", "--base", run / "base", "--prefer-format", fmt, "--out", out_dir,
                         "--no-trajectory")
        assert code == 0, out
        norms = pd.read_csv(out_dir / "module_allocation.csv").set_index(["step", "tensor"])["update_norm"]
        name = "model.layers.1.mlp.down_proj.weight"
        w = want if want is not None else perturb(llama_like(), 2e-3, 2)
        ref = torch.linalg.norm(w[name].double() - llama_like()[name].double()).item()
        assert norms[2, name] == pytest.approx(ref, rel=1e-6)


def test_a_base_in_any_format_gives_the_same_tables(run):
    """A pytorch_model.bin base was refused as 'a LoRA adapter'; any reader can be the base."""
    tables = {}
    for name in ("base", "base_bin"):
        code, out = _run("analyze", run / "run", "--base", run / name, "--out", run / f"out-{name}")
        assert code == 0, out
        df = pd.read_csv(run / f"out-{name}" / "module_allocation.csv")
        tables[name] = df.sort_values(["step", "tensor"]).reset_index(drop=True)
    num = tables["base"].select_dtypes("number").columns
    pd.testing.assert_frame_equal(tables["base"][num], tables["base_bin"][num])


def test_worker_processes_die_with_a_parent_killed_by_sigkill(tmp_path):
    """analyze --workers 2 killed with -9 (no cleanup runs): its worker processes (about 0.5 GB each on a real
    model) are killed by the kernel with it, instead of living on."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    sd0 = llama_like(n_layers=4, hidden=256, inter=512, vocab=64, kv=256)
    write_dir(tmp_path / "base", sd0)
    for step in (1, 2, 3, 4):
        write_dir(tmp_path / "run" / f"checkpoint-{step}", perturb(sd0, 1e-3 * step, step))
    cli = [sys.executable, "-c", "from opd_dynamics.cli import main; main()"]
    proc = subprocess.Popen([*cli, "analyze", str(tmp_path / "run"), "--base", str(tmp_path / "base"), "--out",
                             str(tmp_path / "out"), "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    workers: list[psutil.Process] = []
    deadline = time.monotonic() + 120
    while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
        workers = [c for c in parent.children() if "spawn_main" in " ".join(c.cmdline())]
        time.sleep(0.05)
    assert len(workers) == 2, "the workers never started"
    # killed at once: a worker still starting finds its parent gone when its initializer runs, and exits
    assert proc.poll() is None, "the analysis ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive, [p.pid for p in alive]


def test_a_refusal_quotes_torchs_first_sentence_whole_and_never_its_weights_only_false_advice(tmp_path):
    """torch's weights_only refusal runs on with advice to load with weights_only=False: a refusal quotes only its
    first sentence, whole (it was cut at 160 characters, mid-sentence, advice included)."""
    import pickle

    from opd_dynamics.io.torch_files import first_sentence

    class Payload:
        def __reduce__(self):
            return (print, ("never",))

    torch.save({"x": Payload()}, tmp_path / "f.pt")
    with pytest.raises(pickle.UnpicklingError) as e:
        torch.load(tmp_path / "f.pt", weights_only=True)
    assert "weights_only=False" in str(e.value) or "weights_only" in str(e.value)
    said = first_sentence(e.value)
    assert said.endswith(".") and "weights_only=False" not in said and said in str(e.value)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/hostname", 7, ".."])
def test_an_index_naming_a_file_outside_its_directory_is_refused(run, shard):
    """A shard index is untrusted: a weight_map value with a directory part (or not a file name at all) would make
    the reader open a file outside the checkpoint (another run's weights, any file the user can read)."""
    import shutil

    d = run / "run" / "checkpoint-2"
    shutil.copy(d / "model.safetensors", run / "run" / "outside.safetensors")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": shard, "lm_head.weight": "model.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    code, out = _run("describe", run / "run", "--base", run / "base")
    assert code == 2, out
    assert out.strip().splitlines()[-1] == (
        f"error: {d / 'model.safetensors.index.json'}: lists a shard {shard!r} outside its directory; only plain "
        f"file names in {d} are read")


def test_dcp_metadata_naming_a_data_file_outside_its_directory_is_refused(tmp_path):
    import pickle

    from hostile import _dcp_chunk

    run_dir, base, _, _ = _dcp_chunk(tmp_path, b"\0" * 16)
    d = run_dir / "checkpoint-1" / "pytorch_model_fsdp_0"
    md = pickle.loads((d / ".metadata").read_bytes())  # the test's own file
    import dataclasses

    md.storage_data = {k: dataclasses.replace(v, relative_path="../../../base/model.safetensors")
                       for k, v in md.storage_data.items()}
    (d / ".metadata").write_bytes(pickle.dumps(md))
    code, out = _run("describe", run_dir, "--base", base)
    assert code == 2, out
    assert "lists a data file '../../../base/model.safetensors' outside its directory" in out


@pytest.mark.parametrize("index, opcode", [(0x60000000, b"r"), (200, b"q"), (1, b"p")])
def test_a_memo_index_beyond_the_stored_objects_is_refused_before_any_memory_is_taken(tmp_path, index, opcode):
    """The C unpickler grows its memo to twice a PUT's index and zeroes it: a 10-byte data.pkl storing at index
    1.6e9 took 24 GB and the OOM killer ended a test worker. A pickler numbers what it stores from 0, so an index
    past the objects stored so far is refused, with the file named, before the unpickler runs; index 0 is kept."""
    import resource
    import struct

    from hostile import archive_with

    from opd_dynamics.errors import InputError
    from opd_dynamics.io.torch_files import archive_layout

    def put(i: int) -> bytes:  # LONG_BINPUT, BINPUT or PUT of the dict on the stack at index i
        arg = {b"r": lambda: struct.pack("<I", i), b"q": lambda: bytes([i]), b"p": lambda: b"%d\n" % i}[opcode]
        return opcode + arg()

    f = tmp_path / "pytorch_model.bin"
    f.write_bytes(archive_with(b"\x80\x02}" + put(index) + b"."))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InputError, match=rf"pytorch_model.bin: is not a weights file: it holds a memo index {index} "
                                         r"after 0 stored objects; refused unread"):
        archive_layout(f)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 << 10  # KB: no memo was grown
    f.write_bytes(archive_with(b"\x80\x02}" + put(0) + b"."))
    assert archive_layout(f) == {}

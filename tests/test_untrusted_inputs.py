"""Checkpoints from a shared cluster are untrusted: nothing in them runs, every step is read from the one format the
user means, and any format can be the base (issue 26, items 1, 2, 4, 5; the hostile corpus is test_hostile.py)."""

from __future__ import annotations

import json

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

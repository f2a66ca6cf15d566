"""The reading settings (issue 30): --read (how bytes are read) and --weights (which weights of a DeepSpeed
checkpoint), carried by the series; the deprecated --load-mode maps onto them with a warning."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from opd_dynamics.cli import main
from opd_dynamics.errors import InputError
from opd_dynamics.io.series import CheckpointSeries

from builders import llama_like, perturb, write_dir

DS = Path(__file__).parent / "data" / "deepspeed"  # written by DeepSpeed: data/make_deepspeed.py


def _analyze(tmp_path: Path, name: str, run: Path, base: Path, *args: str) -> dict[str, pd.DataFrame]:
    out = tmp_path / name
    res = CliRunner().invoke(main, ["analyze", str(run), "--base", str(base), "--out", str(out), "--quiet",
                                    *args])
    assert res.exit_code == 0, res.output
    return {p.name: pd.read_csv(p) for p in sorted(out.glob("*.csv"))}


def _same_tables(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        pd.testing.assert_frame_equal(a[k], b[k], check_exact=True, obj=k)


@pytest.fixture(scope="module")
def st_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("st")
    sd = llama_like(n_layers=1)
    write_dir(root / "base", sd)
    for s in (1, 2):
        write_dir(root / "run" / f"checkpoint-{s}", perturb(sd, 0.01 * s, s), "sharded", n_shards=2)
    return root / "run", root / "base"


def test_read_mmap_gives_the_numbers_pread_gives(st_run, tmp_path):
    run, base = st_run
    pread = _analyze(tmp_path, "pread", run, base)
    mmap = _analyze(tmp_path, "mmap", run, base, "--read", "mmap")
    _same_tables(pread, mmap)
    assert CheckpointSeries.discover(run, base=base, read="mmap").open_step(1).read == "mmap"


def test_weights_masters_equals_the_old_load_mode_masters(tmp_path):
    new = _analyze(tmp_path, "new", DS / "zero2", DS / "base", "--weights", "masters")
    with pytest.warns(DeprecationWarning, match="--load-mode is deprecated"):
        old = _analyze(tmp_path, "old", DS / "zero2", DS / "base", "--load-mode", "masters")
    _same_tables(new, old)
    model = _analyze(tmp_path, "model", DS / "zero2", DS / "base")  # the bf16 model states: other numbers
    assert not new["module_allocation.csv"]["update_norm"].equals(model["module_allocation.csv"]["update_norm"])
    s = CheckpointSeries.discover(DS / "zero2", base=DS / "base", weights="masters")
    with s.open_step(1) as r:
        assert r.masters and r.stored_dtype("lm_head.weight") == "F32"


def test_the_load_mode_alias_warns_in_one_sentence(st_run, tmp_path):
    run, base = st_run
    with pytest.warns(DeprecationWarning, match="use --read mmap"):
        res = CliRunner().invoke(main, ["describe", str(run), "--base", str(base), "--load-mode", "mmap"])
    assert res.exit_code == 0, res.output
    said = [x for x in res.output.splitlines() if "--load-mode" in x]
    assert said == ["warning: --load-mode is deprecated and goes in the next release: use --read mmap"]
    with pytest.warns(DeprecationWarning, match="weights='masters'"):
        s = CheckpointSeries.discover(DS / "zero2", base=DS / "base", load_mode="masters")
    assert (s.read, s.weights) == ("pread", "masters")
    with pytest.warns(DeprecationWarning, match="read='mmap'"):
        assert CheckpointSeries.discover(run, base=base, load_mode="mmap").read == "mmap"


@pytest.mark.parametrize("flag, value", [("--read", "masters"), ("--weights", "fp32"), ("--load-mode", "fast")])
def test_a_bad_value_is_one_sentence_naming_the_option(st_run, flag, value):
    run, base = st_run
    res = CliRunner().invoke(main, ["describe", str(run), "--base", str(base), flag, value])
    assert res.exit_code == 2
    (line,) = [x for x in res.output.splitlines() if x.startswith("Error")]
    assert f"Invalid value for '{flag}': '{value}' is not one of" in line


def test_a_bad_setting_in_the_library_names_it(st_run):
    from opd_dynamics.cli.kit import cli_message

    run, base = st_run
    for kw, flag in ((dict(read="fast"), "--read"), (dict(weights="fp32"), "--weights")):
        with pytest.raises(InputError) as e:
            CheckpointSeries.discover(run, base=base, **kw)
        assert str(e.value).count(".") <= 1 and cli_message(e.value).startswith(f"{flag} ")


def test_weights_masters_prefers_the_zero_folder_over_the_hf_export(tmp_path):
    """OpenRLHF saves global_stepN (ZeRO) beside global_stepN_hf: the export for the model weights, the ZeRO folder
    for the masters (only it holds them); --prefer-format says which whatever the weights."""
    run = tmp_path / "ckpt"
    shutil.copytree(DS / "zero2" / "global_step1", run / "global_step1")
    shutil.copytree(DS / "base", run / "global_step1_hf")
    assert CheckpointSeries.discover(run, base=DS / "base").steps == [(1, run / "global_step1_hf")]
    assert CheckpointSeries.discover(run, base=DS / "base", weights="masters").steps == [(1, run / "global_step1")]
    assert CheckpointSeries.discover(run, base=DS / "base", prefer_format="deepspeed-zero").steps == \
        [(1, run / "global_step1")]

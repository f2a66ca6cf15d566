"""A tensor that cannot be read at some step is not a quiet gap: the analysis writes what it could, keeps the
tensor's good steps, and exits non-zero naming the tensor and step (--keep-going: exit 0, recorded in run.json).
Non-finite weights are a warning in run.json and on stderr. (Real damaged files of each format: test_formats.)"""

import json

import pytest
import torch
from click.testing import CliRunner

from opd_dynamics.analysis.api import analyze
from opd_dynamics.cli import main
from opd_dynamics.errors import InputError
from opd_dynamics.io.model_dir import ModelDir
from opd_dynamics.io.series import CheckpointSeries

from builders import llama_like, perturb, write_dir

UP = "model.layers.0.mlp.up_proj.weight"
Q = "model.layers.0.self_attn.q_proj.weight"


def _series(tmp_path, steps=(1, 2, 4), edit=None):
    sd = llama_like(n_layers=1)
    write_dir(tmp_path / "base", sd)
    for s in steps:
        st = perturb(sd, 0.01 * s, seed=s)
        if edit is not None:
            edit(s, st)
        write_dir(tmp_path / "run" / f"checkpoint-{s}", st)
    return CheckpointSeries.discover(tmp_path / "run", base=tmp_path / "base", name="opd")


def _fail_reading(monkeypatch, where, name):
    """Reading ``name`` from the checkpoint at ``where`` raises what a damaged file raises (a truncated DCP chunk,
    a shard that does not join): the analysis is tested against every reader's failure at once."""
    real = ModelDir.get_rows

    def get_rows(self, n, start=None, stop=None):
        if n == name and self.path == where:
            raise InputError(self.path, f"is truncated: {n!r} needs bytes 100…200")
        return real(self, n, start, stop)

    monkeypatch.setattr(ModelDir, "get_rows", get_rows)


def test_a_tensor_failing_at_one_step_keeps_its_other_steps_and_fails_the_run(tmp_path, monkeypatch):
    series = _series(tmp_path)
    bad = tmp_path / "run" / "checkpoint-2"
    _fail_reading(monkeypatch, bad, UP)
    out = tmp_path / "out"
    with pytest.raises(InputError) as e:
        analyze(series, out=out, progress=False)
    assert str(e.value) == (
        f"tensor {UP!r} of run 'opd' could not be read at step 2 ({bad}: is truncated: {UP!r} needs bytes 100…200); "
        f"the other tensors and steps were written to {out} (run.json lists what failed); pass keep_going=True to "
        "accept the gap")
    assert e.value.params == ("keep_going",)
    meta = json.loads((out / "run.json").read_text())
    assert meta["failed"] == [{"run": "opd", "tensor": UP, "step": 2,
                               "reason": f"{bad}: is truncated: {UP!r} needs bytes 100…200"}]
    import pandas as pd

    alloc = pd.read_csv(out / "module_allocation.csv")
    assert sorted(alloc.loc[alloc["tensor"] == UP, "step"]) == [1, 4]  # its good steps are kept
    assert sorted(alloc.loc[alloc["tensor"] == Q, "step"]) == [1, 2, 4]
    spec = pd.read_csv(out / "spectrum.csv")
    assert sorted(spec.loc[spec["tensor"] == UP, "step"]) == [1, 4]
    align = pd.read_csv(out / "alignment.csv")
    assert set(align.loc[align["tensor"] == UP, "ref_step"]) == {4}
    seg = pd.read_csv(out / "segments.csv")
    assert sorted(seg.loc[seg["tensor"] == UP, "step"]) == [1, 4]  # the trajectory over the steps read


def test_keep_going_records_the_gap_and_exits_zero(tmp_path, monkeypatch):
    series = _series(tmp_path)
    _fail_reading(monkeypatch, tmp_path / "run" / "checkpoint-2", UP)
    rep = analyze(series, out=tmp_path / "out", progress=False, keep_going=True)
    assert [(f["tensor"], f["step"]) for f in rep.meta["failed"]] == [(UP, 2)]
    a = rep.module_allocation
    assert sorted(a.loc[a["tensor"] == UP, "step"]) == [1, 4]


def test_the_reference_step_failing_leaves_the_tensor_without_alignment(tmp_path, monkeypatch):
    series = _series(tmp_path)
    _fail_reading(monkeypatch, tmp_path / "run" / "checkpoint-4", UP)
    rep = analyze(series, progress=False, keep_going=True)
    assert [(f["tensor"], f["step"]) for f in rep.meta["failed"]] == [(UP, 4)]
    assert "no alignment" in rep.meta["failed"][0]["reason"]
    assert UP not in set(rep.alignment["tensor"]) and Q in set(rep.alignment["tensor"])
    a = rep.module_allocation
    assert sorted(a.loc[a["tensor"] == UP, "step"]) == [1, 2]


def test_a_tensor_failing_at_many_steps_is_one_sentence(tmp_path, monkeypatch):
    series = _series(tmp_path)
    real = ModelDir.get_rows

    def get_rows(self, n, start=None, stop=None):
        if n in (UP, Q) and self.path != tmp_path / "base":
            raise InputError(self.path, "is truncated")
        return real(self, n, start, stop)

    monkeypatch.setattr(ModelDir, "get_rows", get_rows)
    with pytest.raises(InputError) as e:
        analyze(series, out=tmp_path / "out", progress=False)
    text = str(e.value)
    assert text.startswith(f"2 tensors of run 'opd' failed: {UP!r} at steps 1, 2, 4 "
                           f"({tmp_path / 'run' / 'checkpoint-1'}: is truncated), {Q!r} at steps 1, 2, 4 (")
    assert text.count(". ") == 0 and text.endswith("pass keep_going=True to accept the gaps")
    meta = json.loads((tmp_path / "out" / "run.json").read_text())
    assert sorted((f["tensor"], f["step"]) for f in meta["failed"]) == [(UP, 1), (UP, 2), (UP, 4), (Q, 1), (Q, 2),
                                                                        (Q, 4)]


def test_the_command_exits_2_naming_the_tensor_or_0_with_keep_going(tmp_path, monkeypatch):
    _series(tmp_path)
    _fail_reading(monkeypatch, tmp_path / "run" / "checkpoint-2", UP)
    args = ["analyze", str(tmp_path / "run"), "--base", str(tmp_path / "base"), "--quiet"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "o1")])
    assert r.exit_code == 2, r.output
    assert f"error: tensor {UP!r} of run 'run' could not be read at step 2" in r.output
    assert r.output.rstrip().endswith("pass --keep-going to accept the gap")
    assert (tmp_path / "o1" / "run.json").exists()
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "o2"), "--keep-going"])
    assert r.exit_code == 0, r.output
    assert f"0 skipped tensors, 1 failure: see {tmp_path / 'o2' / 'run.json'}" in r.output


def test_a_base_that_fails_to_read_fails_the_tensor_at_every_step(tmp_path, monkeypatch):
    series = _series(tmp_path)
    _fail_reading(monkeypatch, tmp_path / "base", UP)
    with pytest.raises(InputError, match=rf"^tensor {UP!r} of run 'opd' could not be analysed "
                                         rf"\({tmp_path / 'base'}: is truncated"):
        analyze(series, progress=False)
    rep = analyze(series, progress=False, keep_going=True)
    assert rep.meta["failed"] == [{"run": "opd", "tensor": UP, "step": None,
                                   "reason": f"{tmp_path / 'base'}: is truncated: {UP!r} needs bytes 100…200"}]


def test_a_failed_tensor_is_not_served_from_the_resume_cache(tmp_path, monkeypatch):
    """The good steps of a failed tensor are not cached as its result: rerun once the file is repaired, the
    tensor is read again at every step."""
    series = _series(tmp_path)
    _fail_reading(monkeypatch, tmp_path / "run" / "checkpoint-2", UP)
    from opd_dynamics.analysis import caches

    put = []
    monkeypatch.setattr(caches.ResultCache, "put", lambda self, key, tables: put.append(tables))
    analyze(series, out=tmp_path / "out", progress=False, keep_going=True)
    assert put and all(UP not in {r["tensor"] for r in t["module_allocation"]} for t in put)


def test_non_finite_steps_are_a_warning_in_run_json_and_on_stderr(tmp_path):
    def edit(s, st):
        if s == 2:
            st[UP][3, 4] = float("nan")
            st[Q][0, 0] = float("inf")

    series = _series(tmp_path, edit=edit)
    with pytest.warns(UserWarning) as w:
        rep = analyze(series, out=tmp_path / "out", progress=False)
    want = (f"run 'opd', step 2: NaN or Inf in 2 tensors ({UP!r}, {Q!r}), whose rows have finite=False and NaN "
            "spectra, energy shares and trajectories")
    assert [str(x.message) for x in w] == [want]
    assert rep.meta["warnings"] == [want] and rep.meta["failed"] == []
    assert json.loads((tmp_path / "out" / "run.json").read_text())["warnings"] == [want]
    r = CliRunner().invoke(main, ["analyze", str(tmp_path / "run"), "--base", str(tmp_path / "base"), "--quiet",
                                  "--out", str(tmp_path / "o2")])
    assert r.exit_code == 0, r.output
    assert r.stderr == "warning: " + want.replace("'opd'", "'run'") + "\n"


def test_a_non_finite_base_is_one_warning_not_one_per_step(tmp_path):
    sd = llama_like(n_layers=1)
    bad = dict(sd)
    bad[UP] = sd[UP].clone()
    bad[UP][0, 0] = float("nan")
    write_dir(tmp_path / "base", bad)
    for s in (1, 2):
        write_dir(tmp_path / "run" / f"checkpoint-{s}", perturb(sd, 0.01 * s, seed=s))
    series = CheckpointSeries.discover(tmp_path / "run", base=tmp_path / "base", name="opd")
    with pytest.warns(UserWarning):
        rep = analyze(series, progress=False)
    assert rep.meta["warnings"] == [f"run 'opd': the base {tmp_path / 'base'} holds NaN or Inf in 1 tensor "
                                    f"({UP!r}), whose rows have finite=False at every step and NaN spectra, "
                                    "energy shares and trajectories"]


def test_finite_weights_raise_no_warning(tmp_path):
    import warnings

    series = _series(tmp_path, steps=(1, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = analyze(series, progress=False)
    assert rep.meta["warnings"] == [] and torch.tensor(rep.module_allocation["finite"].tolist()).all()


@pytest.mark.xdist_group("formats")  # gloo ranks, as test_formats'
def test_a_truncated_dcp_chunk_and_a_shard_that_does_not_fit_fail_their_step_only(tmp_path):
    """Files written by torch (DCP and FSDP2 rank files over two gloo ranks), then damaged: a DCP data file cut
    short, and a rank file whose DTensor shard lost a row. Step 3 (safetensors) keeps lm_head's rows; step 6 is
    named, and every other tensor of step 6 is analysed."""
    import shutil

    from builders import tiny_llama, write_fsdp_step

    tiny_llama(0).save_pretrained(tmp_path / "base")
    tiny_llama(3).save_pretrained(tmp_path / "st3")
    actor, ckpt = write_fsdp_step(tmp_path, 6)
    dcp = ckpt / "pytorch_model_fsdp_0"
    cut = tmp_path / "cut"
    shutil.copytree(dcp, cut)
    data = cut / "__1_0.distcp"  # rank 1's chunks; lm_head's is the last in the file
    data.write_bytes(data.read_bytes()[:-2000])
    rank1 = actor / "model_world_size_2_rank_1.pt"
    sd = torch.load(rank1, weights_only=False)  # our own fixture, written by FSDP2 above
    sd["lm_head.weight"]._local_tensor = sd["lm_head.weight"]._local_tensor[:-1].clone()
    torch.save(sd, rank1)
    for step6, why in ((cut, "is truncated"), (actor, "holds shards of 'lm_head.weight' that do not join")):
        series = CheckpointSeries.from_list([(3, tmp_path / "st3"), (6, step6)], base=tmp_path / "base", name="r")
        with pytest.raises(InputError, match=rf"^tensor 'lm_head.weight' of run 'r' could not be read at step 6 "
                                             rf"\({step6}.*{why}"):
            analyze(series, progress=False)
        rep = analyze(series, progress=False, keep_going=True)
        assert [(f["tensor"], f["step"]) for f in rep.meta["failed"]] == [("lm_head.weight", 6)]
        a = rep.module_allocation
        assert list(a.loc[a["tensor"] == "lm_head.weight", "step"]) == [3]
        assert len(a[a["step"] == 6]) == len(a[a["step"] == 3]) - 1

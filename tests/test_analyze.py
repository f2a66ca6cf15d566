"""The full pass over real safetensors series: norms against a float64 reference in every layout,
Conv1D, resized vocabularies, LoRA adapters (made by PEFT), NaN weights, missing and mismatched tensors."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from opd_dynamics.analysis.api import analyze, describe
from opd_dynamics.analysis.report import Report
from opd_dynamics.errors import InputError
from opd_dynamics.io.series import CheckpointSeries

from builders import llama_like, perturb, write_dir
from reference import ref_geometry


def _ref_norms(w0: torch.Tensor, wt: torch.Tensor) -> dict:
    a, b = w0.double().numpy(), wt.double().numpy()
    d = b - a
    f = np.linalg.norm(d)
    thr = 1e-3 * np.maximum(np.abs(a), np.abs(b))
    return {"update_norm": f, "base_norm": np.linalg.norm(a), "relative_update": f / np.linalg.norm(a),
            "rms_update": f / math.sqrt(d.size), "changed_fraction": float((np.abs(d) > thr).mean())}


def _series(tmp_path, layout="sharded", dtype=torch.bfloat16, steps=(1, 2, 4), **kw):
    sd = llama_like(dtype=dtype, **kw)
    write_dir(tmp_path / "base", sd, layout, n_shards=3)
    states = {}
    for s in steps:
        states[s] = perturb(sd, 0.002 * s, seed=s)
        write_dir(tmp_path / "run" / f"checkpoint-{s}", states[s], layout, n_shards=2)
    return sd, states, CheckpointSeries.discover(tmp_path / "run", base=tmp_path / "base", name="opd")


@pytest.mark.parametrize("layout", ["single", "sharded", "noindex"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_norms_match_float64_reference(tmp_path, layout, dtype):
    sd, states, series = _series(tmp_path, layout, dtype)
    rep = analyze(series, svd="none", progress=False)
    a = rep.module_allocation
    assert len(a) == len(sd) * 3 and set(a["step"]) == {1, 2, 4}
    for _, row in a.iterrows():
        ref = _ref_norms(sd[row["tensor"]], states[row["step"]][row["tensor"]])
        for col, v in ref.items():
            assert row[col] == pytest.approx(v, rel=1e-5, abs=1e-12), (row["tensor"], col)
        assert row["finite"]
    shares = a.groupby("step")["energy_share"].sum()
    assert np.allclose(shares.values, 1.0, atol=1e-12)
    assert set(a["group"]) == {"attention", "mlp", "embedding", "lm_head", "norm"}
    assert a.loc[a["tensor"] == "model.layers.1.mlp.down_proj.weight", "layer"].iloc[0] == 1


def test_bf16_updates_are_not_lost_to_bf16_subtraction(tmp_path):
    """A float64 reference of bf16-stored weights: the float32 route is exact where bf16 arithmetic is not."""
    sd, states, series = _series(tmp_path, "single", torch.bfloat16, steps=(1,), n_layers=1)
    row = analyze(series, svd="none", progress=False).module_allocation.set_index("tensor").loc[
        "model.layers.0.mlp.up_proj.weight"]
    w0, w1 = sd["model.layers.0.mlp.up_proj.weight"], states[1]["model.layers.0.mlp.up_proj.weight"]
    exact = (w1.double() - w0.double()).norm().item()
    assert row["update_norm"] == pytest.approx(exact, rel=1e-6)


def test_gpt2_conv1d_is_transposed(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"transformer.h.0.attn.c_attn.weight": torch.randn(8, 24, generator=g),
            "transformer.h.0.mlp.c_fc.weight": torch.randn(8, 32, generator=g),
            "transformer.wte.weight": torch.randn(20, 8, generator=g)}
    u, v = torch.randn(24, 1, generator=g), torch.randn(8, 1, generator=g)
    step = dict(base)
    step["transformer.h.0.attn.c_attn.weight"] = base["transformer.h.0.attn.c_attn.weight"] + (u @ v.T).T
    step["transformer.h.0.mlp.c_fc.weight"] = base["transformer.h.0.mlp.c_fc.weight"] + 0.1
    cfg = {"model_type": "gpt2"}
    write_dir(tmp_path / "base", base, config=cfg)
    write_dir(tmp_path / "run" / "checkpoint-1", step, config=cfg)
    rep = analyze(CheckpointSeries.discover(tmp_path / "run", base=tmp_path / "base"), geometry=True,
                  progress=False, cache_dir=tmp_path / "cache")
    a = rep.module_allocation.set_index("tensor")
    assert a.loc["transformer.h.0.attn.c_attn.weight", "shape"] == "24x8"  # (out, in)
    s = rep.spectrum.set_index("tensor").loc["transformer.h.0.attn.c_attn.weight"]
    assert s["energy_top1"] == pytest.approx(1.0, abs=1e-9) and s["rank90"] == 1
    geo = rep.geometry.set_index("tensor").loc["transformer.h.0.mlp.c_fc.weight"]  # left and right sides differ
    w0, wt = base["transformer.h.0.mlp.c_fc.weight"], step["transformer.h.0.mlp.c_fc.weight"]
    for col, v in ref_geometry(w0.T.double().numpy(), wt.T.double().numpy()).items():
        assert geo[col] == pytest.approx(v, abs=1e-4, rel=1e-4), col


@pytest.mark.parametrize("name", ["nan", "NA", "1"])
def test_run_names_that_look_like_missing_values_or_numbers_come_back(tmp_path, name):
    from opd_dynamics.plotting import load_tables

    _, _, series = _series(tmp_path, "single", torch.float32, steps=(1,), n_layers=1)
    series = CheckpointSeries.from_list(series.steps, base=series.base, name=name)
    analyze(series, out=tmp_path / "out", svd="none", progress=False)
    for t in (Report.load(tmp_path / "out").tables, load_tables(tmp_path / "out").tables):
        assert list(t["module_allocation"]["run"].unique()) == [name]


def test_a_damaged_table_is_named_not_read_as_empty(tmp_path):
    _, _, series = _series(tmp_path, "single", torch.float32, steps=(1,), n_layers=1)
    analyze(series, out=tmp_path / "out", svd="none", progress=False)
    (tmp_path / "out" / "module_allocation.csv").write_text("garbage\n")
    with pytest.raises(InputError, match="module_allocation.csv: lacks the column"):
        Report.load(tmp_path / "out")


def test_overwrite_never_destroys_inputs_or_files(tmp_path):
    """--overwrite replaces an earlier analysis only: never an input, a directory holding one, or a file."""
    _, _, series = _series(tmp_path, "single", torch.float32, steps=(1, 2), n_layers=1)
    step1 = series.steps[0][1]
    for bad in (tmp_path, tmp_path / "run", step1, series.base, step1 / "inside"):
        with pytest.raises(InputError, match="overlaps the input"):
            analyze(series, out=bad, overwrite=True, svd="none", progress=False)
    assert (step1 / "model.safetensors").exists() and (series.base / "model.safetensors").exists()
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    with pytest.raises(InputError, match="is a file or a link"):
        analyze(series, out=f, overwrite=True, svd="none", progress=False)
    assert f.read_text() == "mine"
    out = tmp_path / "out"
    analyze(series, out=out, svd="none", progress=False)
    analyze(series, out=out, overwrite=True, svd="none", progress=False)  # an earlier analysis: replaced
    assert (out / "run.json").exists()


def test_resized_vocabulary_uses_common_rows_and_flags_them(tmp_path):
    sd = llama_like(n_layers=1, vocab=50)
    write_dir(tmp_path / "base", sd)
    st = perturb(sd, 0.01, 1)
    st["model.embed_tokens.weight"] = torch.cat([st["model.embed_tokens.weight"], torch.randn(6, 32)])
    st["lm_head.weight"] = torch.cat([st["lm_head.weight"], torch.randn(6, 32)])
    write_dir(tmp_path / "run" / "checkpoint-3", st)
    rep = analyze(CheckpointSeries.discover(tmp_path / "run", base=tmp_path / "base"), progress=False)
    a = rep.module_allocation.set_index("tensor")
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        assert bool(a.loc[n, "resized"]) and a.loc[n, "shape"] == "50x32"
        ref = _ref_norms(sd[n], st[n][:50])
        assert a.loc[n, "update_norm"] == pytest.approx(ref["update_norm"], rel=1e-5)
    e = rep.embedding.iloc[0]
    assert e["n_rows"] == 50 and bool(e["resized"])


def test_nan_weights_flagged_not_crashing(tmp_path):
    sd = llama_like(n_layers=1)
    write_dir(tmp_path / "base", sd)
    st = perturb(sd, 0.01, 1)
    st["model.layers.0.mlp.up_proj.weight"][3, 4] = float("nan")
    st["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("inf")
    write_dir(tmp_path / "run" / "checkpoint-1", st)
    rep = analyze(CheckpointSeries.discover(tmp_path / "run", base=tmp_path / "base"), progress=False)
    a = rep.module_allocation.set_index("tensor")
    assert not a.loc["model.layers.0.mlp.up_proj.weight", "finite"]
    assert not a.loc["model.layers.0.self_attn.q_proj.weight", "finite"]
    assert a.loc["model.layers.0.mlp.down_proj.weight", "finite"]
    assert rep.meta["failed"] == []


def test_missing_mismatched_and_non_float_tensors_are_listed(tmp_path):
    sd = llama_like(n_layers=1)
    sd["model.position_ids"] = torch.arange(10)
    write_dir(tmp_path / "base", sd)
    st = perturb({k: v for k, v in sd.items() if v.is_floating_point()}, 0.01, 1)
    st["model.position_ids"] = torch.arange(10)
    del st["model.layers.0.mlp.up_proj.weight"]
    st["model.layers.0.mlp.down_proj.weight"] = torch.zeros(32, 70)
    st["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 32)  # only in the checkpoint
    write_dir(tmp_path / "run" / "checkpoint-1", st)
    out = tmp_path / "out"
    rep = analyze(CheckpointSeries.discover(tmp_path / "run", base=tmp_path / "base"), out=out, progress=False)
    reasons = {s["tensor"]: s["reason"] for s in json.loads((out / "run.json").read_text())["skipped"]}
    assert "missing at step 1" in reasons["model.layers.0.mlp.up_proj.weight"]
    assert "shape mismatch" in reasons["model.layers.0.mlp.down_proj.weight"]
    assert "non-float" in reasons["model.position_ids"]
    assert "not in base" in reasons["model.layers.0.mlp.extra_proj.weight"]
    assert "model.layers.0.mlp.up_proj.weight" not in set(rep.module_allocation["tensor"])


def test_fp8_weights_their_scales_and_integer_steps_are_skipped_with_reasons(tmp_path):
    sd = llama_like(n_layers=1)
    q, up = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"
    fp8 = dict(sd)
    fp8[q] = sd[q].to(torch.float8_e4m3fn)
    fp8[q + "_scale_inv"] = torch.ones(1, 1)
    write_dir(tmp_path / "base", fp8)
    st = {k: v.clone() for k, v in fp8.items()}
    st[up] = (sd[up] * 100).to(torch.int8)
    write_dir(tmp_path / "run" / "checkpoint-1", st)
    out = tmp_path / "out"
    rep = analyze(CheckpointSeries.discover(tmp_path / "run", base=tmp_path / "base"), out=out, progress=False)
    reasons = {s["tensor"]: s["reason"] for s in json.loads((out / "run.json").read_text())["skipped"]}
    assert "FP8 codes" in reasons[q] and "scale of a quantised weight" in reasons[q + "_scale_inv"]
    assert reasons[up] == "I8 (the base has F32) at step 1"
    assert not {q, q + "_scale_inv", up} & set(rep.module_allocation["tensor"])


def test_a_problem_at_many_steps_is_named_once_with_its_steps(tmp_path):
    """A base of another width: one sentence per tensor, not one clause per step."""
    from opd_dynamics.analysis.deltas import steps_text

    assert steps_text([5]) == "step 5" and steps_text([1, 2, 3]) == "steps 1, 2, 3"
    assert steps_text(list(range(10, 101, 10))) == "steps 10, 20, …, 100 (10 steps)"
    write_dir(tmp_path / "base", {"model.layers.0.mlp.up_proj.weight": torch.ones(4, 8)})
    for t in range(1, 9):
        write_dir(tmp_path / "run" / f"checkpoint-{t}", {"model.layers.0.mlp.up_proj.weight": torch.ones(4, 6)})
    with pytest.raises(InputError) as e:
        analyze(CheckpointSeries.discover(tmp_path / "run", base=tmp_path / "base"), progress=False)
    assert str(e.value).endswith(
        "(1 skipped, e.g. shape mismatch: base [4, 8] vs [4, 6] at steps 1, 2, …, 8 (8 steps))")


def test_nothing_in_common_is_an_error(tmp_path):
    write_dir(tmp_path / "base", {"a.weight": torch.ones(2, 2)})
    write_dir(tmp_path / "run" / "checkpoint-1", {"b.weight": torch.ones(2, 2)})
    with pytest.raises(InputError, match="shares no analysable tensor"):
        analyze(CheckpointSeries.discover(tmp_path / "run", base=tmp_path / "base"), progress=False)


def test_output_is_refused_if_it_exists_and_resumes_from_partial(tmp_path):
    _, _, series = _series(tmp_path, "single", torch.float32, steps=(1, 2), n_layers=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        analyze(series, out=out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(InputError, match="was not written by opd-dynamics"):
        analyze(series, out=out, overwrite=True, progress=False)  # not ours to delete, even when asked
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    rep = analyze(series, out=out, overwrite=True, progress=False)  # an empty directory may be used
    assert (out / "module_allocation.csv").exists()
    loaded = Report.load(out)
    pd.testing.assert_frame_equal(loaded.spectrum.reset_index(drop=True), rep.spectrum.reset_index(drop=True),
                                  check_dtype=False, rtol=1e-12)
    assert sorted(loaded.tables) == sorted(rep.tables)
    # an interrupted run leaves .out2.partial/cache; the rerun takes every tensor from it
    out2 = tmp_path / "out2"
    cache = tmp_path / ".out2.partial" / "cache"
    calls = []
    from opd_dynamics.analysis import executors
    from opd_dynamics.analysis.options import AnalysisOptions
    from opd_dynamics.analysis.readers import make_plans
    real = executors.run_job
    executors.run_job = lambda job: calls.append(job.plan.name) or real(job)
    try:
        analyze(series, out=out2, progress=False)
        n_first = len(calls)
        # seed the cache as an interrupted run would have left it, then rerun into a fresh out
        import shutil
        shutil.rmtree(out2)
        executors.execute(make_plans([series]), AnalysisOptions(), resume_dir=cache, progress=False)
        calls.clear()
        analyze(series, out=out2, progress=False)
        assert n_first > 0 and calls == []
    finally:
        executors.run_job = real


def test_describe_is_a_dry_run(tmp_path):
    sd, _, series = _series(tmp_path, "sharded", torch.bfloat16, steps=(1, 2), n_layers=1)
    df = describe(series)
    assert set(df["tensor"]) == set(sd)
    row = df.set_index("tensor").loc["model.layers.0.mlp.up_proj.weight"]
    assert row["bytes_to_read"] == 64 * 32 * 2 * 3 and row["n_steps"] == 2 and row["dtype"] == "BF16"


def test_describe_counts_bytes_as_stored_when_steps_differ_in_dtype(tmp_path):
    sd = llama_like(n_layers=1, dtype=torch.bfloat16)
    write_dir(tmp_path / "base", sd)
    for s in (1, 2):
        write_dir(tmp_path / "run" / f"checkpoint-{s}", perturb({k: v.float() for k, v in sd.items()}, 0.01, s))
    df = describe(CheckpointSeries.discover(tmp_path / "run", base=tmp_path / "base")).set_index("tensor")
    assert df.loc["model.layers.0.mlp.up_proj.weight", "bytes_to_read"] == 64 * 32 * (2 + 4 + 4)


def test_resume_never_serves_rows_computed_under_other_naming(tmp_path):
    """The resume cache is keyed on the tensor as planned: a naming override changes the rows, so it misses."""
    from opd_dynamics.analysis.executors import execute
    from opd_dynamics.analysis.options import AnalysisOptions
    from opd_dynamics.analysis.readers import make_plans

    _, _, series = _series(tmp_path, "single", torch.float32, steps=(1,), n_layers=1)
    cache, q = tmp_path / "cache", "model.layers.0.self_attn.q_proj.weight"
    execute(make_plans([series]), AnalysisOptions(svd="none"), resume_dir=cache, progress=False)
    ov = {r"q_proj": {"group": "mlp", "layer": 7}}
    res = execute(make_plans([series], overrides=ov), AnalysisOptions(svd="none"), resume_dir=cache, progress=False)
    row = next(r for x in res if x.tensor == q for r in x.tables["module_allocation"])
    assert (row["group"], row["layer"]) == ("mlp", 7)


def test_an_interrupted_runs_tables_do_not_leak_into_the_next_output(tmp_path):
    _, _, series = _series(tmp_path, "single", torch.float32, steps=(1,), n_layers=1)
    partial = tmp_path / ".out.partial"
    partial.mkdir()
    (partial / "geometry.csv").write_text("run,step,tensor\nold,1,x\n")  # left by an earlier run
    analyze(series, out=tmp_path / "out", svd="none", progress=False)
    assert not (tmp_path / "out" / "geometry.csv").exists() and not partial.exists()


def test_two_analyses_of_one_output_do_not_run_at_once(tmp_path):
    import fcntl

    _, _, series = _series(tmp_path, "single", torch.float32, steps=(1,), n_layers=1)
    with open(tmp_path / ".out.lock", "w") as f:  # as another process holding the output would
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(InputError, match="is being written by another analyze"):
            analyze(series, out=tmp_path / "out", svd="none", progress=False)
    analyze(series, out=tmp_path / "out", svd="none", progress=False)
    assert (tmp_path / "out" / "run.json").exists() and not (tmp_path / ".out.lock").exists()


def test_a_lock_taken_on_a_file_its_holder_just_removed_is_taken_again(tmp_path, monkeypatch):
    """The race: B opens the lock file, A (leaving) removes it and unlocks, B locks the removed file while
    C creates a new one and locks that: B and C would both write .out.partial/. Simulated by removing the
    file between B's open and B's lock; B must end up holding the file that is at the path."""
    import fcntl
    import os

    from opd_dynamics.io.writer import output_lock

    real, calls, held = fcntl.flock, [], []

    def flock(f, op):
        calls.append(op)
        if len(calls) == 1:
            os.unlink(tmp_path / ".out.lock")  # A leaves just now
        return real(f, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    with output_lock(tmp_path / "out"):
        held.append(os.stat(tmp_path / ".out.lock").st_ino)
        with pytest.raises(InputError, match="is being written by another analyze"):  # C is refused
            with output_lock(tmp_path / "out"):
                pass
    assert len(held) == 1 and len(calls) == 3 and not (tmp_path / ".out.lock").exists()


def test_float64_checkpoints_keep_float64_updates(tmp_path):
    """A 1e-9 update on float64 weights: rounding the base to float32 first would lose it."""
    sd = llama_like(n_layers=1, dtype=torch.float64)
    write_dir(tmp_path / "base", sd)
    st = perturb(sd, 1e-9, 1)
    write_dir(tmp_path / "run" / "checkpoint-1", st)
    rep = analyze(CheckpointSeries.discover(tmp_path / "run", base=tmp_path / "base"), progress=False)
    a = rep.module_allocation.set_index("tensor")
    for name in ("model.layers.0.mlp.up_proj.weight", "model.norm.weight"):
        exact = float((st[name] - sd[name]).norm())
        assert a.loc[name, "update_norm"] == pytest.approx(exact, rel=1e-6), name
    up = "model.layers.0.mlp.up_proj.weight"
    s = rep.spectrum.set_index("tensor").loc[up]
    assert s["spectral_norm"] == pytest.approx(float(torch.linalg.matrix_norm(st[up] - sd[up], 2)), rel=1e-6)
    assert "float64 for tensors stored in float64" in rep.meta["dtype"]["used"]


def test_keyword_options_given_with_an_options_object_replace_its_fields(tmp_path):
    """analyze(s, options=o, svd='fast') used to drop svd='fast' silently and run o's exact mode."""
    from opd_dynamics.analysis import AnalysisOptions

    _, _, series = _series(tmp_path, "single", torch.float32, steps=(1, 2), n_layers=1)
    rep = analyze(series, options=AnalysisOptions(alignment=False), svd="fast", progress=False)
    assert rep.spectrum["svd_method"].str.startswith("randomized").all() and "alignment" not in rep.tables
    assert rep.meta["options"]["svd"] == "fast" and rep.meta["options"]["alignment"] is False


@pytest.mark.parametrize("load_mode", ["pread", "mmap"])
def test_no_descriptor_of_the_inputs_outlives_the_analysis(tmp_path, load_mode):
    import os

    _, _, series = _series(tmp_path, "sharded", torch.float32, steps=(1, 2), n_layers=1)
    series = CheckpointSeries.from_list(series.steps, base=series.base, name="opd", load_mode=load_mode)

    def open_inputs() -> int:
        fd_dir = "/proc/self/fd"
        targets = [os.readlink(f"{fd_dir}/{f}") for f in os.listdir(fd_dir) if os.path.islink(f"{fd_dir}/{f}")]
        maps = open("/proc/self/maps").read().splitlines()
        return sum(str(tmp_path) in t for t in targets) + sum(str(tmp_path) in m for m in maps)

    analyze(series, progress=False)
    assert open_inputs() == 0
    from opd_dynamics.analysis.readers import is_open

    describe(series)  # a dry run keeps no reader either (it kept one per series for the whole session)
    assert open_inputs() == 0 and not is_open(series)


def test_a_base_of_another_model_is_refused_or_flagged(tmp_path):
    """A Qwen2 base for a Llama run (same shapes): one sentence naming the step unless forced; forced, or when the
    configs agree but the weights are another model's, run.json and a warning say the base looks wrong."""
    from builders import LLAMA_CONFIG

    sd = llama_like(n_layers=1)
    write_dir(tmp_path / "base", sd, config={**LLAMA_CONFIG, "model_type": "qwen2"})
    write_dir(tmp_path / "run" / "checkpoint-1", perturb(sd, 0.01, 1))
    s = CheckpointSeries.discover(tmp_path / "run", base=tmp_path / "base")
    with pytest.raises(InputError, match=r"checkpoint-1: is another model than the base .*its config model_type is "
                                         r"llama, the base's qwen2 \(pass --force-base"):
        analyze(s, progress=False)
    rep = analyze(s, progress=False, force_base=True)
    assert rep.meta["warnings"] == []  # forced, and the weights are a fine-tune of the base: nothing to flag
    write_dir(tmp_path / "other", llama_like(n_layers=1, seed=7))  # same config, independent weights
    wrong = CheckpointSeries.discover(tmp_path / "run", base=tmp_path / "other")
    with pytest.warns(UserWarning, match=r"median relative update .* at its first step \(1\) is 1\.\d\d; is the base"):
        rep = analyze(wrong, progress=False)
    assert len(rep.meta["warnings"]) == 1


def test_output_side_os_errors_are_one_sentence_and_keep_the_partial(tmp_path, monkeypatch):
    import errno

    from click.testing import CliRunner

    from opd_dynamics.analysis.report import Report
    from opd_dynamics.cli import main

    sd = llama_like(n_layers=1)
    write_dir(tmp_path / "base", sd)
    write_dir(tmp_path / "run" / "checkpoint-1", perturb(sd, 0.01, 1))
    (tmp_path / "afile").write_text("x")
    r = CliRunner().invoke(main, ["analyze", str(tmp_path / "run"), "--base", str(tmp_path / "base"), "--out",
                                  str(tmp_path / "afile" / "out"), "--quiet"])
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert "afile/out: cannot be written: " in r.output and "Traceback" not in r.output

    def full(self, directory):  # the disk fills up while the tables are written
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "spectrum.csv"))

    monkeypatch.setattr(Report, "write_into", full)
    s = CheckpointSeries.discover(tmp_path / "run", base=tmp_path / "base")
    with pytest.raises(InputError, match=r"out: cannot be written: No space left on device .*spectrum.csv.*; what "
                                         r"was computed is kept in .*\.out\.partial, and rerunning"):
        analyze(s, out=tmp_path / "out", progress=False)
    assert (tmp_path / ".out.partial").is_dir() and not (tmp_path / "out").exists()

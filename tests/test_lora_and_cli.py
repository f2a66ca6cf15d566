"""PEFT LoRA adapters (saved by PEFT itself) as a series, and the CLI's outputs and refusals."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from opd_dynamics.analysis.api import analyze
from opd_dynamics.cli import main
from opd_dynamics.errors import InputError
from opd_dynamics.io.lora import LoraAdapter
from opd_dynamics.io.series import CheckpointSeries

from builders import llama_like, perturb, write_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=40)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "base")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                  use_rslora=False))
    for step in (1, 2):
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn_like(p) * 0.1 * step)
        peft_model.save_pretrained(root / "run" / f"checkpoint-{step}")
    return root


def test_lora_delta_is_scaled_factor_product(lora_run):
    ad = LoraAdapter(lora_run / "run" / "checkpoint-2")
    name = "model.layers.1.mlp.down_proj.weight"
    assert sorted(ad.names()) == sorted(f"model.layers.{i}.{m}.weight" for i in (0, 1)
                                        for m in ("self_attn.q_proj", "mlp.down_proj"))
    raw = load_file(str(lora_run / "run" / "checkpoint-2" / "adapter_model.safetensors"))
    a = raw["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].double().numpy()
    b = raw["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].double().numpy()
    ref = (8 / 4) * b @ a
    assert np.allclose(ad.delta(name, torch.float64).numpy(), ref, rtol=1e-12, atol=0)
    assert ad.factor_fro2(name) == pytest.approx(float((ref ** 2).sum()), rel=1e-10)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=40))


def test_lora_scales_match_peft_merge_with_rslora_and_patterns(tmp_path):
    """rank_pattern / alpha_pattern keys are regexes matched as PEFT matches them; the reference is PEFT's
    own merge_and_unload."""
    import copy

    from peft import LoraConfig, get_peft_model

    base = _tiny_llama()
    w0 = {n: p.detach().double().clone() for n, p in base.state_dict().items()}
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                     rank_pattern={"q_proj|v_proj": 2}, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 16})
    pm = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(tmp_path / "ad")
    merged = copy.deepcopy(pm).merge_and_unload().state_dict()
    ad = LoraAdapter(tmp_path / "ad")
    assert sorted(ad.names()) == sorted(f"model.layers.{i}.{m}.weight" for i in (0, 1)
                                        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    for name in ad.names():
        ref = merged[name].double() - w0[name]
        torch.testing.assert_close(ad.delta(name, torch.float64), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("extra", [dict(use_dora=True), dict(target_modules=["q_proj", "embed_tokens"])])
def test_dora_and_embedding_lora_are_refused(tmp_path, extra):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(**{"r": 2, "target_modules": ["q_proj"], **extra})
    get_peft_model(_tiny_llama(), cfg).save_pretrained(tmp_path / "ad")
    with pytest.raises(InputError, match="DoRA|embedding LoRA"):
        LoraAdapter(tmp_path / "ad")


def test_lora_series_analysis(lora_run):
    series = CheckpointSeries.discover(lora_run / "run", base=lora_run / "base", name="lora")
    rep = analyze(series, progress=False)
    a = rep.module_allocation
    assert set(a["module"]) == {"q_proj", "down_proj"} and len(a) == 8
    s = rep.spectrum
    assert (s["rank90"] <= 4).all()  # a rank-4 adapter
    ad = LoraAdapter(lora_run / "run" / "checkpoint-1")
    row = a.query("step == 1 and tensor == 'model.layers.0.self_attn.q_proj.weight'").iloc[0]
    assert row["update_norm"] == pytest.approx(ad.factor_fro2("model.layers.0.self_attn.q_proj.weight") ** 0.5,
                                               rel=1e-5)


def test_lora_trajectory_from_factor_rows_matches_the_dense_reference(lora_run, monkeypatch):
    """Trajectory metrics of a LoRA series, streamed a row at a time from the factors (s·B[rows]·A), equal the
    float64 reference on the dense ΔW = s·B·A of each step."""
    from opd_dynamics.analysis import deltas

    from reference import ref_trajectory

    monkeypatch.setattr(deltas, "TRAJECTORY_BLOCK_BYTES", 1)
    series = CheckpointSeries.discover(lora_run / "run", base=lora_run / "base", name="lora")
    rep = analyze(series, progress=False, svd="none")
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        dense = [LoraAdapter(lora_run / "run" / f"checkpoint-{s}").delta(name, torch.float64).numpy() for s in (1, 2)]
        summary, rows = ref_trajectory(dense, [1, 2])
        got = rep.trajectory[rep.trajectory.tensor == name].iloc[0]
        assert got["rank1_share"] == pytest.approx(summary["rank1_share"], rel=1e-6)
        assert got["linear_r2"] == pytest.approx(summary["linear_r2"], rel=1e-6)
        seg = rep.segments[rep.segments.tensor == name].sort_values("step")
        assert seg["segment_cosine"].iloc[0] == pytest.approx(rows[0]["segment_cosine"], rel=1e-6)


@pytest.fixture()
def run_dirs(tmp_path):
    sd = llama_like(n_layers=2, dtype=torch.bfloat16)
    write_dir(tmp_path / "base", sd, "sharded")
    for name in ("opd", "rl"):
        for s in (2, 4):
            write_dir(tmp_path / name / f"checkpoint-{s}", perturb(sd, 0.01 * s, {"opd": 0, "rl": 50}[name] + s))
    return tmp_path


def test_cli_analyze_single_and_multi_run(run_dirs):
    r = CliRunner().invoke(main, ["analyze", str(run_dirs / "opd"), "--base", str(run_dirs / "base"),
                                  "--out", str(run_dirs / "out1"), "--quiet"])
    assert r.exit_code == 0, r.output
    cols = open(run_dirs / "out1" / "module_allocation.csv").readline().strip().split(",")
    assert cols[:16] == ["run", "step", "tensor", "layer", "group", "module", "expert", "shape", "numel",
                         "update_norm", "base_norm", "relative_update", "rms_update", "energy_share",
                         "changed_fraction", "finite"]
    meta = json.loads((run_dirs / "out1" / "run.json").read_text())
    assert meta["command"].startswith("opd-dynamics analyze") and meta["inputs"][0]["steps"][0]["step"] == 2
    r = CliRunner().invoke(main, ["analyze", "--run", f"opd={run_dirs / 'opd'}", "--run", f"rl={run_dirs / 'rl'}",
                                  "--base", str(run_dirs / "base"), "--out", str(run_dirs / "out2"), "--quiet",
                                  "--geometry"])
    assert r.exit_code == 0, r.output
    for t in ("module_allocation", "spectrum", "alignment", "geometry", "embedding", "summary", "singular_values"):
        assert (run_dirs / "out2" / f"{t}.csv").exists(), t
    r = CliRunner().invoke(main, ["describe", str(run_dirs / "opd"), "--base", str(run_dirs / "base")])
    assert r.exit_code == 0 and "tensors to analyse" in r.output


def _ok(d):  # a valid analyze command line, to which one bad option is added
    return ["analyze", str(d / "opd"), "--base", str(d / "base"), "--out", str(d / "o"), "--quiet"]


def _text(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("make_bad,phrase", [
    (lambda d: ["analyze", str(d / "nope"), "--base", str(d / "base"), "--out", str(d / "o")], "does not exist"),
    (lambda d: ["analyze", str(d / "opd"), "--base", str(d / "missing"), "--out", str(d / "o")], "does not exist"),
    (lambda d: ["analyze", str(d / "opd"), "--base", str(d / "base"), "--out", str(d / "opd")], "overlaps the input"),
    (lambda d: ["analyze", str(d / "base"), "--base", str(d / "base"), "--out", str(d / "o")],
     "no recognisable checkpoints"),
    (lambda d: ["analyze", "--run", "x", "--base", str(d / "base"), "--out", str(d / "o")], "NAME=DIR"),
    (lambda d: [*_ok(d), "--steps", "ten"], "--steps must hold integers"),
    (lambda d: [*_ok(d), "--groups", "attn"], "--groups 'attn': each group must be one of"),
    (lambda d: [*_ok(d), "--ref-step", "3"], "--ref-step 3 is not a step of run 'opd'"),
    (lambda d: [*_ok(d), "--token-ids", _text(d / "ids.txt", "5 x")], "must hold integers"),
    (lambda d: [*_ok(d), "--token-ids", _text(d / "ids.txt", "5 999")], "token id 999 is outside the vocabulary"),
    (lambda d: [*_ok(d), "--executor", "ray", "--ray-address", "127.0.0.1:1"], "--ray-address 127.0.0.1:1 cannot be"),
    (lambda d: [*_ok(d), "--workers", "2", "--executor", "serial"], "--workers 2 needs --executor process or ray"),
    (lambda d: [*_ok(d), "--ks", "1,x"], "--ks must hold integers"),
    (lambda d: [*_ok(d), "--spectra-groups", "attn"], "--spectra-groups 'attn': each group must be one of"),
])
def test_cli_bad_input_is_one_line_and_exit_2(run_dirs, make_bad, phrase):
    before = sorted(p.name for p in (run_dirs / "opd").iterdir())
    r = CliRunner().invoke(main, make_bad(run_dirs))
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], r.output
    assert sorted(p.name for p in (run_dirs / "opd").iterdir()) == before


def test_cli_rejects_zero_workers_without_a_traceback(run_dirs):
    r = CliRunner().invoke(main, [*_ok(run_dirs), "--workers", "0"])
    assert r.exit_code == 2 and "Invalid value for '--workers'" in r.output and "Traceback" not in r.output
    assert not (run_dirs / "o").exists()


def test_cli_ctrl_c_is_one_line_and_status_130(run_dirs, monkeypatch):
    import opd_dynamics.analysis.api

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(opd_dynamics.analysis.api, "analyze", interrupted)
    r = CliRunner().invoke(main, _ok(run_dirs))
    assert r.exit_code == 130 and "resumes" in r.output and len(r.output.strip().splitlines()) == 1


def test_cli_refuses_to_overwrite_unless_asked(run_dirs):
    out = run_dirs / "out"
    args = ["analyze", str(run_dirs / "opd"), "--base", str(run_dirs / "base"), "--out", str(out), "--quiet",
            "--svd", "none"]
    assert CliRunner().invoke(main, args).exit_code == 0
    stamp = (out / "run.json").read_text()
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "--overwrite" in r.output and (out / "run.json").read_text() == stamp
    assert CliRunner().invoke(main, args + ["--overwrite"]).exit_code == 0
    assert not list(run_dirs.glob(".out*"))  # no temporary leftovers


def test_cli_flags_are_generated_from_the_options_dataclasses(run_dirs):
    """Every AnalysisOptions / ExecutionOptions field is a flag of analyze (added once, in the dataclass); the
    values reach the analysis (run.json records them) and run.json's command repeats what was typed."""
    import dataclasses

    from opd_dynamics.analysis.options import AnalysisOptions, ExecutionOptions

    flags = {o for p in main.commands["analyze"].params for o in (*p.opts, *p.secondary_opts)}
    for cls in (AnalysisOptions, ExecutionOptions):
        for f in dataclasses.fields(cls):
            assert f"--{f.name.replace('_', '-')}" in flags or f.name == "progress", f.name
    assert {"--quiet", "--no-alignment", "--all-shapes"} - flags == {"--all-shapes"}
    r = CliRunner().invoke(main, [*_ok(run_dirs), "--ks", "1,2", "--k-subspace", "3", "--spectra-groups", "mlp",
                                  "--no-alignment"])
    assert r.exit_code == 0, r.output
    meta = json.loads((run_dirs / "o" / "run.json").read_text())
    assert meta["options"]["ks"] == [1, 2] and meta["options"]["k_subspace"] == 3
    assert meta["options"]["spectra_groups"] == ["mlp"] and meta["options"]["alignment"] is False
    assert "--ks 1,2" in meta["command"] and "--no-alignment" in meta["command"] and "--quiet" in meta["command"]
    cols = open(run_dirs / "o" / "spectrum.csv").readline().strip().split(",")
    assert "energy_top2" in cols and "energy_top4" not in cols
    assert not (run_dirs / "o" / "alignment.csv").exists()
    spec = __import__("pandas").read_csv(run_dirs / "o" / "spectrum.csv")
    assert set(spec["group"]) == {"mlp"}


def test_library_errors_name_parameters_and_the_cli_names_flags():
    """The Python API says `ref_step`, `overwrite=True`; the command line says `--ref-step`, `--overwrite`."""
    from opd_dynamics.analysis.options import AnalysisOptions
    from opd_dynamics.cli.kit import cli_message
    from opd_dynamics.effopd.options import EffOPDOptions

    with pytest.raises(InputError) as e:
        AnalysisOptions(svd="approx")
    assert str(e.value).startswith("svd must be one of") and cli_message(e.value).startswith("--svd must be one of")
    e = InputError("out", "already exists; pass overwrite=True to replace it", ("overwrite",))
    assert cli_message(e) == "out: already exists; pass --overwrite to replace it"
    with pytest.raises(InputError) as e:
        EffOPDOptions(k_max=-1)
    assert cli_message(e.value).startswith("--k-max and --fixed-k must be >= 0")
    e = InputError(None, "nothing to extrapolate (see groups and matrices_only)", ("groups", "matrices_only"))
    assert cli_message(e) == "nothing to extrapolate (see --groups and --all-shapes)"
    e = InputError(None, "strict=True keeps W_t; strict=False accepts ties; progress=True draws a bar",
                   ("strict", "progress"))
    assert cli_message(e) == "--strict keeps W_t; --accept-ties accepts ties; --progress draws a bar"
    import opd_dynamics.lab.cli  # noqa: F401  (makes the lab's flags)
    e = InputError(None, "max_steps must be positive; gate=False skips the probe", ("max_steps", "gate"))
    assert cli_message(e) == "--steps must be positive; --no-gate skips the probe"

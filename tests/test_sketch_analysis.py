"""A sketch series analysed like the checkpoints of the same run: a tiny Llama trained along a planted low-rank
path plus noise, recorded by `DynamicsRecorder` and saved as checkpoints at every step; `analyze` of the sketches
agrees with `analyze` of the checkpoints (float64 exact spectra) where a sketch determines a column, and leaves the
rest empty."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from opd_dynamics import CheckpointSeries, SketchSeries, analyze
from opd_dynamics.errors import InputError
from opd_dynamics.record import DynamicsRecorder

from builders import tiny_llama

K = 4
KEY = ["step", "tensor"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("sketch")
    model = tiny_llama(0)
    model.save_pretrained(root / "base")
    rec = DynamicsRecorder(root / "sk", k=K)
    rec.record(model, 0)
    g = torch.Generator().manual_seed(3)
    dirs = {n: (torch.randn(p.shape[0], 2, generator=g), torch.randn(2, p.shape[1], generator=g))
            for n, p in model.named_parameters() if p.dim() == 2}
    for step in range(1, 6):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in dirs:  # a rank-2 direction that settles, plus noise
                    a, b = dirs[n]
                    p.add_(1e-3 * (a @ b) / step + 2e-4 * torch.randn(p.shape, generator=g))
        rec.record(model, step)
        model.save_pretrained(root / "run" / f"checkpoint-{step}")
    rec.close()
    return root


def test_the_sketch_tables_agree_with_the_checkpoint_tables(recorded):
    sk = analyze(SketchSeries(recorded / "sk", name="run"))
    ck = analyze(CheckpointSeries.discover(recorded / "run", base=recorded / "base"), k_subspace=K, k_paired=K,
                 progress=False)
    a = sk["module_allocation"].merge(ck["module_allocation"], on=KEY, suffixes=("", "_ck"))
    # every tensor at 5 steps: 2 layers × 7 attention and MLP matrices, decomposed; the embedding, the head and the
    # 5 norms by their norms (as the checkpoints' analysis covers them), so the shares divide by the same total
    assert len(a) == 5 * 21 and len(sk["module_allocation"]) == len(ck["module_allocation"])
    assert len(sk["spectrum"]) == 5 * 14
    for c in ("update_norm", "base_norm", "relative_update", "rms_update", "changed_fraction", "energy_share"):
        np.testing.assert_allclose(a[c], a[f"{c}_ck"], rtol=1e-12, err_msg=c)  # the same kernels on the same weights
    s = sk["spectrum"].merge(ck["spectrum"], on=KEY, suffixes=("", "_ck"))
    for c in ("spectral_norm", "spectral_ratio", "stable_rank", "energy_top1", "energy_top4", "top1pct_norm_ratio"):
        np.testing.assert_allclose(s[c], s[f"{c}_ck"], rtol=1e-6, err_msg=c)
    assert s["effective_rank"].isna().all()  # needs the whole spectrum
    kv = s["module"].isin(["k_proj", "v_proj"])  # 16 x 32: r = 16, so the top 16 hold everything
    assert s.loc[~kv, "energy_top16"].isna().all() and (s.loc[kv, "energy_top16"] == 1.0).all()
    assert (s["svd_method"] == "sketch-top4").all()
    sv = sk["singular_values"].merge(ck["singular_values"], on=[*KEY, "index"], suffixes=("", "_ck"))
    assert len(sv) == 5 * 14 * K
    np.testing.assert_allclose(sv["sigma"], sv["sigma_ck"], rtol=1e-6)
    al = sk["alignment"].merge(ck["alignment"], on=KEY, suffixes=("", "_ck"))
    for c in ("subspace_overlap_u", "subspace_overlap_v", "paired_cosine", "rank1_cosine"):
        np.testing.assert_allclose(al[c], al[f"{c}_ck"], atol=1e-5, err_msg=c)
    np.testing.assert_allclose(al["max_principal_angle_deg"], al["max_principal_angle_deg_ck"], atol=0.05)
    assert al["direction_cosine"].isna().all() and al["direction_cosine_ck"].notna().all()
    seg = sk["segments"].merge(ck["segments"], on=KEY, suffixes=("", "_ck"))
    inner = seg[seg["step"] < 5]
    np.testing.assert_allclose(inner["segment_cosine"], inner["segment_cosine_ck"], atol=1e-6)
    # the random-walk null from the segment norms (recorded in float64 from float32 differences)
    np.testing.assert_allclose(seg["null_cosine"], seg["null_cosine_ck"], rtol=1e-8)
    assert sk.meta["source"] == "sketch series" and "direction_cosine" in sk.meta["unavailable"]["alignment"]


def test_a_tied_llama_trained_with_the_recorder_gives_the_checkpoints_energy_shares(tmp_path):
    """A tiny Llama with tied embeddings trained by AdamW for 4 steps, recorded every step and saved as checkpoints
    at the same steps: the sketch series and the checkpoints give equal energy_share per tensor (1e-6), over the
    same tensors, the tied head counted once (the embedding's row; no lm_head in either)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "base")
    rec = DynamicsRecorder(tmp_path / "sk", k=4)
    rec.record(model, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(1, 5):
        ids = torch.randint(0, 61, (4, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        rec.record(model, step)
        model.save_pretrained(tmp_path / "run" / f"checkpoint-{step}")
    rec.close()
    series = SketchSeries(tmp_path / "sk", name="run")
    assert len(series.decomposed) == 14 and "lm_head.weight" not in series.tensors
    assert sorted(set(series.tensors) - set(series.decomposed)) == [
        "model.embed_tokens.weight", *(f"model.layers.{i}.{n}.weight" for i in (0, 1)
                                       for n in ("input_layernorm", "post_attention_layernorm")), "model.norm.weight"]
    sk = analyze(series)
    ck = analyze(CheckpointSeries.discover(tmp_path / "run", base=tmp_path / "base"), progress=False)
    a, b = (r["module_allocation"].set_index(KEY).sort_index() for r in (sk, ck))
    assert list(a.index) == list(b.index)  # the same tensors at the same steps
    assert not a.index.get_level_values("tensor").str.startswith("lm_head").any()
    assert (a["update_norm"] > 0).all()  # AdamW moved every tensor
    np.testing.assert_allclose(a["energy_share"], b["energy_share"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(a.groupby("step")["energy_share"].sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(a["update_norm"], b["update_norm"], rtol=1e-12)
    assert sk.meta["inputs"][0]["decomposed"] == 14 and "model.embed_tokens.weight" in sk.meta["inputs"][0]["normed"]


def test_the_cli_reads_a_sketch_series_and_checks_a_base(recorded, tmp_path):
    from opd_dynamics.cli import main

    r = CliRunner().invoke(main, ["analyze", str(recorded / "sk"), "--out", str(tmp_path / "out"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "alignment.csv").exists()
    assert pd.read_csv(tmp_path / "out" / "spectrum.csv")["svd_method"].eq("sketch-top4").all()
    r = CliRunner().invoke(main, ["describe", str(recorded / "sk")])
    assert r.exit_code == 0 and "sketch series" in r.output and "5 steps 1…5, 14 matrices" in r.output
    # the right base passes; another model's (same shapes, other weights) is one sentence, exit 2
    r = CliRunner().invoke(main, ["analyze", str(recorded / "sk"), "--base", str(recorded / "base"), "--out",
                                  str(tmp_path / "out2"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert SketchSeries(recorded / "sk").check_base(recorded / "base") == 0.0  # the recorded start itself
    moved = tiny_llama(0)  # the same model a little trained: accepted, with the distance said
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(1e-3)
    moved.save_pretrained(tmp_path / "moved")
    with pytest.warns(UserWarning, match=r"moved is not the start .*sk recorded \(its matrices are .* of their norm "
                                         r"away, median\); the sketch's updates are measured from the start it"):
        from opd_dynamics.cli.kit import series_from_cli

        series_from_cli(str(recorded / "sk"), (), str(tmp_path / "moved"), None, "pread")
    other = tiny_llama(0)
    with torch.no_grad():
        for p in other.parameters():
            p.copy_(torch.randn(p.shape) * 0.02)
    other.save_pretrained(tmp_path / "other")
    r = CliRunner().invoke(main, ["analyze", str(recorded / "sk"), "--base", str(tmp_path / "other"), "--out",
                                  str(tmp_path / "out3"), "--quiet"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and not (tmp_path / "out3").exists()
    assert "sk: was recorded from another model than" in r.output and "median over matrices" in r.output


def test_a_sketch_and_a_checkpoint_series_are_not_mixed(recorded):
    with pytest.raises(InputError, match="sketch series and checkpoint series cannot be analysed together"):
        analyze([SketchSeries(recorded / "sk"), CheckpointSeries.discover(recorded / "run", base=recorded / "base")])


def test_under_fsdp2_rank_0_records_the_gathered_matrices(tmp_path):
    """Two gloo ranks train a fully_shard tiny Llama: the recorder on every rank gathers each matrix, rank 0
    writes one sketch series under the model's own names, and it analyses like the gathered checkpoints."""
    import shutil

    from builders import record_fsdp_worker, spawn_gloo

    def reset() -> None:
        for d in ("sk", "base", "run"):
            shutil.rmtree(tmp_path / d, ignore_errors=True)

    spawn_gloo(record_fsdp_worker, (2, str(tmp_path)), 2, reset)
    s = SketchSeries(tmp_path / "sk", name="run")
    assert s.steps == [1, 2, 3] and len(s.decomposed) == 14 and len(s.tensors) == 21  # and the rest by norms
    assert all(n.startswith("model.") or n == "lm_head.weight" for n in s.tensors)  # no FSDP wrapper in the names
    sk = analyze(s)
    ck = analyze(CheckpointSeries.discover(tmp_path / "run", base=tmp_path / "base"), k_subspace=3, k_paired=3,
                 progress=False)
    a = sk["module_allocation"].merge(ck["module_allocation"], on=KEY, suffixes=("", "_ck"))
    assert len(a) == 3 * 21 and (a.loc[a["tensor"].isin(s.decomposed), "update_norm"] > 0).all()
    np.testing.assert_allclose(a["update_norm"], a["update_norm_ck"], rtol=1e-12)
    sv = sk["singular_values"].merge(ck["singular_values"], on=[*KEY, "index"], suffixes=("", "_ck"))
    np.testing.assert_allclose(sv.query("index == 1")["sigma"], sv.query("index == 1")["sigma_ck"], rtol=1e-6)

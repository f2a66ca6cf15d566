"""Interventions give exact, known weights on planted tensors written as real safetensors."""

from __future__ import annotations

import math

import pytest
import torch

from opd_dynamics import interventions as iv
from opd_dynamics.errors import InputError
from opd_dynamics.io.formats import open_model
from opd_dynamics.io.naming import parse_name
from opd_dynamics.lab.interventions import evenly

from builders import llama_like, perturb, write_dir


def _pair(tmp_path, dtype=torch.float32, n_layers=4):
    base = llama_like(n_layers=n_layers, dtype=dtype, seed=1)
    ckpt = perturb(base, 0.01, seed=2)
    return base, ckpt, write_dir(tmp_path / "base", base), write_dir(tmp_path / "ckpt", ckpt)


def _delta64(base, ckpt, k):
    return ckpt[k].double() - base[k].double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_endpoints_exact_and_midpoint(tmp_path, dtype):
    base, ckpt, b, c = _pair(tmp_path, dtype)
    s0, s1, sh = iv.scale(b, c, 0.0), iv.scale(b, c, 1.0), iv.scale(b, c, 0.5)
    for k in base:
        assert s0[k].dtype == dtype and torch.equal(s0[k], base[k])
        assert torch.equal(s1[k], ckpt[k])
        # float32 reference: base + 0.5·ΔW formed in float32 from the stored values, cast to the stored dtype
        ref = (base[k].float() + 0.5 * (ckpt[k].float() - base[k].float())).to(dtype)
        assert torch.equal(sh[k], ref)
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(sh[k].double(), base[k].double() + 0.5 * _delta64(base, ckpt, k),
                                   atol=tol, rtol=tol)


def test_scale_accepts_open_models_and_writes(tmp_path):
    base, ckpt, b, c = _pair(tmp_path)
    with open_model(b) as mb, open_model(c) as mc:
        out = iv.scale(mb, mc, 0.25, write=tmp_path / "out")
    with open_model(out) as m:
        for k in base:
            ref = (base[k] + 0.25 * (ckpt[k] - base[k]))
            assert torch.equal(m.get(k), ref)
    assert (out / "config.json").exists()
    with pytest.raises(InputError):
        iv.scale(b, c, 0.25, write=tmp_path / "out")


def test_update_norm_is_float64_frobenius(tmp_path):
    base, ckpt, b, c = _pair(tmp_path)
    ref = math.sqrt(sum(float((_delta64(base, ckpt, k) ** 2).sum()) for k in base))
    assert iv.update_norm(b, c) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("groups", [("mlp",), ("attention",), ("mlp", "attention")])
def test_layer_window_touches_only_its_layers_and_groups(tmp_path, groups):
    base, ckpt, b, c = _pair(tmp_path, n_layers=6)
    sd = iv.layer_window(b, c, center=2, half_width=1, groups=groups)
    for k in base:
        p = parse_name(k)
        inside = p.layer is not None and 1 <= p.layer <= 3 and p.group in groups
        assert torch.equal(sd[k], ckpt[k] if inside else base[k]), k
    n_updated = sum(not torch.equal(sd[k], base[k]) for k in base)
    assert n_updated == 3 * sum({"mlp": 3, "attention": 4}[g] for g in groups)


def test_layer_window_default_width_covers_all_layers_of_small_model(tmp_path):
    base, ckpt, b, c = _pair(tmp_path, n_layers=4)
    sd = iv.layer_window(b, c, center=0)
    for k in base:
        assert torch.equal(sd[k], ckpt[k] if parse_name(k).group == "mlp" else base[k])


def test_module_mask_and_embedding_swap(tmp_path):
    base, ckpt, b, c = _pair(tmp_path)
    sd = iv.module_mask(b, c, groups=("attention",), modules=("q_proj", "v_proj"))
    for k in base:
        p = parse_name(k)
        assert torch.equal(sd[k], ckpt[k] if p.module in ("q_proj", "v_proj") else base[k])
    sw = iv.embedding_swap(b, c)
    for k in base:
        back = k in ("model.embed_tokens.weight", "lm_head.weight")
        assert torch.equal(sw[k], base[k] if back else ckpt[k])


def _planted(tmp_path, dtype=torch.float32):
    """Base plus a planted ΔW with known singular values on every attention/MLP matrix."""
    base = llama_like(n_layers=2, dtype=dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    ckpt = {}
    for k, v in base.items():
        if parse_name(k).group in ("attention", "mlp"):
            m, n = v.shape
            r = min(m, n)
            u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
            w, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
            s = torch.linspace(1.0, 0.05, r, dtype=torch.float64) * 0.1
            ckpt[k] = (v.double() + (u * s) @ w.T).to(dtype)
        else:
            ckpt[k] = (v.double() + 0.01).to(dtype)
    return base, ckpt, write_dir(tmp_path / "base", base), write_dir(tmp_path / "ckpt", ckpt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_top100_is_delta_and_top_bottom_partition(tmp_path, dtype):
    base, ckpt, b, c = _planted(tmp_path, dtype)
    full = iv.rank_truncate(b, c, 1.0, "top")
    top = iv.rank_truncate(b, c, 0.25, "top", others=iv.BASE)
    bot = iv.rank_truncate(b, c, 0.75, "bottom", others=iv.BASE)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for k in base:
        d = _delta64(base, ckpt, k)
        if parse_name(k).group not in ("attention", "mlp"):
            assert torch.equal(full[k], ckpt[k]) and torch.equal(top[k], base[k])
            continue
        torch.testing.assert_close(full[k].double(), base[k].double() + d, atol=tol, rtol=0)
        r = min(d.shape)
        kt = math.ceil(0.25 * r)
        assert kt + math.ceil(0.75 * r) == r
        # float64 reference of each part, from ΔW of the stored (float32 view of) values
        u, s, vh = torch.linalg.svd(d)
        ref_top = (u[:, :kt] * s[:kt]) @ vh[:kt]
        torch.testing.assert_close((top[k].double() - base[k].double()), ref_top, atol=tol, rtol=0)
        parts = (top[k].double() - base[k].double()) + (bot[k].double() - base[k].double())
        torch.testing.assert_close(parts, d, atol=2 * tol, rtol=0)
    # a shared SVD cache decomposes each ΔW once and changes nothing in the result
    cache: dict = {}
    for pct, side in ((0.25, "top"), (0.75, "bottom")):
        cached = iv.rank_truncate(b, c, pct, side, others=iv.BASE, svd_cache=cache)
        ref = top if side == "top" else bot
        assert all(torch.equal(cached[k], ref[k]) for k in base)
    assert set(cache) == {k for k in base if parse_name(k).group in ("attention", "mlp") and base[k].dim() == 2}


def test_truncate_matrix_exact_on_planted_spectrum():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(20, 10, generator=g, dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    s = torch.arange(10, 0, -1, dtype=torch.float64)
    d = ((u * s) @ w.T).float()
    top = iv.truncate_matrix(d, 0.1, "top").double()  # k = 1: σ1 = 10
    torch.testing.assert_close(torch.linalg.matrix_norm(top), torch.tensor(10.0, dtype=torch.float64),
                               atol=1e-4, rtol=0)
    bot = iv.truncate_matrix(d, 0.2, "bottom").double()  # k = 2: σ = 2, 1
    assert float(torch.linalg.vector_norm(bot)) == pytest.approx(math.sqrt(5), rel=1e-5)
    resc = iv.truncate_matrix(d, 0.2, "bottom", rescale_to_norm=True).double()
    assert float(torch.linalg.vector_norm(resc)) == pytest.approx(float(torch.linalg.vector_norm(s)), rel=1e-5)
    torch.testing.assert_close(resc / torch.linalg.vector_norm(resc), bot / torch.linalg.vector_norm(bot))
    assert iv.truncate_matrix(d, 0.01, "top").shape == d.shape
    with pytest.raises(InputError):
        iv.truncate_matrix(d, 0.0)
    with pytest.raises(InputError):
        iv.truncate_matrix(d, 0.5, "middle")


def test_rank_rescale_gives_full_norm_per_matrix(tmp_path):
    base, ckpt, b, c = _planted(tmp_path)
    sd = iv.rank_truncate(b, c, 0.05, "top", rescale_to_norm=True)
    for k in base:
        if parse_name(k).group in ("attention", "mlp"):
            got = float(torch.linalg.vector_norm(sd[k].double() - base[k].double()))
            want = float(torch.linalg.vector_norm(_delta64(base, ckpt, k)))
            assert got == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_rescale_hits_beta_times_final_norm(tmp_path, dtype):
    base = llama_like(n_layers=2, dtype=dtype, seed=5)
    mid = perturb(base, 0.002, seed=6)
    final = perturb(base, 0.02, seed=7)
    b, m, f = (write_dir(tmp_path / n, sd) for n, sd in (("b", base), ("m", mid), ("f", final)))
    for beta in (0.5, 1.0, 1.5):
        sd = iv.module_rescale(b, m, f, beta=beta)
        for k in base:
            dm = mid[k].float() - base[k].float()
            target = beta * float(torch.linalg.vector_norm((final[k].float() - base[k].float()).double()))
            ref = (base[k].float() + (dm.double() * (target / float(torch.linalg.vector_norm(dm.double())))).float())
            assert torch.equal(sd[k], ref.to(dtype))
            if dtype == torch.float32:
                got = float(torch.linalg.vector_norm(sd[k].double() - base[k].double()))
                assert got == pytest.approx(target, rel=1e-4)


def test_shape_mismatch_names_the_tensor(tmp_path):
    base = llama_like(n_layers=1, seed=0)
    ckpt = llama_like(n_layers=1, vocab=60, seed=0)
    b, c = write_dir(tmp_path / "b", base), write_dir(tmp_path / "c", ckpt)
    with pytest.raises(InputError, match="has shape .60, 32. but the base has .50, 32."):
        iv.scale(b, c, 0.5)


def test_lab_cli_refuses_a_non_lab_directory(tmp_path):
    from click.testing import CliRunner

    from opd_dynamics.cli import main

    res = CliRunner().invoke(main, ["lab", "interventions", "--lab", str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "lab.json is missing" in res.output
    assert not (tmp_path / "o").exists()


def test_evenly_spaced_rescale_steps():
    assert evenly([30, 60, 90, 120, 150], 3) == [30, 90, 150]
    assert evenly([30, 60, 90], 1) == [60]
    assert evenly([30, 60], 4) == [30, 60] and evenly([30], 0) == []


def test_a_tensor_the_base_lacks_or_of_another_shape_is_named(tmp_path):
    base, ckpt, b, _ = _pair(tmp_path, n_layers=1)
    extra = write_dir(tmp_path / "extra", {**ckpt, "model.layers.0.mlp.extra_proj.weight": torch.zeros(4, 4)})
    with pytest.raises(InputError, match="has no tensor 'model.layers.0.mlp.extra_proj.weight'"):
        iv.update_norm(b, extra)
    k = "model.layers.0.mlp.up_proj.weight"
    wide = write_dir(tmp_path / "wide", {**ckpt, k: torch.zeros(ckpt[k].shape[0], ckpt[k].shape[1] + 1)})
    with pytest.raises(InputError, match=f"tensor '{k}' has shape .* but the base has"):
        iv.update_norm(b, wide)


def test_float64_weights_stay_float64(tmp_path):
    """The update precision rule (numerics.update_dtype) holds here too: float64 weights are transformed in
    float64 (they were upcast to float32 before), so scale, rank truncation and rescaling match the float64
    reference to rounding, and the written tensors stay float64."""
    base, ckpt, b, c = _pair(tmp_path, torch.float64)
    half = iv.scale(b, c, 0.5)
    top = iv.rank_truncate(b, c, 0.25, "top", rescale_to_norm=True)
    resc = iv.module_rescale(b, c, c, beta=2.0)
    for k in base:
        d = _delta64(base, ckpt, k)
        assert half[k].dtype == torch.float64 and top[k].dtype == torch.float64
        torch.testing.assert_close(half[k], base[k] + 0.5 * d, atol=1e-15, rtol=1e-15)
        torch.testing.assert_close(resc[k], base[k] + 2.0 * d, atol=1e-15, rtol=1e-13)
        if parse_name(k).group in ("attention", "mlp") and d.ndim == 2:
            u, s, vh = torch.linalg.svd(d, full_matrices=False)
            kk = math.ceil(0.25 * s.numel())
            ref = (u[:, :kk] * s[:kk]) @ vh[:kk]
            ref = ref * (torch.linalg.vector_norm(d) / torch.linalg.vector_norm(ref))
            torch.testing.assert_close(top[k], base[k] + ref, atol=1e-14, rtol=1e-12)
    assert iv.update_norm(b, c) == pytest.approx(math.sqrt(sum(float(_delta64(base, ckpt, k).square().sum())
                                                                for k in base)), rel=1e-15)

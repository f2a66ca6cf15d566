"""The recorder on planted updates: rank-1 steps give top-1 energy 1 and the planted vectors; norms, segment norms
and the changed fraction against float64 numpy; the schedule; files written atomically; nothing overwritten."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from opd_dynamics.errors import InputError
from opd_dynamics.record import DynamicsRecorder
from opd_dynamics.schema import TABLES


class Tiny(torch.nn.Module):
    """Names the project's naming puts in the attention and MLP groups, plus a norm that is not recorded."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.model = torch.nn.Module()
        layer = torch.nn.Module()
        layer.self_attn = torch.nn.Module()
        layer.self_attn.q_proj = torch.nn.Linear(12, 10, bias=False)
        layer.mlp = torch.nn.Module()
        layer.mlp.up_proj = torch.nn.Linear(12, 20, bias=False)
        layer.input_layernorm = torch.nn.LayerNorm(12)
        self.model.layers = torch.nn.ModuleList([layer])
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _recorded(out, **kw) -> DynamicsRecorder:
    """A Tiny model recorded at steps 0 … 3, its q_proj pushed by 0.01 each step; the recorder, still open."""
    m = Tiny()
    rec = DynamicsRecorder(out, k=2, **kw)
    rec.record(m, 0)
    for step in (1, 2, 3):
        with torch.no_grad():
            m.model.layers[0].self_attn.q_proj.weight.add_(1e-2)
        rec.record(m, step)
    return rec


def test_rank1_steps_and_norms_against_float64(tmp_path):
    m = Tiny()
    q = m.model.layers[0].self_attn.q_proj.weight
    w0 = q.detach().double().numpy().copy()
    u, v = np.linspace(1, 2, 10), np.linspace(-1, 1, 12)
    rec = DynamicsRecorder(tmp_path / "sk", k=4)
    rec.record(m, 0)
    for step in (1, 2, 3):
        with torch.no_grad():
            q.add_(torch.tensor(1e-2 * np.outer(u, v), dtype=torch.float32))  # a straight rank-1 path
        assert rec.record(m, step)
    rec.close()
    df = pd.read_csv(tmp_path / "sk" / "sketch.csv")
    assert list(df.columns) == TABLES["sketch"].names
    decomposed = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    normed = ["model.layers.0.input_layernorm.bias", "model.layers.0.input_layernorm.weight"]
    assert sorted(set(df["tensor"])) == sorted(decomposed + normed)  # every trainable tensor, the norm by its norms
    meta = json.loads((tmp_path / "sk" / "sketch.json").read_text())
    assert sorted(n for n, v in meta["tensors"].items() if v["decomposed"]) == decomposed
    ln = df[df["tensor"].isin(normed)]
    assert (ln["svd_method"] == "norms").all() and (ln["k"] == 0).all() and (ln["update_norm"] == 0).all()
    assert ln["spectral_norm"].isna().all() and (ln["base_norm"] > 0).all()
    r = df[df["tensor"].str.contains("q_proj")].set_index("step")
    wt = q.detach().double().numpy()
    d = wt - w0
    assert r.loc[3, "update_norm"] == pytest.approx(np.linalg.norm(d), rel=1e-7)  # float32 weights' differences
    assert r.loc[3, "base_norm"] == pytest.approx(np.linalg.norm(w0), rel=1e-6)
    assert r.loc[3, "energy_topk"] == pytest.approx(1.0, abs=1e-9)  # rank 1: the top triplet holds it all
    assert r.loc[3, "spectral_norm"] == pytest.approx(np.linalg.svd(d, compute_uv=False)[0], rel=1e-7)
    changed = (np.abs(d) > 1e-3 * np.maximum(np.abs(w0), np.abs(wt))).mean()
    assert r.loc[3, "changed_fraction"] == pytest.approx(changed)
    seg = np.linalg.norm(np.outer(u, v) * 1e-2)
    assert r.loc[2, "segment_norm"] == pytest.approx(seg, rel=1e-5)  # float32 weights, float64 differences
    assert r.loc[3, "segment_cosine"] == pytest.approx(1.0, abs=1e-6)  # a straight line
    assert np.isnan(r.loc[1, "segment_cosine"])  # no earlier segment
    assert r.loc[3, "cosine_to_previous"] == pytest.approx(1.0, abs=1e-6)
    up = df[df["tensor"].str.contains("up_proj")]
    assert (up["update_norm"] == 0).all() and (up["k"] == 0).all()  # an unchanged matrix: nothing to keep
    sk = load_file(tmp_path / "sk" / "step-00000003.safetensors")
    U, S, V = (sk[f"model.layers.0.self_attn.q_proj.weight::{x}"].double().numpy() for x in "USV")
    # one triplet of the 4 asked: the rest is float32 rounding of the stored weights, below what the update resolves
    assert U.shape == (10, 1) and V.shape == (12, 1) and S.shape == (1,)
    assert abs(U[:, 0] @ (u / np.linalg.norm(u))) == pytest.approx(1.0, abs=1e-6)
    assert abs(V[:, 0] @ (v / np.linalg.norm(v))) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(S[0] * np.outer(U[:, 0], V[:, 0]), d, atol=1e-6)
    assert r.loc[3, "k"] == 1
    from opd_dynamics import SketchSeries, analyze

    spec = analyze(SketchSeries(tmp_path / "sk"))["spectrum"].set_index(["tensor", "step"])
    q_row = spec.loc[("model.layers.0.self_attn.q_proj.weight", 3)]
    assert q_row["effective_rank"] == pytest.approx(1.0) and q_row["energy_top16"] == pytest.approx(1.0, abs=1e-12)
    assert sorted(p.name for p in (tmp_path / "sk").iterdir()) == [
        "base.safetensors", "sketch.csv", "sketch.json", "step-00000001.safetensors", "step-00000002.safetensors",
        "step-00000003.safetensors"]
    np.testing.assert_array_equal(load_file(tmp_path / "sk" / "base.safetensors")[
        "model.layers.0.self_attn.q_proj.weight"].double().numpy(), w0)  # W_0 kept, exactly


def test_schedule_and_refusals(tmp_path):
    m = Tiny()
    rec = DynamicsRecorder(tmp_path / "sk", k=2, every=lambda s: s < 3 or s % 10 == 0)
    rec.record(m, 0)
    done = [s for s in range(1, 25) if rec.record(m, s)]
    assert done == [1, 2, 10, 20]
    with pytest.raises(InputError, match="already holds a sketch series"):
        DynamicsRecorder(tmp_path / "sk")
    with pytest.raises(InputError, match="k must be at least 1"):
        DynamicsRecorder(tmp_path / "other", k=0)
    with pytest.raises(InputError, match="the model has no trainable 2-D weights in the groups embedding"):
        DynamicsRecorder(tmp_path / "none", groups=("embedding",)).record(m, 0)


def test_the_callback_records_inside_a_real_trainer_and_logs_through_it(tmp_path):
    """A transformers Trainer (4 optimizer steps on a tiny Llama): the callback records steps 0 … 4, writes a
    sketch per step, and its scalars reach the trainer's log history (what every report_to backend receives)."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from opd_dynamics.record import DynamicsCallback

    from builders import tiny_llama

    model = tiny_llama(0)
    ids = torch.randint(0, 67, (8, 6), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=4,
                             learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    rec = DynamicsRecorder(tmp_path / "sk", k=3)
    cb = DynamicsCallback(rec)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    cb.bind(trainer)
    trainer.train()
    df = pd.read_csv(tmp_path / "sk" / "sketch.csv")
    assert sorted(set(df["step"])) == [1, 2, 3, 4]
    mats = df[df["svd_method"] != "norms"]
    assert len(set(mats["tensor"])) == 14 and (df["update_norm"] > 0).all()  # 2 layers × 7 matrices, all moved
    assert set(df["tensor"]) - set(mats["tensor"]) == {  # and every other trainable tensor by its norms
        "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
        *(f"model.layers.{i}.{n}.weight" for i in (0, 1) for n in ("input_layernorm", "post_attention_layernorm"))}
    logged = [h for h in trainer.state.log_history if "dynamics/segment_norm" in h]
    assert [h["dynamics/step"] for h in logged] == [1, 2, 3, 4]  # each step once, in order
    assert all(h["step"] >= h["dynamics/step"] for h in logged)  # logged when finished (in the background: later)
    last = df[df["step"] == 4]
    mlp = float(np.sqrt((last.loc[last["tensor"].str.contains("mlp"), "update_norm"] ** 2).sum()))
    assert logged[-1]["dynamics/update_norm/mlp"] == pytest.approx(mlp, rel=1e-9)
    assert -1 <= logged[-1]["dynamics/cosine_to_previous"] <= 1
    assert any("loss" in h for h in trainer.state.log_history)  # the trainer's own logs are kept


def test_fast_mode_keeps_exact_energies_and_refuses_other_modes(tmp_path):
    m = Tiny()
    q = m.model.layers[0].self_attn.q_proj.weight
    rec = DynamicsRecorder(tmp_path / "sk", k=3, svd="fast")
    rec.record(m, 0)
    with torch.no_grad():
        q.add_(torch.randn(q.shape, generator=torch.Generator().manual_seed(3)) * 1e-2)
    rec.record(m, 1)
    rec.close()
    r = pd.read_csv(tmp_path / "sk" / "sketch.csv").set_index("tensor").loc["model.layers.0.self_attn.q_proj.weight"]
    d = q.detach().double().numpy() - Tiny().model.layers[0].self_attn.q_proj.weight.detach().double().numpy()
    s = np.linalg.svd(d, compute_uv=False)
    assert r["update_norm"] == pytest.approx(np.linalg.norm(d), rel=1e-9)
    assert r["energy_topk"] == pytest.approx((s[:3] ** 2).sum() / (s ** 2).sum(), rel=1e-3)
    with pytest.raises(InputError, match="svd must be certified or exact or fast"):
        DynamicsRecorder(tmp_path / "x", svd="lanczos")


def _planted(m: int, n: int, s: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((m, len(s))))[0]
    V = np.linalg.qr(rng.standard_normal((n, len(s))))[0]
    return (U * s) @ V.T


def test_the_warm_started_top_k_finds_a_planted_spectrum_over_steps(tmp_path):
    """ΔW_t = t·(a planted matrix of 24 known singular values) + small noise: the fast route's σ1 … σ8 agree with
    float64 numpy to 1e-6 relative from the first step and the exact route's to 1e-12; energies divide by the
    exact ‖ΔW‖F²."""
    m = Tiny()
    q = m.model.layers[0].self_attn.q_proj.weight
    up = m.model.layers[0].mlp.up_proj.weight
    planted = _planted(20, 12, np.geomspace(1.0, 1e-3, 12), 1)
    w0 = up.detach().double().numpy().copy()
    recs = {mode: DynamicsRecorder(tmp_path / mode, k=8, svd=mode) for mode in ("fast", "exact")}
    for r in recs.values():
        r.record(m, 0)
    for step in (1, 2, 3):
        with torch.no_grad():
            up.copy_(torch.tensor(w0 + 1e-2 * step * planted, dtype=torch.float32))
            q.add_(1e-3)
        for r in recs.values():
            r.record(m, step)
            r.wait()
        d = up.detach().double().numpy() - w0
        s = np.linalg.svd(d, compute_uv=False)
        name = "model.layers.0.mlp.up_proj.weight"
        for mode, tol in (("fast", 1e-6), ("exact", 1e-12)):
            sk = load_file(tmp_path / mode / f"step-{step:08d}.safetensors")
            np.testing.assert_allclose(sk[f"{name}::S"].double().numpy(), s[:8], rtol=max(tol, 1e-7))
            row = pd.read_csv(tmp_path / mode / "sketch.csv").set_index(["step", "tensor"]).loc[(step, name)]
            assert row["energy_topk"] == pytest.approx((s[:8] ** 2).sum() / (s ** 2).sum(), rel=1e-6)


def test_the_lockin_estimate_on_a_straight_line(tmp_path):
    """ΔW_t = t·A: every anchor's direction is the current one (cosine 1), so the estimate is the first anchor
    whose √(a/t) null leaves the 0.2 margin: none at t = 1, 2 (1 − √(1/2) = 0.29 ≥ 0.2 at t = 2: anchor 1), …"""
    m = Tiny()
    q = m.model.layers[0].self_attn.q_proj.weight
    step_dir = torch.tensor(_planted(10, 12, np.array([1.0, 0.5]), 2), dtype=torch.float32) * 1e-2
    rec = DynamicsRecorder(tmp_path / "sk", k=2, background=False)  # the scalars of each step as it returns
    rec.record(m, 0)
    got = {}
    for step in range(1, 9):
        with torch.no_grad():
            q.add_(step_dir)
        rec.record(m, step)
        got[step] = rec.scalars["dynamics/lockin_step"]
    assert np.isnan(got[1])  # no anchor before the first step
    # at t the anchors are 1, 2, 4 (< t); anchor 1 passes when 1 − √(1/t) ≥ 0.2, i.e. t ≥ 1.5625
    assert all(got[t] == 1.0 for t in range(2, 9))
    assert rec.scalars["dynamics/segment_cosine"] == pytest.approx(1.0, abs=1e-6)


def test_resume_continues_the_series_and_keeps_superseded_steps(tmp_path):
    """A run recorded to step 4 crashes; training resumes from its step-2 checkpoint: steps 3 and 4 are moved
    aside, the series continues from the model's weights with W_0 from base.safetensors, and reads back whole."""
    from opd_dynamics.io.sketches import SketchSeries

    m = Tiny()
    q = m.model.layers[0].self_attn.q_proj.weight
    g = torch.Generator().manual_seed(5)
    pushes = [torch.randn(q.shape, generator=g) * 1e-2 for _ in range(7)]
    w0 = q.detach().clone()
    rec = DynamicsRecorder(tmp_path / "sk", k=3)
    rec.record(m, 0)
    at_2 = None
    for step in range(1, 5):
        with torch.no_grad():
            q.add_(pushes[step - 1])
        rec.record(m, step)
        if step == 2:
            at_2 = q.detach().clone()
    rec.wait()
    del rec  # the crash: no close()
    with pytest.raises(InputError, match=r"already holds a sketch series \(sketch.json\); pass resume=True"):
        DynamicsRecorder(tmp_path / "sk", k=3)
    with torch.no_grad():
        q.copy_(at_2)  # training resumes from its checkpoint at step 2
    rec = DynamicsRecorder(tmp_path / "sk", k=3, resume=True)
    rec.record(m, 2)
    for step in (3, 4, 5):
        with torch.no_grad():
            q.add_(pushes[step + 1])
        rec.record(m, step)
    rec.close()
    assert sorted(p.name for p in (tmp_path / "sk" / "superseded").iterdir()) == [
        "step-00000003.safetensors", "step-00000004.safetensors"]
    s = SketchSeries(tmp_path / "sk")
    assert s.steps == [1, 2, 3, 4, 5]
    r = s.table[s.table["tensor"].str.contains("q_proj")].set_index("step")
    d = (q.detach().double() - w0.double()).numpy()
    assert r.loc[5, "update_norm"] == pytest.approx(np.linalg.norm(d), rel=1e-7)
    assert r.loc[3, "segment_norm"] == pytest.approx(float(pushes[4].double().norm()), rel=1e-5)
    assert np.isnan(r.loc[3, "segment_cosine"])  # the segment before the resume point is not known
    csv = pd.read_csv(tmp_path / "sk" / "sketch.csv")
    assert sorted(set(csv["step"])) == [1, 2, 3, 4, 5] and len(csv) == 5 * 4  # 2 matrices, the norm's 2 tensors


def test_bad_input_is_one_sentence_and_loses_no_step(tmp_path):
    from opd_dynamics.io.sketches import SketchSeries

    m = Tiny()
    rec = DynamicsRecorder(tmp_path / "late", k=2)
    with pytest.raises(InputError, match="cannot start recording at step 7: a new sketch series needs the start "
                                         "weights"):
        rec.record(m, 7)  # attached after training started
    rec = _recorded(tmp_path / "sk")
    with pytest.raises(InputError, match="step 2 comes after step 3 was recorded"):
        rec.record(m, 2)
    rec.close()

    class Other(Tiny):  # another model: a wider q_proj
        def __init__(self):
            super().__init__()
            self.model.layers[0].self_attn.q_proj = torch.nn.Linear(12, 14, bias=False)

    with pytest.raises(InputError, match=r"sk: was recorded from another model: its matrices differ from this "
                                         r"model's \(model.layers.0.self_attn.q_proj.weight\)"):
        DynamicsRecorder(tmp_path / "sk", k=2, resume=True).record(Other(), 3)
    far = Tiny()
    with torch.no_grad():
        for p in far.parameters():
            p.mul_(-1.0)  # same shapes, other weights
    with pytest.raises(InputError, match="was recorded from another model: this model's weights are 2.00 of W_0's"):
        DynamicsRecorder(tmp_path / "sk", k=2, resume=True).record(far, 3)
    assert SketchSeries(tmp_path / "sk").steps == [1, 2, 3]  # the refusals touched nothing
    (tmp_path / "sk" / "step-00000002.safetensors").unlink()
    with pytest.raises(InputError, match=r"step-00000002.safetensors: is missing: step 3 was recorded after step 2"):
        SketchSeries(tmp_path / "sk")


_DISK_FULL = """
import resource, signal, sys, torch
sys.path.insert(0, {tests!r})
from test_record import Tiny
from opd_dynamics.errors import InputError
from opd_dynamics.record import DynamicsRecorder
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
m = Tiny()
rec = DynamicsRecorder({out!r}, k=2, backlog_gb=0)  # the sketch's writes fail, not a backlog's
rec.record(m, 0)
for step in range(1, 100):
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.weight.add_(1e-3)
    try:
        rec.record(m, step)
    except InputError as e:
        print(step, e)
        break
"""


def test_a_full_disk_mid_series_is_one_sentence_and_keeps_every_written_step(tmp_path):
    """A real write failure (the file-size limit of the process, EFBIG, as a full disk gives ENOSPC) while
    sketch.csv grows: one sentence naming the output (from the worker process, at a later record call); every
    step file written stays, a cut CSV line is ignored, and a resumed recorder continues the series."""
    import subprocess
    import sys
    from pathlib import Path

    from opd_dynamics.io.sketches import SketchSeries

    out = tmp_path / "sk"
    code = _DISK_FULL.format(tests=str(Path(__file__).parent), limit=6000, out=str(out))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    step, _, msg = r.stdout.strip().partition(" ")
    assert msg.startswith(f"{out}: cannot be written: File too large") and "\n" not in msg
    s = SketchSeries(out)
    failed = int(step)  # the record() that raised: a step measured in the worker fails up to two calls later
    assert s.steps == list(range(1, s.steps[-1] + 1)) and failed - 2 <= s.steps[-1] <= failed
    m = Tiny()
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.weight.add_(1e-3 * s.steps[-1])
    rec = DynamicsRecorder(out, k=2, resume=True)
    rec.record(m, s.steps[-1])
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.weight.add_(1e-3)
    rec.record(m, s.steps[-1] + 1)
    rec.close()
    assert SketchSeries(out).steps == list(range(1, s.steps[-1] + 2))


def test_a_peft_lora_model_is_recorded_from_its_factors(tmp_path):
    """A tiny Llama with LoRA on q_proj and v_proj (PEFT), trained 3 SGD steps: the recorder follows the adapted
    layers under the merged model's names, from B and A (ΔW = s·B·A, never formed), and nothing else (the base is
    frozen); its norms, segment cosines and top triplets equal float64 numpy on the dense s·B·A."""
    from peft import LoraConfig, get_peft_model

    from builders import tiny_llama

    model = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, 67, (4, 8), generator=torch.Generator().manual_seed(0))
    rec = DynamicsRecorder(tmp_path / "sk", k=4)  # r = 4: the triplets hold the whole update
    rec.record(model, 0)
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    dense = {}
    for step in (1, 2, 3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        rec.record(model, step)
        dense[step] = 2.0 * (layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()).detach()
    rec.close()
    df = pd.read_csv(tmp_path / "sk" / "sketch.csv")
    assert sorted(set(df["tensor"])) == [f"model.layers.{i}.self_attn.{m}_proj.weight" for i in (0, 1) for m in "qv"]
    r = df[df["tensor"] == "model.layers.1.self_attn.q_proj.weight"].set_index("step")
    d = {s: v.numpy() for s, v in dense.items()}
    for s in (1, 2, 3):
        assert r.loc[s, "update_norm"] == pytest.approx(np.linalg.norm(d[s]), rel=1e-6)
        assert np.isnan(r.loc[s, "changed_fraction"])  # needs the dense update: not formed
    seg = (d[2] - d[1], d[3] - d[2])
    assert r.loc[3, "segment_cosine"] == pytest.approx(
        float((seg[0] * seg[1]).sum() / np.linalg.norm(seg[0]) / np.linalg.norm(seg[1])), abs=1e-5)
    assert r.loc[3, "cosine_to_previous"] == pytest.approx(
        float((d[3] * d[2]).sum() / np.linalg.norm(d[3]) / np.linalg.norm(d[2])), abs=1e-6)
    sk = load_file(tmp_path / "sk" / "step-00000003.safetensors")
    name = "model.layers.1.self_attn.q_proj.weight"
    S = sk[f"{name}::S"].double().numpy()
    np.testing.assert_allclose(S, np.linalg.svd(d[3], compute_uv=False)[:4], rtol=1e-5)
    U, V = sk[f"{name}::U"].double().numpy(), sk[f"{name}::V"].double().numpy()
    np.testing.assert_allclose((U * S) @ V.T, d[3], atol=1e-6 * np.abs(d[3]).max())
    # the start weights of an adapted layer: its base weight (B = 0 at PEFT's init); the base checkpoint checks out
    base = load_file(tmp_path / "sk" / "base.safetensors")
    assert torch.equal(base[name], layer.base_layer.weight.detach())
    from opd_dynamics.io.sketches import SketchSeries

    tiny_llama(0).save_pretrained(tmp_path / "base")
    SketchSeries(tmp_path / "sk").check_base(tmp_path / "base")  # base.safetensors' ::lora_*0 entries are no weights


def _trainer(model, out, callbacks, max_steps=4):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ids = torch.randint(0, 67, (8, 6), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, max_steps=max_steps,
                             learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="steps", save_steps=2,
                             use_cpu=True, disable_tqdm=True, data_seed=0, seed=0)
    return Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


def test_a_trainer_resumed_from_a_checkpoint_continues_the_series_and_a_fresh_recorder_is_refused(tmp_path):
    """A real Trainer recording 4 steps, checkpoints at 2 and 4; it is resumed from checkpoint-2: with
    resume=True the recorder continues at step 2 (steps 3 and 4 set aside, then recorded again); a fresh recorder
    attached to the resumed run (training started at step 2, W_0 gone) is refused in one sentence."""
    from opd_dynamics.io.sketches import SketchSeries
    from opd_dynamics.record import DynamicsCallback

    from builders import tiny_llama

    cb = DynamicsCallback(DynamicsRecorder(tmp_path / "sk", k=3))
    _trainer(tiny_llama(0), tmp_path / "out", [cb]).train()
    first = SketchSeries(tmp_path / "sk").table.set_index(["step", "tensor"])
    cb = DynamicsCallback(DynamicsRecorder(tmp_path / "sk", k=3, resume=True))
    _trainer(tiny_llama(0), tmp_path / "out", [cb]).train(resume_from_checkpoint=str(tmp_path / "out" /
                                                                                    "checkpoint-2"))
    s = SketchSeries(tmp_path / "sk")
    assert s.steps == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "sk" / "superseded").iterdir()) == [
        "step-00000003.safetensors", "step-00000004.safetensors"]
    again = s.table.set_index(["step", "tensor"])
    # the resumed run redoes steps 3 and 4 from the same weights and data order: the same updates
    np.testing.assert_allclose(again.loc[4, "update_norm"], first.loc[4, "update_norm"], rtol=1e-5)
    late = DynamicsCallback(DynamicsRecorder(tmp_path / "late", k=3))
    with pytest.raises(InputError, match="cannot start recording at step 2: a new sketch series needs the start "
                                         "weights"):
        _trainer(tiny_llama(0), tmp_path / "out", [late]).train(resume_from_checkpoint=str(
            tmp_path / "out" / "checkpoint-2"))
    assert not (tmp_path / "late").exists()


def test_the_cli_refuses_a_sketch_series_with_a_missing_step(tmp_path):
    import shutil

    from click.testing import CliRunner

    from opd_dynamics.cli import main

    _recorded(tmp_path / "sk").close()
    shutil.copytree(tmp_path / "sk", tmp_path / "holed")
    (tmp_path / "holed" / "step-00000003.safetensors").unlink()  # the last step: only sketch.csv knows it
    r = CliRunner().invoke(main, ["analyze", str(tmp_path / "holed"), "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and not (tmp_path / "out").exists()
    assert "step-00000003.safetensors: is missing: sketch.csv lists step 3" in r.output


def test_the_worker_process_works_beside_training_and_its_death_is_one_sentence(tmp_path):
    """By default the steps are measured in a worker process fed through a shared buffer that leaves nothing in
    /dev/shm; the same series as measured in the training process; a worker killed mid-run is one sentence at
    the next record, every step it finished kept."""
    from opd_dynamics.io.sketches import SketchSeries
    from opd_dynamics.record.buffer import SHM

    rec = _recorded(tmp_path / "bg")
    assert rec.worker is not None and rec.worker.proc.poll() is None
    assert rec.worker.buffer_path.parent == SHM and not rec.worker.buffer_path.exists()  # mapped, name gone
    if hasattr(os, "SCHED_IDLE"):  # the worker yields to training: it runs only where training leaves a core idle
        assert rec.worker.scheduling == "SCHED_IDLE"
        assert os.sched_getscheduler(rec.worker.proc.pid) == os.SCHED_IDLE
    rec.close()
    assert rec.worker is None
    _recorded(tmp_path / "fg", background=False).close()
    thread = _recorded(tmp_path / "th", background="thread")  # what weights kept on a GPU get
    assert thread.worker is None and thread._pool is not None
    thread.close()
    a, b, c = (SketchSeries(tmp_path / d).table for d in ("bg", "fg", "th"))
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(c, b)
    with pytest.raises(InputError, match="background must be True or False or process or thread, not 'yes'"):
        DynamicsRecorder(tmp_path / "x", background="yes")
    rec = _recorded(tmp_path / "killed")
    rec.wait()
    rec.worker.proc.kill()
    rec.worker.proc.wait()
    with pytest.raises(InputError, match=r"killed: the recorder's worker process ended \(exit -9\)"):
        rec.record(Tiny(), 4)
    rec.close()
    assert SketchSeries(tmp_path / "killed").steps == [1, 2, 3]


def test_a_backlog_lets_training_run_ahead_and_changes_no_number(tmp_path):
    """With a backlog the worker takes each step out of the shared buffer into a file of its own at once and
    measures it later: the same series as with none, the files gone once measured; the number of steps it may
    hold is the budget over the buffer's size; a backlog directory that is not one is one sentence."""
    from opd_dynamics.io.sketches import SketchSeries, step_file

    (tmp_path / "spool").mkdir()
    rec = _recorded(tmp_path / "ahead", backlog_gb=1e-5, backlog_dir=tmp_path / "spool")
    elements = 10 * 12 + 20 * 12 + 12 + 12  # q_proj, up_proj, the layer norm's weight and bias
    assert rec.worker.backlog == int(1e-5 * 2 ** 30 // (4 * elements)) == 6
    rec.close()
    _recorded(tmp_path / "none", backlog_gb=0).close()
    pd.testing.assert_frame_equal(SketchSeries(tmp_path / "ahead").table, SketchSeries(tmp_path / "none").table)
    for step in (1, 2, 3):  # the triplets too (the metadata differs only in what the work cost)
        a, b = (load_file(step_file(tmp_path / d, step)) for d in ("ahead", "none"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert list((tmp_path / "spool").iterdir()) == []  # the worker's backlog directory, removed at the end
    with pytest.raises(InputError, match=r"nowhere: is not a directory \(backlog_dir"):
        DynamicsRecorder(tmp_path / "x", backlog_dir=tmp_path / "nowhere")
    with pytest.raises(InputError, match="backlog_gb must be 0 or more"):
        DynamicsRecorder(tmp_path / "x", backlog_gb=-1)


def test_between_steps_the_matrices_are_shared_out_over_processes_and_change_no_number(tmp_path):
    """schedule="between": record waits for each step while the worker and its helpers (3 processes here) measure
    their shares of the tensors: the same table and triplets bit for bit as one process beside training, the
    helpers' CPU counted in the step's work; a helper killed is one sentence at the next record."""
    import signal

    from opd_dynamics.io.sketches import SketchSeries, step_file
    from opd_dynamics.record.shards import split

    rec = _recorded(tmp_path / "between", schedule="between", processes=3)
    assert rec.scheduling == "worker process at normal, 3 processes, backlog of 0 steps"
    assert not rec.worker.unanswered  # every step measured before record returned
    rec.close()
    _recorded(tmp_path / "beside", backlog_gb=0).close()
    a, b = (SketchSeries(tmp_path / d) for d in ("between", "beside"))
    pd.testing.assert_frame_equal(a.table, b.table)
    for step in (1, 2, 3):
        x, y = (load_file(step_file(tmp_path / d, step)) for d in ("between", "beside"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert (a.work["cpu_seconds"] > 0).all()
    # q_proj 10 × 12 costs 120·10, up_proj 20 × 12 240·12, the norm's weight and bias 12 each: longest first onto
    # the lightest share, each share in the series' order
    shapes = {"q": (10, 12), "up": (20, 12), "w": (12,), "b": (12,)}
    assert split(shapes, {"q", "up"}, 3) == [["up"], ["q"], ["w", "b"]]
    assert split(shapes, {"q", "up"}, 2) == [["up"], ["q", "w", "b"]]
    for kw, message in (({"schedule": "between", "background": "thread"}, "needs the worker process"),
                        ({"processes": 2}, "processes is for schedule='between'"),
                        ({"schedule": "between", "processes": 0}, "processes must be at least 1"),
                        ({"schedule": "after"}, "schedule must be beside or between")):
        with pytest.raises(InputError, match=message):
            DynamicsRecorder(tmp_path / "x", **kw)
    rec = _recorded(tmp_path / "killed", schedule="between", processes=2)
    pid = rec.worker.proc.pid
    children = open(f"/proc/{pid}/task/{pid}/children").read().split()  # multiprocessing's tracker, the helper
    helper = next(int(c) for c in children if b"spawn_main" in open(f"/proc/{c}/cmdline", "rb").read())
    os.kill(helper, signal.SIGKILL)
    with pytest.raises(InputError, match=r"killed: a helper process of the recorder's worker ended \(exit -9\)"):
        rec.record(Tiny(), 4)
    rec.close()
    assert SketchSeries(tmp_path / "killed").steps == [1, 2, 3]


def test_keeping_w0_in_its_stored_dtype_changes_no_number(tmp_path):
    """bf16 weights: W_0 kept as bf16 (half the memory) or as float32 gives the same series, since bf16 values are
    exact in float32."""
    from opd_dynamics.io.sketches import SketchSeries

    tables = []
    for keep in ("float32", "stored"):
        m = Tiny().to(torch.bfloat16)
        rec = DynamicsRecorder(tmp_path / keep, k=2, keep=keep, background=False)
        rec.record(m, 0)
        for step in (1, 2):
            with torch.no_grad():
                m.model.layers[0].self_attn.q_proj.weight.add_(1e-2)
            rec.record(m, step)
        if keep == "stored":
            assert rec.steps.matrices["model.layers.0.self_attn.q_proj.weight"].w0.dtype == torch.bfloat16
        rec.close()
        tables.append(SketchSeries(tmp_path / keep).table)
    pd.testing.assert_frame_equal(*tables)
    assert (tables[0]["update_norm"] > 0).any()


def _check_triplets(r, A: np.ndarray, want: np.ndarray, tol: float) -> None:
    """r's values against the known spectrum ``want`` (relative ``tol``), its vectors orthonormal and a singular
    pair of A each: the residuals A v_i − σ_i u_i (zero on the Krylov side) and Aᵀ u_i − σ_i v_i give back the
    certified bound."""
    S, U, V = (x.numpy() for x in (r.S, r.U, r.V))
    np.testing.assert_allclose(S, want, rtol=tol, atol=0)
    np.testing.assert_allclose(U.T @ U, np.eye(len(S)), atol=1e-12)
    np.testing.assert_allclose(V.T @ V, np.eye(len(S)), atol=1e-12)
    r1, r2 = np.linalg.norm(A @ V - U * S, axis=0), np.linalg.norm(A.T @ U - V * S, axis=0)
    assert (np.minimum(r1, r2) <= 1e-12 * want[0]).all()  # one side exact
    eps = np.hypot(r1, r2) / np.sqrt(2)  # the certified bound, recomputed here
    assert (eps <= r.bound * S * (1 + 1e-6) + 1e-13 * want[0]).all() and r.bound <= 5e-7


def test_the_certified_top_k_against_float64_svd_on_planted_spectra():
    """certified_topk on matrices of known spectrum (U diag(s) Vᵀ with orthonormal U, V): a decaying one, a top
    cluster of exactly equal values and one within 1e-9, a rank-1 update, a zero update; the values equal the
    planted ones (float64 numpy's SVD agrees with them) within the certified bound, which is at most 5e-7; a warm
    start from the previous step needs fewer products; a flat spectrum past the cap is not certified (the exact
    route takes over)."""
    from opd_dynamics.record.topk import certified_topk

    k = 6
    decaying = np.geomspace(3.0, 1e-3, 60)
    degenerate = np.concatenate([[2.0, 2.0, 2.0, 1.5, 1.5], np.geomspace(1.0, 1e-3, 55)])
    near = np.concatenate([[1.0, 1 - 1e-9, 1 - 2e-9, 0.9, 0.9 - 1e-9, 0.8], np.geomspace(0.5, 1e-3, 54)])
    for i, (s, shape) in enumerate(((decaying, (200, 120)), (degenerate, (90, 240)), (near, (150, 150)))):
        A = _planted(*shape, s, 10 + i)
        assert np.allclose(np.linalg.svd(A, compute_uv=False)[:len(s)], s, rtol=1e-12, atol=1e-14)
        r = certified_topk(torch.from_numpy(A), k, None, extra=6)
        _check_triplets(r, A, s[:k], 1e-6)
        if s is degenerate:  # the cluster's span is what is defined: U spans the planted top-3 left vectors
            Up = np.linalg.svd(A)[0][:, :3]
            assert np.linalg.norm(Up.T @ r.U.numpy()[:, :3]) ** 2 == pytest.approx(3.0, abs=1e-9)
    # rank 1: one triplet, the planted vectors
    rng = np.random.default_rng(0)
    u, v = rng.standard_normal(80), rng.standard_normal(50)
    A = 0.3 * np.outer(u, v)
    r = certified_topk(torch.from_numpy(A), k, None)
    assert r.S.numel() == 1 and float(r.S[0]) == pytest.approx(0.3 * np.linalg.norm(u) * np.linalg.norm(v),
                                                                 rel=1e-14)
    assert abs(r.U[:, 0].numpy() @ u) / np.linalg.norm(u) == pytest.approx(1.0, abs=1e-14)
    # zero: nothing kept
    z = certified_topk(torch.zeros(40, 30, dtype=torch.float64), k, None)
    assert z.S.numel() == 0 and z.bound == 0.0
    # a path ΔW_t = t·B + small noise: warm-started from the previous step, the same values with fewer products
    B = _planted(160, 128, np.geomspace(2.0, 1e-2, 100), 5)
    noise = rng.standard_normal((3, 160, 128)) * 1e-4
    start, products = None, []
    for t in (1, 2, 3):
        A = t * B + noise[t - 1]
        r = certified_topk(torch.from_numpy(A), k, start)
        _check_triplets(r, A, np.linalg.svd(A, compute_uv=False)[:k], 1e-6)
        start = r.basis
        products.append(r.products)
    assert products[2] < products[0]
    # a flat spectrum (Gaussian noise) that the capped basis cannot certify: None
    flat = rng.standard_normal((300, 300))
    r = certified_topk(torch.from_numpy(flat), 16, None, max_basis=48)
    assert not r.certified and r.S is None and r.columns <= 48 and r.bound > 5e-7


class Wide(torch.nn.Module):
    """Two 256 × 192 matrices the naming puts in attention and MLP: wide enough for the certified Krylov route
    (k = 4, blocks of 8, its basis capped at 48 columns)."""

    def __init__(self):
        super().__init__()
        layer = torch.nn.Module()
        layer.self_attn, layer.mlp = torch.nn.Module(), torch.nn.Module()
        layer.self_attn.q_proj = torch.nn.Linear(192, 256, bias=False)
        layer.mlp.up_proj = torch.nn.Linear(192, 256, bias=False)
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([layer])


def test_the_recorder_certifies_or_falls_back_to_the_exact_route(tmp_path):
    """q_proj moves along a planted decaying spectrum: certified by Krylov every step (svd_method
    certified-krylov-f64, sigma_bound ≤ 5e-7, warm-started); up_proj by flat noise the capped basis cannot certify:
    the exact route (exact-gram-f64, its rounding bound in sigma_bound), and after a failure the Krylov route waits
    (1, 2 … steps) rather than fail again every step. Both within 1e-6 of float64 numpy; each step file says what
    its work cost."""
    from opd_dynamics.io.sketches import SketchSeries

    m = Wide()
    q, up = m.model.layers[0].self_attn.q_proj.weight, m.model.layers[0].mlp.up_proj.weight
    q0, up0 = q.detach().double().numpy().copy(), up.detach().double().numpy().copy()
    planted = _planted(256, 192, np.geomspace(1.0, 1e-4, 12), 7)
    rng = np.random.default_rng(1)
    rec = DynamicsRecorder(tmp_path / "sk", k=4, oversample=4, background=False)
    rec.record(m, 0)
    flat = np.zeros((256, 192))
    for step in range(1, 5):
        flat += rng.standard_normal((256, 192)) * 1e-3
        with torch.no_grad():
            q.copy_(torch.tensor(q0 + 1e-2 * step * planted, dtype=torch.float32))
            up.copy_(torch.tensor(up0 + flat, dtype=torch.float32))
        rec.record(m, step)
    rec.close()
    s = SketchSeries(tmp_path / "sk")
    t = s.table.set_index(["tensor", "step"])
    qn, upn = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"
    # the first step has nothing to start from: the exact route, whose vectors start the Krylov route after it
    # (here the SVD: its planted values span 1e-4, more than the Gram route resolves)
    assert t.loc[qn, "svd_method"].tolist() == ["exact-svd-f64"] + ["certified-krylov-f64"] * 3
    assert (t.loc[qn, "sigma_bound"] <= 5e-7).all()
    assert (t.loc[upn, "svd_method"] == "exact-gram-f64").all()
    assert (t.loc[upn, "sigma_bound"] < 1e-10).all()  # the Gram route's a priori rounding bound
    trip = s.triplets(4)
    for name, w, w0 in ((qn, q, q0), (upn, up, up0)):
        d = w.detach().double().numpy() - w0
        np.testing.assert_allclose(trip[name][1].numpy(), np.linalg.svd(d, compute_uv=False)[:4], rtol=1e-6)
    work = s.work.set_index("step")
    assert (work["seconds"] > 0).all() and (work["cpu_seconds"] > 0).all()
    assert [r.get("krylov", 0) for r in work["routes"]] == [0, 1, 1, 1]
    assert [r["exact"] for r in work["routes"]] == [2, 1, 1, 1]
    # block products: q_proj's from step 2, and up_proj's failed tries (given up within the capped basis, or
    # earlier when the rate says it will not get there) at steps 2 and 4 only: after a failure the Krylov route
    # waits a step
    products = work["products"].tolist()  # [0, 8, 4, 8] here: q_proj's 4 warm
    assert products[0] == 0 and products[1] > products[2] < products[3] and products[2] <= 8

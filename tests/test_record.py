"""The recorder on planted updates: rank-1 steps give top-1 energy 1 and the planted vectors; norms, segment norms
and the changed fraction against float64 numpy; the schedule; files written atomically; nothing overwritten."""

from __future__ import annotations

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
    df = pd.read_csv(tmp_path / "sk" / "sketch.csv")
    assert list(df.columns) == TABLES["sketch"].names
    assert sorted(set(df["tensor"])) == ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    r = df[df["tensor"].str.contains("q_proj")].set_index("step")
    wt = q.detach().double().numpy()
    d = wt - w0
    assert r.loc[3, "update_norm"] == pytest.approx(np.linalg.norm(d), rel=1e-12)
    assert r.loc[3, "base_norm"] == pytest.approx(np.linalg.norm(w0), rel=1e-6)
    assert r.loc[3, "energy_topk"] == pytest.approx(1.0, abs=1e-9)  # rank 1: the top triplet holds it all
    assert r.loc[3, "spectral_norm"] == pytest.approx(np.linalg.svd(d, compute_uv=False)[0], rel=1e-9)
    changed = (np.abs(d) > 1e-3 * np.maximum(np.abs(w0), np.abs(wt))).mean()
    assert r.loc[3, "changed_fraction"] == pytest.approx(changed)
    seg = np.linalg.norm(np.outer(u, v) * 1e-2)
    assert r.loc[2, "segment_norm"] == pytest.approx(seg, rel=1e-5)  # float32 weights, float64 differences
    up = df[df["tensor"].str.contains("up_proj")]
    assert (up["update_norm"] == 0).all() and (up["k"] == 0).all()  # an unchanged matrix: nothing to keep
    sk = load_file(tmp_path / "sk" / "step-00000003.safetensors")
    U, S, V = (sk[f"model.layers.0.self_attn.q_proj.weight::{x}"].double().numpy() for x in "USV")
    assert U.shape == (10, 4) and V.shape == (12, 4) and S.shape == (4,)
    assert S[1] < 1e-5 * S[0]  # past the first: float32 rounding of the stored weights, nothing more
    assert abs(U[:, 0] @ (u / np.linalg.norm(u))) == pytest.approx(1.0, abs=1e-6)
    assert abs(V[:, 0] @ (v / np.linalg.norm(v))) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(S[0] * np.outer(U[:, 0], V[:, 0]), d, atol=1e-6)
    assert r.loc[3, "k"] == 4
    assert sorted(p.name for p in (tmp_path / "sk").iterdir()) == [
        "sketch.csv", "step-00000001.safetensors", "step-00000002.safetensors", "step-00000003.safetensors"]


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
    with pytest.raises(InputError, match="no 2-D weights in the groups embedding"):
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
    assert len(set(df["tensor"])) == 14 and (df["update_norm"] > 0).all()  # 2 layers × 7 matrices, all moved
    logged = [h for h in trainer.state.log_history if "dynamics/segment_norm" in h]
    assert [h["step"] for h in logged] == [1, 2, 3, 4]
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
    r = pd.read_csv(tmp_path / "sk" / "sketch.csv").set_index("tensor").loc["model.layers.0.self_attn.q_proj.weight"]
    d = q.detach().double().numpy() - Tiny().model.layers[0].self_attn.q_proj.weight.detach().double().numpy()
    s = np.linalg.svd(d, compute_uv=False)
    assert r["update_norm"] == pytest.approx(np.linalg.norm(d), rel=1e-9)
    assert r["energy_topk"] == pytest.approx((s[:3] ** 2).sum() / (s ** 2).sum(), rel=1e-3)
    with pytest.raises(InputError, match="svd must be exact or fast"):
        DynamicsRecorder(tmp_path / "x", svd="lanczos")

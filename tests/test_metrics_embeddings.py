"""embedding_metrics against the numpy reference: plain, resized vocabularies, token sets, bad rows."""

import math

import numpy as np
import pytest
import torch

import opd_dynamics.analysis.metrics.embeddings as emb
from opd_dynamics.analysis.metrics.embeddings import embedding_metrics
from opd_dynamics.errors import InputError

from reference import ref_embedding

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference_in_blocks(device, monkeypatch):
    monkeypatch.setattr(emb, "BLOCK_ROWS", 7)
    rng = np.random.default_rng(0)
    E0 = rng.standard_normal((100, 32))
    Et = E0 + 0.3 * rng.standard_normal((100, 32)) * rng.random((100, 1))
    ids = [3, 5, 99]
    got = embedding_metrics(torch.tensor(E0, device=device), torch.tensor(Et, device=device), ids)
    ref = ref_embedding(E0, Et, ids)
    assert got["n_rows"] == 100 and got["resized"] is False
    for key in ("cosine_mean", "cosine_p5", "cosine_min", "cosine_tokens_mean"):
        assert got[key] == pytest.approx(ref[key], rel=1e-10), key


def test_known_cosines_and_bf16():
    E0 = torch.zeros(4, 2)
    E0[:, 0] = 1.0
    angles = [0.0, 60.0, 90.0, 180.0]
    Et = torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles])
    got = embedding_metrics(E0, Et)
    assert got["cosine_mean"] == pytest.approx((1 + 0.5 + 0 - 1) / 4, abs=1e-7)
    assert got["cosine_min"] == pytest.approx(-1.0)
    assert math.isnan(got["cosine_tokens_mean"])
    same = embedding_metrics(E0.to(torch.bfloat16), E0.to(torch.bfloat16), [0, 1])
    assert same["cosine_mean"] == 1.0 and same["cosine_tokens_mean"] == 1.0


def test_resized_vocabulary_uses_common_rows():
    rng = np.random.default_rng(1)
    E0 = rng.standard_normal((50, 16))
    Et = np.vstack([E0[:50] * 2.0, rng.standard_normal((6, 16))])  # scaled rows: cosine 1
    got = embedding_metrics(torch.tensor(E0), torch.tensor(Et), token_ids=[1, 52])
    assert got["n_rows"] == 50 and got["resized"] is True
    assert got["cosine_mean"] == pytest.approx(1.0, abs=1e-12)
    assert got["cosine_tokens_mean"] == pytest.approx(1.0, abs=1e-12)  # id 52 is only in the new rows
    with pytest.raises(InputError, match="token ids"):
        embedding_metrics(torch.tensor(E0), torch.tensor(Et), token_ids=[56])


def test_zero_and_nan_rows():
    E0 = torch.ones(3, 4)
    Et = torch.ones(3, 4)
    E0[0] = 0.0
    Et[0] = 0.0  # both zero: unchanged
    Et[1] = 0.0  # one zero: cosine 0
    got = embedding_metrics(E0, Et)
    assert got["cosine_mean"] == pytest.approx((1 + 0 + 1) / 3)
    Et[2, 0] = math.nan
    assert math.isnan(embedding_metrics(E0, Et)["cosine_mean"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cpu_route_matches_reference_on_stored_dtypes(dtype):
    """float32 and bf16 tables on CPU take the one-pass kernel: same answer as float64 numpy on those values."""
    from opd_dynamics.numerics.fused import fused_row_stats

    rng = np.random.default_rng(3)
    E0 = torch.tensor(rng.standard_normal((300, 24)), dtype=dtype)
    Et = (E0.double() + 0.2 * torch.tensor(rng.standard_normal((300, 24)))).to(dtype)
    assert fused_row_stats(E0, Et) is not None
    got = embedding_metrics(E0, Et, [7, 9, 11])
    ref = ref_embedding(E0.double().numpy(), Et.double().numpy(), [7, 9, 11])
    for key in ("cosine_mean", "cosine_p5", "cosine_min", "cosine_tokens_mean"):
        assert got[key] == pytest.approx(ref[key], rel=1e-12), key
    Et[7] = 0.0  # one zero row: cosine 0
    E0[9] = 0.0
    Et[9] = 0.0  # both zero: cosine 1
    assert emb.row_cosines(E0, Et)[[7, 9]].tolist() == [0.0, 1.0]

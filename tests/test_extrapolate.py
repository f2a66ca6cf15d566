"""Every extrapolator against a float64 reference written from reading its authors' code (not copied from it), on a
tiny Qwen3-shaped series (q/k/v biases, q_norm/k_norm, an untied head, a tied head left out of the files and one
stored as an equal copy; steps 1, 3, 4, 9, 13, unevenly spaced): each as-published method equals its reference to
1e-6 on every tensor. Then the toolkit's variants, what docs/EXTRAPOLATION.md says of each difference, the registry,
and bad input (refused in one sentence, nothing written)."""

from __future__ import annotations

import json
import math
from collections import deque

import numpy as np
import pytest
import torch

from opd_dynamics.errors import InputError
from opd_dynamics.extrapolate import extrapolate
from opd_dynamics.extrapolate import methods as xm
from opd_dynamics.io.model_dir import ModelDir
from opd_dynamics.io.series import CheckpointSeries

from builders import write_dir

STEPS = (1, 3, 4, 9, 13)
SCORES = {1: 0.21, 3: 0.30, 4: 0.36, 9: 0.47, 13: 0.52}
H, KV, HD, INTER, VOCAB = 8, 4, 4, 12, 10
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
TOL = 1e-6


def qwen3_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {EMB: (VOCAB, H), "model.norm.weight": (H,)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (H, H), p + "self_attn.q_proj.bias": (H,),
                   p + "self_attn.k_proj.weight": (KV, H), p + "self_attn.k_proj.bias": (KV,),
                   p + "self_attn.v_proj.weight": (KV, H), p + "self_attn.v_proj.bias": (KV,),
                   p + "self_attn.o_proj.weight": (H, H), p + "self_attn.q_norm.weight": (HD,),
                   p + "self_attn.k_norm.weight": (HD,), p + "mlp.gate_proj.weight": (INTER, H),
                   p + "mlp.up_proj.weight": (INTER, H), p + "mlp.down_proj.weight": (H, INTER),
                   p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)}
    return shapes


def make_series(root, head: str = "untied", steps=STEPS, seed: int = 0) -> CheckpointSeries:
    """W_t = W_0 + (t/13)·D1 + (t/13)²·D2 + a random walk, every tensor moving; float32 files. ``head``: 'untied'
    (its own lm_head), 'tied' (tie_word_embeddings, no lm_head in the files) or 'tied-copy' (stored, equal)."""
    rng = np.random.default_rng(seed)
    shapes = qwen3_shapes()
    if head == "untied":
        shapes[HEAD] = (VOCAB, H)
    w0 = {n: rng.normal(size=s) * 0.3 + (1.0 if "norm" in n else 0.0) for n, s in shapes.items()}
    d1 = {n: rng.normal(size=s) * 0.05 for n, s in shapes.items()}
    d2 = {n: rng.normal(size=s) * 0.03 for n, s in shapes.items()}
    config = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "tie_word_embeddings": head != "untied"}

    def write(path, sd):
        sd = {n: torch.tensor(v, dtype=torch.float32) for n, v in sd.items()}
        if head == "tied-copy":
            sd[HEAD] = sd[EMB].clone()
        write_dir(path, sd, config=config)

    write(root / "base", w0)
    walk = {n: np.zeros(s) for n, s in shapes.items()}
    for t in steps:
        x = t / 13
        walk = {n: walk[n] + rng.normal(size=shapes[n]) * 0.004 for n in shapes}
        write(root / "run" / f"checkpoint-{t}", {n: w0[n] + x * d1[n] + x * x * d2[n] + walk[n] for n in shapes})
    return CheckpointSeries.discover(root / "run", base=root / "base", name="opd")


def load(path) -> dict[str, np.ndarray]:
    """A model directory as the authors' scripts see it, in float64."""
    with ModelDir(path) as m:
        return {n: m.get(n).double().numpy() for n in m.names()}


def weights(series: CheckpointSeries) -> tuple[dict, list[dict], np.ndarray, dict]:
    return (load(series.base), [load(p) for _, p in series.steps], np.array(series.step_numbers, float),
            json.loads((series.base / "config.json").read_text()))


def agree(out, ref: dict[str, np.ndarray], tol: float = TOL) -> None:
    """Every tensor of the output equals the reference to ``tol`` (and the two hold the same names)."""
    got = load(out)
    assert sorted(got) == sorted(ref)
    worst = {n: float(np.abs(got[n] - ref[n]).max()) for n in ref}
    bad = {n: w for n, w in worst.items() if not w <= tol}
    assert not bad, bad


# ---------------------------------------------------------------- references, written from the authors' code


def ref_expo(series, alpha):
    """ExPO code/extrapolate.py:33-35: for every dpo_model.named_parameters(): θ_dpo + α(θ_dpo − θ_sft); the SFT
    model is the run's base, the DPO model its last step. (A tied head shares the embedding's parameter.)"""
    w0, ws, _, _ = weights(series)
    b = ws[-1]
    return {n: b[n] + alpha * (b[n] - w0[n]) for n in b}


def ref_effopd(series, k=1, coef_step=2.0):
    """EffOPD fsdp_workers.py:1106-1191: W ← W + f(W − B) for parameters whose lowercased name contains one of the
    keywords of _should_modify_param; B, the anchor, is the weights of the previous trigger (power-of-two steps:
    t_B/2), the base before the first; f = 2k."""
    words = ["attn", "self_attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "mlp", "feed_forward", "ffn",
             "gate_proj", "up_proj", "down_proj"]
    w0, ws, t, _ = weights(series)
    before = [i for i in range(len(t) - 1) if t[i] <= t[-1] / 2]
    a = ws[before[-1]] if before else w0
    b = ws[-1]
    return {n: b[n] + coef_step * k * (b[n] - a[n]) if any(w in n.lower() for w in words) else b[n] for n in b}


def ref_rlvr(series, target):
    """RLVR-Linearity acceleration/weight_extrapolation.py:56, 84-126 with BASE_STEP 0 and SECOND_STEP the last
    step: keys of model_0.state_dict(); trainable (named_parameters: a tied head is the embedding's parameter, so
    its key is not trainable) and no norm keyword → W_0 + α(W_S − W_0), else W_S's. load_state_dict then loads the
    tied head's key (W_S's embedding) after the embedding, into the parameter they share."""
    w0, ws, t, cfg = weights(series)
    s = ws[-1]
    alpha = (target - 0) / (t[-1] - 0)
    tied = cfg["tie_word_embeddings"]
    out = {}
    for n in s:
        trainable = not (tied and n == HEAD)
        is_norm = any(k in n.lower() for k in ["layernorm", "rmsnorm", "ln_", "norm"])
        out[n] = w0[n] + alpha * (s[n] - w0[n]) if trainable and not is_norm else s[n]
    if tied:
        out[EMB] = s[EMB]
    return out


def _relex_fit(kind, C, degree):
    """fit_linear / fit_polynomial / fit_sin_fft (S:351-455) on positions 0 … T−1, as functions of the query."""
    T = len(C)
    t = np.arange(T, dtype=np.float64)
    fns = []
    for i in range(C.shape[1]):
        y = C[:, i]
        if kind == "linear":
            tc = t - t.mean()
            slope = np.sum(tc * (y - y.mean())) / np.sum(tc ** 2)
            fns.append(lambda q, a=slope, b=y.mean() - slope * t.mean(): a * q + b)
        elif kind == "polynomial":
            fns.append(np.poly1d(np.polyfit(t, y, degree)))
        else:
            from scipy.optimize import curve_fit

            def sin(x, A, f, phi, c):
                return A * np.sin(2 * np.pi * f * x + phi) + c
            c0, a0 = np.mean(y), 3 * np.std(y) / 2 ** 0.5
            f0 = np.fft.rfftfreq(T, d=t[1] - t[0])[np.argmax(np.abs(np.fft.rfft(y - c0)[1:])) + 1]
            try:
                p, _ = curve_fit(sin, t, y, p0=[a0, f0, 0.0, c0], maxfev=10000)
            except RuntimeError:
                p = (a0, f0, 0.0, c0)
            fns.append(lambda q, p=tuple(p), sin=sin: sin(q, *p))
    return lambda q: np.array([f(q) for f in fns])


def ref_relex(series, target, rank=1, fit="linear", degree=2, window=-1, future=-1, scale=1.0):
    """RELEX precompute_deltas.py + svd_extrapolation.py (mode extrapolate): per tracked tensor (every key of the
    base's files; lm_head left out when tie_word_embeddings) M = stacked Δ_t; its SVD's top r: V_r, C = M V_r;
    W = T or min(window, T); fit on C[−W:] against positions 0 … W−1 and query W − 1 + (round(target·scale) − t_n);
    with a future window F, one step at a time from t_n + 1 to the target, each prediction at position W appended to
    a W-long window and the fit redone every F steps. Output W_0 + ĉ V_rᵀ; a tied head = the predicted embedding;
    a tensor with no delta keeps W_0."""
    w0, ws, t, cfg = weights(series)
    tied = cfg["tie_word_embeddings"]
    out = {}
    for n in w0:
        if tied and n == HEAD:
            continue
        M = np.stack([w[n].reshape(-1) - w0[n].reshape(-1) for w in ws])
        U, S, Vt = np.linalg.svd(M, full_matrices=False)
        r = min(rank, len(t))
        V = np.stack([Vt[i] if S[i] > (S[0] * 1e-6 if S[0] > 0 else 1e-12) else 0 * Vt[i] for i in range(r)], 1)
        C = M @ V
        T = len(C)
        W = T if window == -1 else min(window, T)
        if future == -1:
            c_hat = _relex_fit(fit, C[-W:], degree)(W - 1 + (int(round(target * scale)) - t[-1]))
        else:
            buf, since, f = deque(list(C[-W:]), maxlen=W), future, None
            for _ in range(int(t[-1]) + 1, target + 1):
                if since >= future:
                    f, since = _relex_fit(fit, np.array(buf), degree), 0
                c_hat = f(W)
                buf.append(c_hat)
                since += 1
        out[n] = w0[n] + (c_hat @ V.T).reshape(w0[n].shape)
    if tied and HEAD in w0:
        out[HEAD] = out[EMB]
    return out


def _sklearn_pls1(X, y, y_predict):
    """PLSRegression(n_components=1) (scale=True, NIPALS power method) + LinearRegression + inverse_transform, as
    scikit-learn computes them (sklearn/cross_decomposition/_pls.py, linear_model)."""
    X, Y = X.astype(np.float64).copy(), y.reshape(-1, 1).astype(np.float64).copy()
    x_mean, y_mean = X.mean(0), Y.mean(0)
    X -= x_mean
    Y -= y_mean
    x_std, y_std = X.std(0, ddof=1), Y.std(0, ddof=1)
    x_std[x_std == 0] = 1.0
    y_std[y_std == 0] = 1.0
    X /= x_std
    Y /= y_std
    eps = np.finfo(np.float64).eps
    y_score = Y[:, 0]
    for _ in range(500):
        x_w = X.T @ y_score / (y_score @ y_score)
        x_w /= np.sqrt(x_w @ x_w) + eps
        x_score = X @ x_w
        y_w = Y.T @ x_score / (x_score @ x_score)
        y_score = Y @ y_w / (y_w @ y_w + eps)
        break  # a single target: one pass (Y.shape[1] == 1)
    x_w *= np.sign(x_w[np.argmax(np.abs(x_w))])
    x_scores = X @ x_w
    x_load = x_scores @ X / (x_scores @ x_scores)
    rot = x_w[:, None] @ np.linalg.pinv(x_load[None, :] @ x_w[:, None])
    proj = (X @ rot)  # transform(X): the training X, normalised again
    A = np.hstack([proj, np.ones((len(proj), 1))])
    (beta, b), *_ = np.linalg.lstsq(A, y, rcond=None)
    s_star = (y_predict - b) / beta
    return (np.array([[s_star]]) @ x_load[None, :]) * x_std + x_mean


def ref_alpharl(series, scores, y_predict, ckpt=None):
    """AlphaRL: svd.py (ΔW_s = W_s − W_base of each 2-D .weight under model.layers[i].self_attn / .mlp, full SVD),
    extract_rank1_au.py (a_s = U[:,0]·S[0]; from the last step back, a_s flipped if its cosine with the aligned later
    one is < 0), AlphaPredVector.py (PLS of the a_s against the scores, â at y_predict) and
    AlphaRLBuildPerdictModel.py (the step model W_k; update â v1ᵀ with v1 = Vt[0] of ΔW_k, negated if a_k was
    flipped, added to each such matrix)."""
    import re

    w0, ws, t, _ = weights(series)
    k = len(ws) - 1 if ckpt is None else list(t).index(ckpt)
    out = dict(ws[k])
    for n in w0:
        if not (w0[n].ndim == 2 and re.fullmatch(r"model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+\.weight", n)):
            continue
        svds = [np.linalg.svd(w[n] - w0[n], full_matrices=False) for w in ws]
        a = [U[:, 0] * S[0] for U, S, _ in svds]
        flipped = [False] * len(a)
        for i in range(len(a) - 2, -1, -1):
            cos = a[i] @ a[i + 1] / (np.linalg.norm(a[i]) * np.linalg.norm(a[i + 1]))
            if cos < 0:
                a[i], flipped[i] = -a[i], True
        pred = _sklearn_pls1(np.array(a), np.array(scores), y_predict)
        upd = pred.T @ svds[k][2][:1, :]
        out[n] = ws[k][n] + (-upd if flipped[k] else upd)
    return out


# ---------------------------------------------------------------- every method as published = its reference


HEADS = ("untied", "tied", "tied-copy")


@pytest.mark.parametrize("head", HEADS)
def test_expo_as_published_equals_its_reference(tmp_path, head):
    series = make_series(tmp_path, head)
    agree(extrapolate(series, None, tmp_path / "o", method="expo", alpha=0.5), ref_expo(series, 0.5))


@pytest.mark.parametrize("head", HEADS)
def test_effopd_as_published_equals_its_reference(tmp_path, head):
    series = make_series(tmp_path, head)
    agree(extrapolate(series, None, tmp_path / "o", method="effopd"), ref_effopd(series))
    agree(extrapolate(series, None, tmp_path / "k3", method="effopd", k=3), ref_effopd(series, k=3))
    one = xm.observed(series, [1, 3, 4])  # t_B = 4: A = step 1 (≤ 2), not the step before B
    agree(extrapolate(one, None, tmp_path / "a", method="effopd"), ref_effopd(one))


@pytest.mark.parametrize("head", HEADS)
def test_linear_as_published_equals_its_reference(tmp_path, head):
    series = make_series(tmp_path, head)
    ref = ref_rlvr(series, 30)
    agree(extrapolate(series, 30, tmp_path / "o", method="linear"), ref)
    w0, ws, _, _ = weights(series)
    bias, qnorm = "model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.q_norm.weight"
    assert not np.array_equal(ref[bias], ws[-1][bias]) and np.array_equal(ref[qnorm], ws[-1][qnorm])
    tied = head != "untied"
    assert np.array_equal(ref[EMB], ws[-1][EMB]) == tied  # moved only with an untied head


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("fields, ref", [
    ({}, {}),
    ({"rank": 2}, {"rank": 2}),
    ({"rank": 2, "fit": "polynomial", "degree": 2, "window": 4}, {"rank": 2, "fit": "polynomial", "window": 4}),
    ({"refit": 1}, {"future": 1}),
    ({"rank": 2, "fit": "polynomial", "refit": 3, "window": 3}, {"rank": 2, "fit": "polynomial", "future": 3,
                                                                 "window": 3}),
    ({"target_scale": 2.0}, {"scale": 2.0}),
])
def test_relex_as_published_equals_its_reference(tmp_path, monkeypatch, head, fields, ref):
    monkeypatch.setattr(xm, "BLOCK_BYTES", 1)  # one row per block
    series = make_series(tmp_path, head)
    target = 20
    agree(extrapolate(series, target, tmp_path / "o", method="relex", **fields), ref_relex(series, target, **ref))


def test_relex_sin_fft_equals_its_reference_where_the_fit_is_determined(tmp_path):
    """sin_fft on coefficients that are a sinusoid in the positions (8 evenly spaced steps, rank 1): curve_fit
    converges to the same parameters from both sides. (On four points and four parameters the fit is not determined
    and the last bits of the coefficients decide where curve_fit stops: the authors' run and the toolkit then differ
    by about 1e-4.)"""
    rng = np.random.default_rng(3)
    w0 = {"model.layers.0.mlp.up_proj.weight": rng.normal(size=(6, 5)), "model.norm.weight": np.ones(5)}
    v = {n: rng.normal(size=x.shape) * 0.1 for n, x in w0.items()}
    steps = range(1, 9)
    c = {s: 0.8 * np.sin(2 * np.pi * 0.15 * (s - 1) + 0.3) + 1.0 for s in steps}
    write_dir(tmp_path / "base", {n: torch.tensor(x, dtype=torch.float32) for n, x in w0.items()})
    for s in steps:
        write_dir(tmp_path / "run" / f"checkpoint-{s}",
                  {n: torch.tensor(w0[n] + c[s] * v[n], dtype=torch.float32) for n in w0})
    series = CheckpointSeries.discover(tmp_path / "run", base=tmp_path / "base")
    agree(extrapolate(series, 11, tmp_path / "o", method="relex", fit="sin_fft"),
          ref_relex(series, 11, fit="sin_fft"), tol=1e-5)


@pytest.mark.parametrize("head", HEADS)
def test_alpharl_as_published_equals_its_reference(tmp_path, head):
    series = make_series(tmp_path, head)
    csv = tmp_path / "scores.csv"
    csv.write_text("step,score\n" + "".join(f"{s},{y}\n" for s, y in SCORES.items()))
    y = [SCORES[s] for s in STEPS]
    agree(extrapolate(series, None, tmp_path / "o", method="alpharl", scores=str(csv), target_score=0.9),
          ref_alpharl(series, y, 0.9))
    agree(extrapolate(series, None, tmp_path / "k", method="alpharl", scores=SCORES, target_score=1.7, ckpt_step=4),
          ref_alpharl(series, y, 1.7, ckpt=4))


def test_alpharl_aligns_signs_and_the_reference_pls_is_scikit_learns():
    """The sign chain flips a step whose rank-1 vector points against the later one; the closed form of the
    toolkit's PLS equals the NIPALS reference and scikit-learn's own (AlphaRL calls it)."""
    from opd_dynamics.extrapolate.predict import pls1_predict

    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(5, 7)), np.array([0.1, 0.4, 0.35, 0.6, 0.8])
    np.testing.assert_allclose(pls1_predict(X, y, 1.7), _sklearn_pls1(X, y, 1.7)[0], rtol=1e-12, atol=1e-12)
    from sklearn.cross_decomposition import PLSRegression
    from sklearn.linear_model import LinearRegression

    pls = PLSRegression(n_components=1)
    proj = pls.fit_transform(X, y.reshape(-1, 1))[0]
    reg = LinearRegression().fit(proj, y)
    ref = pls.inverse_transform(((1.7 - reg.intercept_) / reg.coef_).reshape(1, -1))
    np.testing.assert_allclose(pls1_predict(X, y, 1.7), ref[0], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- the toolkit's variants, and the docs' claims


def _line(tmp_path, steps=(2, 4, 8), rank1=False):
    """A straight trajectory in the step: W_t = W_0 + t·m on one attention matrix; a norm moves as 1 + t."""
    rng = np.random.default_rng(0)
    q, norm = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight"
    w0 = rng.normal(size=(12, 20))
    m = np.outer(rng.normal(size=12), rng.normal(size=20)) * 1e-2 if rank1 else rng.normal(size=(12, 20)) * 1e-2
    one = torch.ones(20, dtype=torch.float64)
    write_dir(tmp_path / "base", {q: torch.tensor(w0), norm: one})
    for s in steps:
        write_dir(tmp_path / "run" / f"checkpoint-{s}", {q: torch.tensor(w0 + s * m), norm: one * (1 + s)})
    return CheckpointSeries.discover(tmp_path / "run", base=tmp_path / "base", name="opd"), w0, m, q, norm


@pytest.mark.parametrize("method, fields", [("linear", {}), ("linear", {"fit": "lstsq"}),
                                            ("relex", {"time": "steps"}), ("relex", {"time": "steps", "rank": 2}),
                                            ("rank1-growth", {}), ("last-segment", {})])
def test_a_straight_line_in_the_step_is_predicted_exactly(tmp_path, monkeypatch, method, fields):
    monkeypatch.setattr(xm, "BLOCK_BYTES", 1)
    series, w0, m, q, norm = _line(tmp_path, rank1=method == "rank1-growth")
    out = extrapolate(series, 20, tmp_path / "pred", method=method, **fields)
    got = load(out)
    np.testing.assert_allclose(got[q], w0 + 20 * m, rtol=0, atol=1e-13)
    with ModelDir(out) as d:
        assert d.metadata["extrapolation_method"] == method and d.metadata["extrapolation_target"] == "20"


def test_relex_positions_equal_step_numbers_only_one_step_apart(tmp_path):
    """docs: RELEX fits positions 0 … n−1 and queries (n−1) + (t* − t_n); that is the step-number line only when
    checkpoints are one step apart. With checkpoints 2, 4, 8 the straight line is missed."""
    series, w0, m, q, _ = _line(tmp_path / "a", steps=(1, 2, 3, 4))
    pos = load(extrapolate(series, 20, tmp_path / "p", method="relex"))[q]
    stp = load(extrapolate(series, 20, tmp_path / "s", method="relex", time="steps"))[q]
    np.testing.assert_allclose(pos, stp, atol=1e-13)
    np.testing.assert_allclose(pos, w0 + 20 * m, atol=1e-13)
    series, w0, m, q, _ = _line(tmp_path / "b", steps=(10, 20, 30))
    pos = load(extrapolate(series, 60, tmp_path / "p2", method="relex"))[q]
    # positions 0, 1, 2 carry 10 steps each; the query 2 + (60 − 30) counts steps: ĉ = c_30 + 30·(c_20 − c_10)
    np.testing.assert_allclose(pos, w0 + (30 + 30 * 10) * m, atol=1e-12)
    assert np.abs(pos - (w0 + 60 * m)).max() > 1.0


def test_relex_infers_the_authors_target_scaling_from_the_base_path(tmp_path):
    """docs: an unset target_scale is 2 when the base's path names Qwen2.5-Math-1.5B (their code's rule)."""
    series, w0, m, q, _ = _line(tmp_path / "Qwen2.5-Math-1.5B", steps=(1, 2, 3))
    got = load(extrapolate(series, 10, tmp_path / "p", method="relex"))[q]
    np.testing.assert_allclose(got, w0 + 20 * m, atol=1e-13)
    got = load(extrapolate(series, 10, tmp_path / "q", method="relex", target_scale=1.0))[q]
    np.testing.assert_allclose(got, w0 + 10 * m, atol=1e-13)


def test_what_each_published_rule_moves_and_what_the_others_become(tmp_path):
    """docs' table: expo moves everything; effopd also q/k biases, q/k norms and post_attention_layernorm, never the
    embedding, input_layernorm or the final norm; linear every name without 'norm' (biases, embedding, head),
    norms from the last step; relex every tensor, the rest at the base; alpharl the matrices of self_attn and mlp,
    everything else at the container step."""
    series = make_series(tmp_path, "untied")
    w0, ws, _, _ = weights(series)
    moved = {}
    for method, fields, target in (("expo", {"alpha": 0.5}, None), ("effopd", {}, None), ("linear", {}, 30),
                                   ("relex", {}, 30), ("alpharl", {"scores": SCORES, "target_score": 0.9}, None),
                                   ("rank1-growth", {}, 30), ("last-segment", {}, 30)):
        got = load(extrapolate(series, target, tmp_path / method, method=method, **fields))
        moved[method] = {n for n in got if not np.array_equal(got[n], ws[-1][n])}
    names = set(w0)
    p0 = "model.layers.0."
    assert moved["expo"] == names
    assert moved["effopd"] == {n for n in names if ("self_attn" in n or "mlp" in n or "post_attention" in n)}
    assert p0 + "self_attn.q_norm.weight" in moved["effopd"] and p0 + "input_layernorm.weight" not in moved["effopd"]
    assert moved["linear"] == {n for n in names if "norm" not in n}
    assert {EMB, HEAD, p0 + "self_attn.k_proj.bias"} <= moved["linear"]
    assert moved["relex"] == names
    mats = {n for n in names if w0[n].ndim == 2 and ("self_attn" in n or "mlp" in n)}
    assert moved["alpharl"] == mats
    assert moved["rank1-growth"] == mats == moved["last-segment"]


def test_select_groups_is_the_toolkit_rule_for_any_method(tmp_path):
    """select groups (implied by groups or matrices_only) moves the toolkit's attention and MLP matrices and keeps
    the method's own rule for what the rest becomes (relex: the base)."""
    series = make_series(tmp_path, "untied")
    w0, ws, _, _ = weights(series)
    got = load(extrapolate(series, 30, tmp_path / "r", method="relex", select="groups"))
    mats = {n for n in w0 if w0[n].ndim == 2 and ("self_attn" in n or "mlp" in n)}
    for n in w0:
        if n not in mats:
            np.testing.assert_array_equal(got[n], w0[n].astype(np.float32))  # RELEX keeps W_0 where nothing moves
    got = load(extrapolate(series, 30, tmp_path / "l", method="linear", groups=("mlp",)))
    assert {n for n in got if not np.array_equal(got[n], ws[-1][n])} == {n for n in mats if ".mlp." in n}
    with pytest.raises(InputError, match="groups and matrices_only apply with select groups"):
        xm.ExtrapolationOptions(method="relex", select="published", groups=("mlp",))
    with pytest.raises(InputError, match="select published applies to the authors' methods; rank1-growth"):
        xm.ExtrapolationOptions(method="rank1-growth", select="published")


# ---------------------------------------------------------------- the registry


def test_the_method_list_lives_in_the_registry_and_the_docs_table_is_made_from_it():
    from pathlib import Path

    from opd_dynamics.extrapolate.cli import extrapolate as command
    from opd_dynamics.extrapolate.registry import METHODS, METHODS_LIST, methods_table
    from opd_dynamics.lab.extrapolation import LAB_METHODS

    assert METHODS == tuple(m.name for m in METHODS_LIST)
    choices = next(p for p in command.params if p.name == "method").type.choices
    assert tuple(choices) == METHODS
    assert LAB_METHODS == tuple(m.name for m in METHODS_LIST if m.authors is not None)
    assert xm.MIN_STEPS == {m.name: m.min_steps for m in METHODS_LIST}
    doc = (Path(__file__).resolve().parents[1] / "docs" / "EXTRAPOLATION.md").read_text()
    assert methods_table() in doc, "docs/EXTRAPOLATION.md's table of methods is not registry.methods_table()"
    for m in METHODS_LIST:
        assert (m.authors is None) == (m.select is None)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("target, fields, phrase", [
    (8, {"method": "linear"}, "target step 8 must lie after the last observed step 8"),
    (20, {"method": "nope"}, "method must be one of"),
    (20, {"method": "linear", "fit": "linear"}, "fit 'linear' does not apply to method linear"),
    (20, {"method": "relex", "fit": "two-point"}, "fit 'two-point' does not apply to method relex"),
    (20, {"method": "expo", "fit": "lstsq"}, "fit does not apply to method expo"),
    (20, {"method": "expo", "alpha": 0.5}, "method expo takes no target step"),
    (None, {"method": "expo"}, "method expo needs alpha"),
    (None, {"method": "linear"}, "method linear needs a target step"),
    (20, {"method": "alpharl", "scores": {2: 0.1, 4: 0.2, 8: 0.3}, "target_score": 1.0},
     "method alpharl takes no target step"),
    (None, {"method": "alpharl"}, "method alpharl needs scores"),
    (None, {"method": "alpharl", "scores": {2: 0.1, 8: 0.3}, "target_score": 1.0}, "has no score for observed step 4"),
    (None, {"method": "alpharl", "scores": {2: 0.3, 4: 0.3, 8: 0.3}, "target_score": 1.0},
     "gives every observed step the same score"),
    (None, {"method": "alpharl", "scores": {2: 0.1, 4: float("nan"), 8: 0.3}, "target_score": 1.0},
     "not a finite number"),
    (None, {"method": "alpharl", "scores": {2: 0.1, 4: 0.2, 8: 0.3}, "target_score": 1.0, "ckpt_step": 3},
     "ckpt_step 3 is not an observed step"),
    (20, {"method": "relex", "rank": 4}, "rank 4 exceeds the 3 observed steps"),
    (20, {"method": "relex", "fit": "sin_fft"}, "needs at least 4 observed steps"),
    (20, {"method": "relex", "window": 2, "fit": "polynomial"}, "window 2 leaves 2 observed steps to fit"),
    (20, {"method": "relex", "time": "steps", "refit": 1}, "time steps .* takes neither refit"),
    (20, {"method": "relex", "refit": 1, "target_scale": 2.0}, "target_scale other than 1 does not apply with refit"),
])
def test_bad_input_is_one_sentence_and_writes_nothing(tmp_path, target, fields, phrase):
    series, *_ = _line(tmp_path)
    with pytest.raises(InputError, match=phrase):
        extrapolate(series, target, tmp_path / "out", **fields)
    assert not (tmp_path / "out").exists()


def test_too_few_steps_and_an_input_as_output_are_refused(tmp_path):
    series, *_ = _line(tmp_path)
    one = xm.observed(series, [8])
    with pytest.raises(InputError, match="needs at least 2 observed steps"):
        extrapolate(one, 20, tmp_path / "o", method="relex")
    with pytest.raises(InputError, match="needs at least 2 observed steps"):
        extrapolate(one, None, tmp_path / "o", method="alpharl", scores={8: 0.5}, target_score=1.0)
    with pytest.raises(InputError, match="overlaps the input"):
        extrapolate(series, 20, tmp_path / "run" / "checkpoint-8" / "x", method="linear")
    with pytest.raises(InputError, match="has no step 3"):
        xm.observed(series, [2, 3])


def test_the_extrapolate_command_predicts_from_a_run_and_refuses_mixed_forms(tmp_path):
    from click.testing import CliRunner

    from opd_dynamics.cli import main

    series, w0, m, q, _ = _line(tmp_path)
    r = CliRunner().invoke(main, ["extrapolate", str(tmp_path / "run"), "--base", str(tmp_path / "base"),
                                  "--target", "20", "--method", "linear", "--steps", "4,8", "--out",
                                  str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert "linear from steps 4, 8 to 20" in r.output
    np.testing.assert_allclose(load(tmp_path / "p")[q], w0 + 20 * m, atol=1e-13)
    (tmp_path / "s.csv").write_text("step,accuracy\n2,0.1\n4,0.3\n8,0.4\n")
    r = CliRunner().invoke(main, ["extrapolate", str(tmp_path / "run"), "--base", str(tmp_path / "base"),
                                  "--method", "alpharl", "--scores", str(tmp_path / "s.csv"), "--target-score", "0.9",
                                  "--out", str(tmp_path / "a")])
    assert r.exit_code == 0 and "alpharl from steps 2, 4, 8 at score 0.9" in r.output, r.output
    bad = CliRunner().invoke(main, ["extrapolate", str(tmp_path / "run"), "--prev", "a", "--out", str(tmp_path / "q")])
    assert bad.exit_code == 2 and "takes --prev, --cur and --coef together" in bad.output
    bad = CliRunner().invoke(main, ["extrapolate", str(tmp_path / "run"), "--base", str(tmp_path / "base"),
                                    "--method", "relex", "--target", "8", "--out", str(tmp_path / "q")])
    assert bad.exit_code == 2 and "--target step 8 must lie after the last observed step 8" in bad.output
    bad = CliRunner().invoke(main, ["extrapolate", str(tmp_path / "run"), "--base", str(tmp_path / "base"),
                                    "--method", "expo", "--alpha", "0.5", "--target", "20", "--out",
                                    str(tmp_path / "q")])
    assert bad.exit_code == 2 and "--method expo takes no --target step" in bad.output, bad.output


def test_steps_of_another_model_or_base_are_refused_naming_the_step(tmp_path):
    """Another architecture (config.json), a moved tensor of another shape, or weights as far from the base as an
    independent model (√2 of its norm) cannot be steps of a run from this base: one sentence, nothing written."""
    from builders import LLAMA_CONFIG

    series, w0, m, q, norm = _line(tmp_path)
    rng = np.random.default_rng(9)
    bad = tmp_path / "other" / "checkpoint-12"
    cases = [
        ({q: torch.tensor(w0 + 12 * m), norm: torch.ones(20, dtype=torch.float64)},
         {**LLAMA_CONFIG, "model_type": "mistral"},
         "is another model than the base.*its config model_type is mistral, the base's llama"),
        ({q: torch.tensor(np.zeros((12, 21))), norm: torch.ones(20, dtype=torch.float64)}, None,
         r"shape \(12, 21\), the base \(12, 20\)"),
        ({q: torch.tensor(rng.normal(size=(12, 20))), norm: torch.ones(20, dtype=torch.float64)}, None,
         "1.[0-9][0-9]× the base's norm away from the base"),
    ]
    for sd, config, phrase in cases:
        write_dir(bad, sd, config=config)
        mixed = CheckpointSeries.from_list([*series.steps, (12, bad)], base=series.base, name="opd")
        with pytest.raises(InputError, match=phrase) as e:
            extrapolate(mixed, 20, tmp_path / "out", method="linear")
        assert str(bad) in str(e.value)
        assert not (tmp_path / "out").exists()


def test_non_finite_weights_are_never_written(tmp_path):
    """A step holding NaN (moved or copied), or a prediction that overflows the stored dtype: one sentence naming
    the tensor, and no output."""
    series, w0, m, q, norm = _line(tmp_path)
    nan_q = (w0 + 8 * m).copy()
    nan_q[1, 2] = np.nan
    write_dir(tmp_path / "run" / "checkpoint-8", {q: torch.tensor(nan_q), norm: torch.ones(20, dtype=torch.float64)})
    with pytest.raises(InputError, match=rf"^{tmp_path / 'run' / 'checkpoint-8'}: holds NaN or Inf in {q!r}, so "
                                         rf"method linear predicts NaN or Inf for it; nothing was written"):
        extrapolate(series, 20, tmp_path / "out", method="linear")
    assert not (tmp_path / "out").exists()
    write_dir(tmp_path / "run" / "checkpoint-8", {q: torch.tensor(w0 + 8 * m),
                                                  norm: torch.full((20,), np.inf, dtype=torch.float64)})
    with pytest.raises(InputError, match=rf"^{tmp_path / 'run' / 'checkpoint-8'}: holds NaN or Inf in {norm!r}, "
                                         "which the output copies; nothing was written"):
        extrapolate(series, 20, tmp_path / "out", method="linear")  # RLVR-Linearity copies norms from W_S
    assert not (tmp_path / "out").exists()
    w32 = {q: torch.full((12, 20), 3e38, dtype=torch.float32), norm: torch.ones(20)}
    write_dir(tmp_path / "b32", w32)
    write_dir(tmp_path / "r32" / "checkpoint-8", {q: torch.full((12, 20), 3.3e38, dtype=torch.float32),
                                                  norm: torch.ones(20)})
    big = CheckpointSeries.discover(tmp_path / "r32", base=tmp_path / "b32", name="big")
    with pytest.raises(InputError, match=rf"^method expo predicts values beyond float32 for {q!r} \(up to 3.6e\+38\) "
                                         "for alpha 1; nothing was written"):
        extrapolate(big, None, tmp_path / "out", method="expo", alpha=1.0)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method, fields", [("rank1-growth", {}),
                                            ("alpharl", {"scores": {2: 0.1, 4: 0.2, 8: 0.4}, "target_score": 1.0})])
def test_rank1_methods_refuse_tensors_that_are_not_matrices(tmp_path, method, fields):
    """AlphaRL and the rank-1 growth move the rank-1 part of each matrix's update; --all-shapes asks them to move
    1-D norms too, which have none: one sentence before anything is read or written (it was a traceback)."""
    series, _, _, _, norm = _line(tmp_path)
    with pytest.raises(InputError, match=rf"^method {method} moves matrices only \(the rank-1 part of each update\), "
                                         rf"but matrices_only=False selects {norm!r} of shape \(20,\); "
                                         "leave out matrices_only=False"):
        extrapolate(series, 20 if method == "rank1-growth" else None, tmp_path / "out", method=method, groups=None,
                    matrices_only=False, **fields)
    assert not (tmp_path / "out").exists()


def test_a_selection_that_moves_nothing_is_refused(tmp_path):
    """No tensor of the last step selected: the output would be that step under the method's label."""
    series, *_ = _line(tmp_path)
    for method, fields, target in (("relex", {}, 20), ("expo", {"alpha": 0.5}, None)):
        with pytest.raises(InputError, match=rf"^{tmp_path / 'run' / 'checkpoint-8'}: has no float matrix in groups "
                                             rf"embedding for method {method} to move \(see groups and "
                                             r"matrices_only\); the output would be a copy of step 8"):
            extrapolate(series, target, tmp_path / "out", method=method, groups=("embedding",), **fields)
    with pytest.raises(InputError, match="has no float tensor that alpharl's published rule"):  # no self_attn/mlp
        write_dir(tmp_path / "x" / "base", {"model.norm.weight": torch.ones(3), "lm_head.weight": torch.ones(3, 3)})
        for s in (1, 2):
            write_dir(tmp_path / "x" / "run" / f"checkpoint-{s}", {"model.norm.weight": torch.ones(3) * s,
                                                                   "lm_head.weight": torch.ones(3, 3) * (1 + s / 10)})
        other = CheckpointSeries.discover(tmp_path / "x" / "run", base=tmp_path / "x" / "base")
        extrapolate(other, None, tmp_path / "out", method="alpharl", scores={1: 0.1, 2: 0.2}, target_score=1.0)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fields, phrase", [
    ({"method": "linear", "k": 3}, "k applies to method effopd, not linear"),
    ({"method": "effopd", "alpha": 2.0}, "alpha applies to method expo or last-segment, not effopd"),
    ({"method": "linear", "rank": 2}, "rank applies to method relex, not linear"),
    ({"method": "relex", "coef_step": 3.0}, "coef_step applies to method effopd, not relex"),
    ({"method": "relex", "degree": 3}, "degree applies to method relex with fit polynomial"),
    ({"method": "relex", "scores": "x.csv"}, "scores applies to method alpharl, not relex"),
    ({"method": "alpharl", "window": 3}, "window applies to method relex, not alpharl"),
])
def test_an_option_of_another_method_is_refused(tmp_path, fields, phrase):
    with pytest.raises(InputError, match=phrase):
        xm.ExtrapolationOptions(**fields)


def test_the_command_refuses_k_with_expo(tmp_path):
    from click.testing import CliRunner

    from opd_dynamics.cli import main

    _line(tmp_path)
    r = CliRunner().invoke(main, ["extrapolate", str(tmp_path / "run"), "--base", str(tmp_path / "base"),
                                  "--target", "20", "--method", "expo", "--k", "3", "--out", str(tmp_path / "p")])
    assert r.exit_code == 2 and r.output == "error: --k applies to --method effopd, not expo\n"
    assert not (tmp_path / "p").exists()


def test_the_two_checkpoint_form_refuses_the_methods_options(tmp_path):
    """--prev/--cur/--coef is one jump by --coef: --method, --k, --alpha … would be ignored there."""
    from click.testing import CliRunner

    from opd_dynamics.cli import main

    _line(tmp_path)
    jump = ["extrapolate", "--prev", str(tmp_path / "run" / "checkpoint-4"), "--cur",
            str(tmp_path / "run" / "checkpoint-8"), "--coef", "2", "--out", str(tmp_path / "j")]
    for extra, flag in ((["--k", "3"], "--k"), (["--method", "expo"], "--method"), (["--alpha", "1"], "--alpha")):
        r = CliRunner().invoke(main, [*jump, *extra])
        assert r.exit_code == 2 and r.output == (f"error: {flag} applies to the run form (RUN, --base, --target), "
                                                 "not to the two-checkpoint form (--prev, --cur, --coef)\n"), r.output
    assert not (tmp_path / "j").exists()
    r = CliRunner().invoke(main, [*jump, "--groups", "attention"])
    assert r.exit_code == 0, r.output


def test_scores_csv_is_read_by_step(tmp_path):
    series, *_ = _line(tmp_path)
    p = tmp_path / "eval.csv"
    p.write_text("run,step,accuracy\nopd,0,0.1\nopd,2,0.2\nopd,4,0.25\nopd,8,0.3\n")
    np.testing.assert_array_equal(xm.read_scores(str(p), [2, 4, 8]), [0.2, 0.25, 0.3])
    p.write_text("step,loss\n2,1\n")
    with pytest.raises(InputError, match="needs columns step and score"):
        xm.read_scores(str(p), [2])
    assert math.isfinite(xm.read_scores({2: 0.1, 4: 0.3}, [2, 4])[1])

"""Trajectory metrics (trajectory.csv, segments.csv) on planted trajectories with known answers, against the
float64 in-memory reference (tests/reference.py), streamed in row blocks as small as one row."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opd_dynamics.analysis import analyze, deltas
from opd_dynamics.analysis.metrics.trajectory import (
    NULL_DRAWS,
    NULL_MIN_DRAWS,
    TrajectoryAccumulator,
    cosine_null,
    locked_in,
    null_draws,
    random_walk_nulls,
)
from opd_dynamics.io.series import CheckpointSeries

from builders import write_dir
from reference import planted, ref_trajectory

Q = "model.layers.0.self_attn.q_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"
EXPERTS = "model.layers.0.mlp.experts.gate_up_proj"
STEPS = [1, 2, 4, 8, 16]


def _write(tmp_path, base: dict, per_step: dict[int, dict], dtype=torch.float32) -> CheckpointSeries:
    t = lambda d: {k: torch.tensor(v, dtype=dtype) for k, v in d.items()}  # noqa: E731
    write_dir(tmp_path / "base", t(base))
    for s, sd in per_step.items():
        write_dir(tmp_path / "run" / f"checkpoint-{s}", t(sd))
    return CheckpointSeries.discover(tmp_path / "run", base=tmp_path / "base", name="opd")


def _as_stored(x: np.ndarray, dtype=np.float32) -> np.ndarray:
    return x.astype(dtype).astype(np.float64)


def _series(tmp_path, kind: str, seed: int = 0):
    """kind 'line': W_t = W_0 + t·M (a straight, rank-1-in-time path); 'walk': independent increments;
    'curve': D_t = t·A + t²·B (straight in no sense, rank 2 in time)."""
    rng = np.random.default_rng(seed)
    base = {Q: rng.normal(size=(24, 40)) * 0.1, UP: rng.normal(size=(48, 24)) * 0.1,
            EXPERTS: rng.normal(size=(2, 16, 12)) * 0.1}
    A = {k: rng.normal(size=v.shape) * 1e-3 for k, v in base.items()}
    B = {k: rng.normal(size=v.shape) * 1e-4 for k, v in base.items()}
    walk = {k: np.zeros_like(v) for k, v in base.items()}
    states, prev = {}, 0
    for s in STEPS:
        for k in walk:
            walk[k] = walk[k] + rng.normal(size=base[k].shape) * 1e-3 * math.sqrt(s - prev)
        prev = s
        d = {"line": lambda k, s=s: s * A[k], "walk": lambda k: walk[k],
             "curve": lambda k, s=s: s * A[k] + s * s * B[k]}[kind]
        states[s] = {k: base[k] + d(k) for k in base}
    series = _write(tmp_path, base, states)
    b32 = {k: _as_stored(v) for k, v in base.items()}
    return series, {s: {k: _as_stored(v) - b32[k] for k, v in st.items()} for s, st in states.items()}


def _check_against_reference(rep, truth, tensors=(Q, UP)):
    traj, seg = rep.trajectory, rep.segments
    for name in tensors:
        summary, rows = ref_trajectory([truth[s][name] for s in STEPS], STEPS)
        got = traj[traj.tensor == name].iloc[0]
        assert int(got["step"]) == STEPS[-1] and int(got["n_steps"]) == len(STEPS)
        for k, v in summary.items():
            if k == "linear_r2_median":  # per-entry values are kept in float32 for the median
                assert got[k] == pytest.approx(v, abs=1e-6), k
            elif k != "n_steps":
                assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
        s = seg[seg.tensor == name].sort_values("step")
        assert list(s["step"]) == STEPS
        for r, (_, g) in zip(rows, s.iterrows()):
            for k in ("direction_cosine", "null_cosine", "direction_excess", "segment_cosine"):
                if np.isnan(r[k]):
                    assert np.isnan(g[k]), k
                else:
                    assert g[k] == pytest.approx(r[k], rel=1e-9, abs=1e-12), (k, r["step"])


def test_a_straight_line_is_straight_rank_one_and_linear(tmp_path):
    series, truth = _series(tmp_path, "line")
    rep = analyze(series, progress=False, svd="none")
    t = rep.trajectory.set_index("tensor")
    for name in (Q, UP):
        assert t.loc[name, "linear_r2"] == pytest.approx(1.0, abs=1e-9)
        assert t.loc[name, "linear_r2_median"] == pytest.approx(1.0, abs=1e-5)
        assert t.loc[name, "rank1_share"] == pytest.approx(1.0, abs=1e-9)
        assert int(t.loc[name, "lockin_step"]) == 1  # aligned with the final update from the first step
    s = rep.segments[rep.segments.tensor.isin([Q, UP])]
    assert np.allclose(s["direction_cosine"], 1.0, atol=1e-9)
    assert np.allclose(s["segment_cosine"].dropna(), 1.0, atol=1e-9)
    assert s.groupby("tensor")["segment_cosine"].apply(lambda x: x.isna().sum()).eq(1).all()  # none at T
    _check_against_reference(rep, truth)
    agg = rep.summary[rep.summary["aggregate"] == "trajectory"]
    last = agg[agg.step == STEPS[-1]].set_index(["group", "metric"])["value"]
    for g in ("attention", "mlp"):
        assert last[(g, "rank1_share")] == pytest.approx(1.0, abs=1e-9) and last[(g, "locked_in")] == 1.0
        assert last[(g, "lockin_step")] == 1.0
    seg_mean = agg[(agg.metric == "segment_cosine") & (agg.step < STEPS[-1])]["value"]
    assert np.allclose(seg_mean, 1.0, atol=1e-9)
    layer = rep.summary[(rep.summary["aggregate"] == "layer") & (rep.summary["metric"] == "linear_r2")]
    assert set(layer["group"]) == {"attention", "mlp"} and np.allclose(layer["value"], 1.0, atol=1e-9)


def test_a_random_walk_matches_the_reference_and_its_null(tmp_path):
    series, truth = _series(tmp_path, "walk", seed=3)
    rep = analyze(series, progress=False, svd="none")
    _check_against_reference(rep, truth)
    t = rep.trajectory.set_index("tensor")
    assert (t.loc[[Q, UP], "linear_r2"] < 0.9).all() and (t.loc[[Q, UP], "rank1_share"] < 0.9).all()
    s = rep.segments[rep.segments.tensor.isin([Q, UP])].dropna(subset=["segment_cosine"])
    assert s["segment_cosine"].abs().max() < 0.2  # independent increments: nearly orthogonal segments
    last = rep.segments[rep.segments.step == STEPS[-1]]
    assert np.allclose(last["direction_excess"], 0.0, atol=1e-12)


def test_streaming_in_one_row_blocks_equals_the_whole_and_experts_are_their_own(tmp_path, monkeypatch):
    series, truth = _series(tmp_path, "curve", seed=5)
    whole = analyze(series, progress=False, svd="none")
    monkeypatch.setattr(deltas, "TRAJECTORY_BLOCK_BYTES", 1)  # one row per block
    rows = analyze(series, progress=False, svd="none")
    for name in ("trajectory", "segments"):
        a, b = whole[name], rows[name]
        num = a.select_dtypes("number").columns.drop("linear_r2_median", errors="ignore")
        np.testing.assert_allclose(a[num].to_numpy(float), b[num].to_numpy(float), rtol=1e-12, atol=1e-15)
    _check_against_reference(rows, truth)
    t = rows.trajectory[rows.trajectory.tensor == EXPERTS].sort_values("expert")
    assert list(t["expert"]) == [0, 1]
    for e in (0, 1):
        summary, _ = ref_trajectory([truth[s][EXPERTS][e] for s in STEPS], STEPS)
        got = t[t.expert == e].iloc[0]
        assert got["rank2_share"] == pytest.approx(summary["rank2_share"], rel=1e-9)
        assert got["linear_r2"] == pytest.approx(summary["linear_r2"], rel=1e-9)


def test_a_single_step_has_no_trajectory_and_the_option_turns_it_off(tmp_path):
    series, _ = _series(tmp_path, "line")
    one = CheckpointSeries.from_list(series.steps[:1], base=series.base)
    assert "trajectory" not in analyze(one, progress=False, svd="none").tables
    assert "segments" not in analyze(series, progress=False, svd="none", trajectory=False).tables


def test_the_accumulator_refuses_steps_that_do_not_increase():
    with pytest.raises(ValueError, match="increasing"):
        TrajectoryAccumulator([2, 2, 4])
    with pytest.raises(ValueError, match="positive"):
        TrajectoryAccumulator([0, 1])


def test_lockin_waits_for_alignment_above_the_null():
    """D_t = noise_t (orthogonal, early) + t·M: direction_cosine rises with t; lock-in is the first step where it
    is ≥ 0.5 and 0.2 above its random-walk null."""
    rng = np.random.default_rng(7)
    M = planted(30, 20, np.array([1.0]), rng)
    steps = [1, 2, 4, 8, 16, 32]
    ds = [t * M / 32 + rng.normal(size=M.shape) * 0.005 for t in steps]
    acc = TrajectoryAccumulator(steps)
    acc.add(np.stack([d.reshape(-1) for d in ds]))
    summary, rows = acc.result(0.5, 0.2)
    expect = next((r["step"] for r in rows if r["direction_cosine"] >= 0.5 and r["direction_excess"] >= 0.2), None)
    assert summary["lockin_step"] == expect and expect is not None and expect > 1
    ref, _ = ref_trajectory(ds, steps)
    assert summary["rank1_share"] == pytest.approx(ref["rank1_share"], rel=1e-12)


def test_spectra_groups_none_means_every_group(tmp_path):
    """spectra_groups=None (--spectra-groups all) reaches every matrix; it used to fail every tensor."""
    series, _ = _series(tmp_path, "line")
    rep = analyze(series, progress=False, svd="none", spectra_groups=None)
    assert rep.meta["failed"] == [] and set(rep.trajectory["tensor"]) >= {Q, UP}


# ------------------------------------------------------------------------------ the nulls (docs/METRICS.md)


def _walk(seg_norms, numel: int, seed: int) -> np.ndarray:
    """A random walk in R^numel: D_i = Σ_{j≤i} ‖δ_j‖ u_j, u_j independent uniformly random unit vectors."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((len(seg_norms), numel))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return np.cumsum(np.asarray(seg_norms, dtype=float)[:, None] * u, axis=0)


def _accumulate(D: np.ndarray, steps) -> tuple[dict, list[dict]]:
    acc = TrajectoryAccumulator(steps)
    acc.add(D)
    return acc.result()


def test_the_cosine_null_of_equal_segments_is_the_square_root_of_t_over_t():
    steps = np.arange(1, 16)
    np.testing.assert_allclose(cosine_null(np.full(15, 3.7)), np.sqrt(steps / 15), rtol=1e-15)
    # a walk of equal segments at steps 10, 20, … 150, through the accumulator
    _, rows = _accumulate(_walk(np.ones(15), 4096, 0), list(steps * 10))
    np.testing.assert_allclose([r["null_cosine"] for r in rows], np.sqrt(steps / 15), rtol=1e-12)
    # unequal segments: sqrt(Σ_{i≤t}‖δ_i‖² / Σ‖δ_i‖²), by hand
    np.testing.assert_allclose(cosine_null([4.0, 1.0, 1.0, 4.0]), np.sqrt(np.array([4, 5, 6, 10]) / 10), rtol=1e-15)
    assert np.isnan(cosine_null([0.0, 0.0])).all()


def test_a_straight_line_is_above_every_null():
    """D_t = t·M at steps 1, 2, 4, 8, 16: segments of norm ∝ 1, 1, 2, 4, 8, so the cosine null is
    sqrt(1, 2, 6, 22, 86 / 86), below √(t/T); the line's cosine 1 is above it before T, its rank-1 share and R²
    (both 1) above their walks' nulls."""
    rng = np.random.default_rng(2)
    M = rng.normal(size=2048)
    summary, rows = _accumulate(np.stack([t * M for t in STEPS]), STEPS)
    np.testing.assert_allclose([r["null_cosine"] for r in rows], np.sqrt(np.array([1, 2, 6, 22, 86]) / 86),
                               rtol=1e-12)
    assert all(r["direction_cosine"] == pytest.approx(1.0) for r in rows)
    assert all(r["direction_excess"] > 0.45 for r in rows[:-1]) and rows[-1]["direction_excess"] == pytest.approx(0)
    assert summary["rank1_share"] == pytest.approx(1.0) and summary["rank1_share_null"] < 0.9
    assert summary["linear_r2"] == pytest.approx(1.0) and summary["linear_r2_null"] < 0.8
    assert summary["linear_r2_median_null"] < summary["linear_r2_median"]
    assert summary["rank5_share_null"] == pytest.approx(1.0)  # 5 steps: 5 components hold everything


def test_a_random_walk_sits_on_its_nulls_and_fast_then_slow_is_no_lockin():
    """A walk whose segments shrink as 1/i (fast, then slow, as Adam's path is): its direction cosine follows
    sqrt(Σ_{i≤t}‖δ_i‖²/Σ‖δ_i‖²), far above √(t/T) early; rank-1 share and R² sit on their simulated nulls. It never
    locks in, where the √(t/T) null would have called it locked in early."""
    norms = 1.0 / np.arange(1, 16)
    steps = list(range(10, 160, 10))
    summary, cos, null = [], [], []
    for seed in range(8):
        s, r = _accumulate(_walk(norms, 16384, seed), steps)
        summary.append(s)
        cos.append([x["direction_cosine"] for x in r])
        null.append([x["null_cosine"] for x in r])
        assert s["lockin_step"] is None
    cos, null = np.mean(cos, axis=0), np.mean(null, axis=0)
    np.testing.assert_allclose(cos, null, atol=0.02)
    old = np.sqrt(np.array(steps) / steps[-1])
    assert ((cos >= 0.5) & (cos - old >= 0.2)).any()  # the equal-segment null would see a lock-in here
    for k in ("rank1_share", "rank2_share", "linear_r2", "linear_r2_median"):
        got = np.mean([s[k] for s in summary])
        assert got == pytest.approx(summary[0][f"{k}_null"], abs=0.02), k


def test_the_simulated_nulls_are_exact_for_few_entries_and_reproducible():
    """The Wishart (Bartlett) draw of a walk's Gram equals brute-force walks in R^numel, also when numel is
    close to the number of steps (where the spread is large); the same inputs give the same nulls."""
    norms = np.array([3.0, 2.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.5])
    steps = list(range(1, 9))
    t = np.arange(0.0, 9.0)
    X = np.stack([np.ones_like(t), t], axis=1)
    for numel in (9, 40):
        fast = random_walk_nulls(norms ** 2, steps, numel, draws=4000)
        rng = np.random.default_rng(numel)
        u = rng.standard_normal((3000, len(norms), numel))
        D = np.cumsum(norms[None, :, None] * u / np.linalg.norm(u, axis=2, keepdims=True), axis=1)
        lam = np.linalg.eigvalsh(D @ D.transpose(0, 2, 1))[:, ::-1]  # (walks, n): the Gram's eigenvalues
        Y = np.concatenate([np.zeros((3000, 1, numel)), D], axis=1)  # the base's point first
        res = Y - X @ np.linalg.lstsq(X, Y.transpose(1, 0, 2).reshape(9, -1), rcond=None)[0].reshape(
            2, 3000, numel).transpose(1, 0, 2)
        tot = Y - Y.mean(axis=1, keepdims=True)
        brute = {"rank1_share": lam[:, 0] / lam.sum(1), "rank2_share": lam[:, :2].sum(1) / lam.sum(1),
                 "linear_r2": 1 - (res ** 2).sum((1, 2)) / (tot ** 2).sum((1, 2))}
        for k, v in brute.items():
            assert fast[f"{k}_null"] == pytest.approx(v.mean(), abs=0.01), (numel, k)
    assert random_walk_nulls(norms ** 2, steps, 40) == random_walk_nulls(norms ** 2, steps, 40)
    few = random_walk_nulls(norms ** 2, steps, 3)  # fewer entries than steps: vectors drawn directly
    assert few["rank3_share_null"] == pytest.approx(1.0)
    assert all(math.isnan(v) for v in random_walk_nulls(np.zeros(4), [1, 2, 3, 4], 10).values())
    assert null_draws(15) == NULL_DRAWS and null_draws(1000) == NULL_MIN_DRAWS


def test_the_lockin_rule_is_one_function():
    assert locked_in(0.8, 0.5) and not locked_in(0.8, 0.7) and not locked_in(0.45, 0.0)
    assert locked_in(0.5, 0.3) and not locked_in(math.nan, 0.0) and not locked_in(0.9, math.nan)

"""Every extrapolator against its float64 definition on planted trajectories written as real checkpoints: a
straight line is predicted exactly by all of them (AlphaRL on a rank-1 line), streamed in row blocks as
small as one row; a random walk matches an in-memory float64 reference; bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opd_dynamics.errors import InputError
from opd_dynamics.extrapolate import extrapolate
from opd_dynamics.extrapolate import methods as xm
from opd_dynamics.io.model_dir import ModelDir
from opd_dynamics.io.series import CheckpointSeries

from builders import write_dir

Q = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"
STEPS = (2, 4, 8)
TARGET = 20


def _series(tmp_path, deltas: dict[int, np.ndarray], w0: np.ndarray) -> CheckpointSeries:
    norm = torch.ones(w0.shape[1], dtype=torch.float64)
    write_dir(tmp_path / "base", {Q: torch.tensor(w0), NORM: norm})
    for s, d in deltas.items():
        write_dir(tmp_path / "run" / f"checkpoint-{s}", {Q: torch.tensor(w0 + d), NORM: norm * (1 + s)})
    return CheckpointSeries.discover(tmp_path / "run", base=tmp_path / "base", name="opd")


def _read(path) -> dict[str, np.ndarray]:
    with ModelDir(path) as m:
        return {n: m.get(n).numpy() for n in m.names()}


def _line(tmp_path, rank1: bool = False):
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(12, 20))
    m = np.outer(rng.normal(size=12), rng.normal(size=20)) * 1e-2 if rank1 else rng.normal(size=(12, 20)) * 1e-2
    return _series(tmp_path, {s: s * m for s in STEPS}, w0), w0, m


@pytest.mark.parametrize("method, fields", [("expo", {}), ("linear", {}), ("linear", {"fit": "lstsq"}),
                                            ("relex", {}), ("relex", {"rank": 2}), ("alpharl", {})])
def test_a_straight_line_is_predicted_exactly(tmp_path, monkeypatch, method, fields):
    monkeypatch.setattr(xm, "BLOCK_BYTES", 1)  # one row per block
    series, w0, m = _line(tmp_path, rank1=method == "alpharl")
    out = extrapolate(series, TARGET, tmp_path / "pred", method=method, **fields)
    got = _read(out)
    np.testing.assert_allclose(got[Q], w0 + TARGET * m, rtol=0, atol=1e-13)
    assert np.array_equal(got[NORM], np.ones(20) * (1 + STEPS[-1]))  # not selected: the last step's
    with ModelDir(out) as d:
        assert d.metadata["extrapolation_method"] == method and d.metadata["extrapolation_target"] == str(TARGET)


def test_effopd_k_and_expo_alpha_are_the_jump_they_name(tmp_path):
    series, w0, m = _line(tmp_path)
    got = _read(extrapolate(series, 100, tmp_path / "e", method="effopd", k=3))[Q]
    np.testing.assert_allclose(got, w0 + 8 * m + 6 * (4 * m), atol=1e-13)  # W_B + 2k(W_B − W_A), k = 3
    got = _read(extrapolate(series, 100, tmp_path / "x", method="expo", alpha=0.5))[Q]
    np.testing.assert_allclose(got, w0 + 8 * m + 0.5 * (4 * m), atol=1e-13)
    one = xm.observed(series, [8])  # one observed step: A is the base (ExPO's θ_B + α(θ_B − θ_start))
    got = _read(extrapolate(one, 100, tmp_path / "x1", method="expo", alpha=0.5))[Q]
    np.testing.assert_allclose(got, w0 + 8 * m + 0.5 * (8 * m), atol=1e-13)
    got = _read(extrapolate(one, 20, tmp_path / "x2", method="expo"))[Q]  # default α continues to the target
    np.testing.assert_allclose(got, w0 + 20 * m, atol=1e-13)
    got = _read(extrapolate(one, 100, tmp_path / "e1", method="effopd", k=1))[Q]
    np.testing.assert_allclose(got, w0 + 8 * m + 2 * (8 * m), atol=1e-13)


def test_a_random_walk_matches_the_float64_reference(tmp_path):
    rng = np.random.default_rng(4)
    w0 = rng.normal(size=(10, 14))
    steps = (1, 2, 3, 5, 8)
    walk, deltas = np.zeros_like(w0), {}
    for s in steps:
        walk = walk + rng.normal(size=w0.shape) * 1e-2
        deltas[s] = walk.copy()
    series = _series(tmp_path, deltas, w0)
    t, tt = np.array(steps, float), 13.0
    D = np.stack([deltas[s].reshape(-1) for s in steps])
    # RELEX rank 2, linear fit of each coefficient in t
    u, sig, vt = np.linalg.svd(D, full_matrices=False)
    pred = np.zeros(D.shape[1])
    for j in range(2):
        a, b = np.polyfit(t, u[:, j] * sig[j], 1)
        pred += (a * tt + b) * vt[j]
    got = _read(extrapolate(series, 13, tmp_path / "r", method="relex", rank=2))[Q]
    np.testing.assert_allclose(got, w0 + pred.reshape(w0.shape), rtol=1e-10, atol=1e-13)
    # per-entry least squares through the base and every step
    ts = np.concatenate([[0.0], t])
    Y = np.vstack([np.zeros(D.shape[1]), D])
    a, b = np.polyfit(ts, Y, 1)
    got = _read(extrapolate(series, 13, tmp_path / "l", method="linear", fit="lstsq"))[Q]
    np.testing.assert_allclose(got, w0 + (a * tt + b).reshape(w0.shape), rtol=1e-10, atol=1e-13)
    # AlphaRL: the rank-1 part of D_n scaled to its norm, grown to t*
    U, S, Vt = np.linalg.svd(deltas[8])
    ref = w0 + (tt / 8) * np.linalg.norm(deltas[8]) * np.outer(U[:, 0], Vt[0])
    got = _read(extrapolate(series, 13, tmp_path / "a", method="alpharl"))[Q]
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("target, fields, phrase", [
    (8, {}, "target step 8 must lie after the last observed step 8"),
    (20, {"method": "nope"}, "method must be one of"),
    (20, {"method": "expo", "fit": "lstsq"}, "fit does not apply to method expo"),
    (20, {"method": "relex", "fit": "two-point"}, "fit 'two-point' does not apply to method relex"),
])
def test_bad_input_is_one_sentence_and_writes_nothing(tmp_path, target, fields, phrase):
    series, _, _ = _line(tmp_path)
    with pytest.raises(InputError, match=phrase):
        extrapolate(series, target, tmp_path / "out", **fields)
    assert not (tmp_path / "out").exists()


def test_too_few_steps_and_an_input_as_output_are_refused(tmp_path):
    series, _, _ = _line(tmp_path)
    one = xm.observed(series, [8])
    with pytest.raises(InputError, match="needs at least 2 observed steps"):
        extrapolate(one, 20, tmp_path / "o", method="relex")
    with pytest.raises(InputError, match="overlaps the input"):
        extrapolate(series, 20, tmp_path / "run" / "checkpoint-8" / "x", method="linear")
    with pytest.raises(InputError, match="has no step 3"):
        xm.observed(series, [2, 3])


def test_the_extrapolate_command_predicts_from_a_run_and_refuses_mixed_forms(tmp_path):
    from click.testing import CliRunner

    from opd_dynamics.cli import main

    series, w0, m = _line(tmp_path)
    r = CliRunner().invoke(main, ["extrapolate", str(tmp_path / "run"), "--base", str(tmp_path / "base"),
                                  "--target", "20", "--method", "linear", "--steps", "4,8", "--out",
                                  str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert "linear from steps 4, 8 to 20" in r.output
    np.testing.assert_allclose(_read(tmp_path / "p")[Q], w0 + 20 * m, atol=1e-13)
    bad = CliRunner().invoke(main, ["extrapolate", str(tmp_path / "run"), "--prev", "a", "--out", str(tmp_path / "q")])
    assert bad.exit_code == 2 and "takes --prev, --cur and --coef together" in bad.output
    bad = CliRunner().invoke(main, ["extrapolate", str(tmp_path / "run"), "--base", str(tmp_path / "base"),
                                    "--target", "8", "--out", str(tmp_path / "q")])
    assert bad.exit_code == 2 and "--target step 8 must lie after the last observed step 8" in bad.output


def test_steps_of_another_model_or_base_are_refused_naming_the_step(tmp_path):
    """Another architecture (config.json), a moved tensor of another shape, or weights as far from the base as an
    independent model (√2 of its norm) cannot be steps of a run from this base: one sentence, nothing written."""
    from builders import LLAMA_CONFIG

    series, w0, m = _line(tmp_path)
    rng = np.random.default_rng(9)
    bad = tmp_path / "other" / "checkpoint-12"
    cases = [
        ({Q: torch.tensor(w0 + 12 * m), NORM: torch.ones(20, dtype=torch.float64)},
         {**LLAMA_CONFIG, "model_type": "mistral"},
         "is another model than the base.*its config model_type is mistral, the base's llama"),
        ({Q: torch.tensor(np.zeros((12, 21))), NORM: torch.ones(20, dtype=torch.float64)}, None,
         r"shape \(12, 21\), the base \(12, 20\)"),
        ({Q: torch.tensor(rng.normal(size=(12, 20))), NORM: torch.ones(20, dtype=torch.float64)}, None,
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
    series, w0, m = _line(tmp_path)
    nan_q = (w0 + 8 * m).copy()
    nan_q[1, 2] = np.nan
    write_dir(tmp_path / "run" / "checkpoint-8", {Q: torch.tensor(nan_q), NORM: torch.ones(20, dtype=torch.float64)})
    with pytest.raises(InputError, match=rf"^{tmp_path / 'run' / 'checkpoint-8'}: holds NaN or Inf in {Q!r}, so "
                                         rf"method linear predicts NaN or Inf for it; nothing was written"):
        extrapolate(series, TARGET, tmp_path / "out", method="linear")
    assert not (tmp_path / "out").exists()
    write_dir(tmp_path / "run" / "checkpoint-8", {Q: torch.tensor(w0 + 8 * m),
                                                  NORM: torch.full((20,), np.inf, dtype=torch.float64)})
    with pytest.raises(InputError, match=rf"^{tmp_path / 'run' / 'checkpoint-8'}: holds NaN or Inf in {NORM!r}, "
                                         "which the output copies; nothing was written"):
        extrapolate(series, TARGET, tmp_path / "out", method="linear")
    assert not (tmp_path / "out").exists()
    w32 = {Q: torch.full((12, 20), 3e38, dtype=torch.float32), NORM: torch.ones(20)}
    write_dir(tmp_path / "b32", w32)
    write_dir(tmp_path / "r32" / "checkpoint-8", {Q: torch.full((12, 20), 3.3e38, dtype=torch.float32),
                                                  NORM: torch.ones(20)})
    big = CheckpointSeries.discover(tmp_path / "r32", base=tmp_path / "b32", name="big")
    with pytest.raises(InputError, match=rf"^method expo predicts values beyond float32 for {Q!r} \(up to 3.6e\+38\) "
                                         "at step 20; nothing was written"):
        extrapolate(big, 20, tmp_path / "out", method="expo", alpha=1.0)
    assert not (tmp_path / "out").exists()


def test_alpharl_refuses_tensors_that_are_not_matrices(tmp_path):
    """AlphaRL extrapolates the rank-1 part of each matrix's update; --all-shapes asks it to move 1-D norms too,
    which have none: one sentence before anything is read or written (it was a traceback)."""
    series, _, _ = _line(tmp_path)
    with pytest.raises(InputError, match=rf"^method alpharl moves matrices only \(the rank-1 part of each update\), "
                                         rf"but matrices_only=False selects {NORM!r} of shape \(20,\); "
                                         "leave out matrices_only=False"):
        extrapolate(series, TARGET, tmp_path / "out", method="alpharl", groups=None, matrices_only=False)
    assert not (tmp_path / "out").exists()


def test_a_selection_that_moves_nothing_is_refused(tmp_path):
    """No tensor of the last step selected: the output would be that step under the method's label."""
    series, _, _ = _line(tmp_path)
    for method in ("relex", "expo"):
        with pytest.raises(InputError, match=rf"^{tmp_path / 'run' / 'checkpoint-8'}: has no float matrix in groups "
                                             rf"embedding for method {method} to move \(see groups and "
                                             r"matrices_only\); the output would be a copy of step 8"):
            extrapolate(series, TARGET, tmp_path / "out", method=method, groups=("embedding",))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fields, phrase", [
    ({"method": "expo", "k": 3}, "k applies to method effopd, not expo"),
    ({"method": "effopd", "alpha": 2.0}, "alpha applies to method expo, not effopd"),
    ({"method": "linear", "rank": 2}, "rank applies to method relex, not linear"),
    ({"method": "relex", "coef_step": 3.0}, "coef_step applies to method effopd, not relex"),
    ({"method": "relex", "degree": 3}, "degree applies to method relex with fit polynomial"),
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

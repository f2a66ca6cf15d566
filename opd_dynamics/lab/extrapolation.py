"""Every extrapolator side by side on the lab's runs: from the first 10, 20 and 40 % of each OPD and GRPO run,
each method's predicted weights, scored on the held-out problems against the true final checkpoint and against
the run itself at its last observed step (what vanilla training had when the prediction was made).

Per seed (``ROOT/seed-K/``, `lab run --seeds N`), run, fraction f (observed: the checkpoints at steps ≤ f·T, T the
run's last step; t_B the last of them) and method, each of the authors' methods as their code runs it
(`opd_dynamics.extrapolate.registry`, docs/EXTRAPOLATION.md):

- ``linear`` (RLVR-Linearity's line through the base and t_B: every tensor without 'norm' in its name, norms
  from t_B) and ``relex`` (rank 1, a line against the positions of every observed step; needs two) predict the
  weights at T;
- ``alpharl`` fits its PLS of the rank-1 vectors to the run's held-out accuracy at each observed step (eval.csv;
  needs two steps) and predicts the weights at a held-out accuracy of ALPHARL_TARGET_SCORE, in the container t_B;
  it stands for no step;
- ``expo`` is ExPO as published, θ_B + α(θ_B − θ_base) with α = 0.5 (its README's example), every parameter: a
  fixed jump, whose nominal step is (1 + α)·t_B;
- ``effopd`` is the published search at t_B (EffOPD's own name rule for what moves): candidates W_B + 2k(W_B − W_A),
  k = 1 … 5, A the latest observed step ≤ t_B/2 (the base if none; the paper's anchor is t/2), each scored by
  sampled accuracy (T = 1, one sample per prompt, a fresh draw per candidate) on 50 training prompts and accepted
  while strictly better; its nominal step is t_B + 2k(t_B − t_A).

The toolkit's variants (``VARIANTS``, asked for by name in ``methods``) run beside them: the same methods moving
only the attention and MLP matrices (``linear/groups``, ``expo/groups``, ``effopd/groups``), RELEX on step numbers
(``relex/steps``, matrices only: the toolkit's relex before it ran as published), and ``rank1-growth`` (what was
called alpharl before).

``gain_recovered`` = (accuracy − init) / (final − init): 1 is the true final checkpoint, ``observed_gain`` the same
for W_{t_B}. ``weight_error`` = ‖W_pred − W_T‖F / ‖W_T − W_{t_B}‖F over the attention and MLP matrices: below 1 the
prediction is nearer the true final weights than t_B was.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from opd_dynamics.errors import InputError
from opd_dynamics.extrapolate.methods import ExtrapolationOptions, extrapolate, observed
from opd_dynamics.extrapolate.predict import effopd_anchor as effopd_anchor_index
from opd_dynamics.extrapolate.registry import METHODS_BY_NAME, METHODS_LIST
from opd_dynamics.io.formats import open_full_weights
from opd_dynamics.io.naming import MATRIX_GROUPS, is_selected
from opd_dynamics.io.series import CheckpointSeries
from opd_dynamics.lab.layout import RUNS, LabDir, seed_dirs
from opd_dynamics.numerics import fro2
from opd_dynamics.schema import TABLES

EXTRAPOLATION_JSON = "extrapolation.json"
FRACTIONS = (0.1, 0.2, 0.4)
#: the authors' methods, as published (the default): the registry's published methods
LAB_METHODS = tuple(m.name for m in METHODS_LIST if m.published)
#: the toolkit's variants: label → (method, its options beyond the lab's)
VARIANTS: dict[str, tuple[str, dict]] = {
    "linear/groups": ("linear", {"select": "groups"}),
    "relex/steps": ("relex", {"time": "steps", "select": "groups"}),
    "expo/groups": ("expo", {"select": "groups"}),
    "effopd/groups": ("effopd", {"select": "groups"}),
    "rank1-growth": ("rank1-growth", {}),
}
EXPO_ALPHA = 0.5
#: alpharl's target: perfect held-out accuracy (the authors' script asks for 1.7 on MATH accuracy, beyond its range)
ALPHARL_TARGET_SCORE = 1.0
N_VAL = 50


def _spec(label: str) -> tuple[str, dict]:
    return VARIANTS.get(label, (label, {}))


def min_steps(label: str) -> int:
    """The observed steps a lab method needs."""
    return METHODS_BY_NAME[_spec(label)[0]].min_steps


def observed_steps(series: CheckpointSeries, fraction: float) -> list[int]:
    """The steps at or before ``fraction`` of the run's last step; refused when that leaves none before it."""
    last = series.step_numbers[-1]
    steps = [s for s in series.step_numbers if s <= fraction * last + 1e-9]
    if not steps or steps[-1] == last:
        raise InputError(Path(series.steps[-1][1]).parent, f"leaves no observed step before its last for fraction "
                         f"{fraction} (its steps: {', '.join(map(str, series.step_numbers))})", ("fractions",))
    return steps


def effopd_anchor(steps: Sequence[int]) -> int:
    """EffOPD's A for B = steps[-1]: the latest observed step ≤ B/2, else the base (0) (`predict.effopd_anchor`)."""
    i = effopd_anchor_index(np.asarray(steps, dtype=np.float64))
    return 0 if i is None else steps[i]


def weight_error(pred: Path, final: Path, last: Path) -> float:
    """‖W_pred − W_T‖F / ‖W_T − W_{t_B}‖F over the attention and MLP matrices, one tensor at a time (float64)."""
    num = den = 0.0
    with open_full_weights(pred) as p, open_full_weights(final) as f, open_full_weights(last) as b:
        for name in f.names():
            if not is_selected(name, f.shape(name), MATRIX_GROUPS, True):
                continue
            wt = f.get(name).double()
            num += fro2(p.get(name).double() - wt)
            den += fro2(wt - b.get(name).double())
    return math.sqrt(num / den) if den > 0 else float("nan")


def _predict(label: str, series: CheckpointSeries, steps: list[int], target: int, out: Path,
             score: Callable[[Path], float], accuracy: pd.Series) -> tuple[float, int | None]:
    """Write the weights of ``label`` (a method or a variant) from ``steps`` into ``out``; return (nominal step,
    EffOPD's accepted k)."""
    from opd_dynamics.effopd.offline import search_checkpoints
    from opd_dynamics.effopd.options import EffOPDOptions

    method, extra = _spec(label)
    t_b = steps[-1]
    seen = observed(series, steps)
    if method == "effopd":
        t_a = effopd_anchor(steps)
        paths = dict(series.steps)
        rec = search_checkpoints(paths[t_a] if t_a else series.base, paths[t_b], out, score, EffOPDOptions(**extra))
        return t_b + rec.coef * (t_b - t_a), rec.k_accepted
    if method == "expo":
        extrapolate(seen, None, out, ExtrapolationOptions(method="expo", alpha=EXPO_ALPHA, **extra))
        return (1 + EXPO_ALPHA) * t_b, None
    if method == "alpharl":
        scores = {s: float(accuracy.loc[s]) for s in steps}
        extrapolate(seen, None, out, ExtrapolationOptions(method="alpharl", scores=scores,
                                                          target_score=ALPHARL_TARGET_SCORE, **extra))
        return math.nan, None
    extrapolate(seen, target, out, ExtrapolationOptions(method=method, **extra))
    return float(target), None


def _seed_rows(seed: int, lab: LabDir, runs: Sequence[str], fractions: Sequence[float], methods: Sequence[str],
               n_eval: int | None, work: Path, log: Callable[[str], None]) -> list[dict]:
    """One seed's rows of extrapolation.csv (before the gain columns)."""
    from opd_dynamics.effopd.callback import sample_validation
    from opd_dynamics.lab.effopd import validation_score
    from opd_dynamics.lab.evaluate import evaluate_model
    from opd_dynamics.lab.models import load_model
    from opd_dynamics.lab.task import build_tokenizer

    tok = build_tokenizer()
    held = lab.heldout(n_eval)
    train = lab.splits().train
    val = {r["prompt"] for r in sample_validation(({"prompt": q.prompt, "answer": q.answer} for q in train), N_VAL,
                                                   seed)}
    val_score = validation_score("sampled", tok, [q for q in train if q.prompt in val], lab.teacher, seed)
    rows = []
    for run in runs:
        series = lab.series(run)
        paths = dict(series.steps)
        ev = pd.read_csv(lab.eval_csv(run)).set_index("step")["accuracy"]
        final_step = series.step_numbers[-1]
        init, final = float(ev.loc[0]), float(ev.loc[final_step])
        for f in fractions:
            steps = observed_steps(series, f)
            t_b = steps[-1]
            obs = float(ev.loc[t_b])
            for method in methods:
                row = {"seed": seed, "run": run, "fraction": f, "last_observed": t_b, "n_observed": len(steps),
                       "method": method, "nominal_step": math.nan, "k": pd.NA, "accuracy": math.nan,
                       "observed_accuracy": obs, "final_accuracy": final, "init_accuracy": init,
                       "weight_error": math.nan, "note": ""}
                if len(steps) < min_steps(method):
                    row["note"] = f"needs {min_steps(method)} observed steps, {len(steps)} observed"
                else:
                    pred = work / f".pred-{seed}-{run}-{f}-{method.replace('/', '-')}"
                    row["nominal_step"], row["k"] = _predict(method, series, steps, final_step, pred,
                                                             lambda p: val_score(load_model(p)), ev)
                    row["accuracy"] = float(evaluate_model(load_model(pred), tok, held)["accuracy"])
                    row["weight_error"] = weight_error(pred, paths[final_step], paths[t_b])
                    shutil.rmtree(pred)
                rows.append(row)
                log(f"[extrapolation] seed {seed} {run} f={f:g} (t_B={t_b}) {method}: accuracy {row['accuracy']:.3f} "
                    f"(observed {obs:.3f}, final {final:.3f}) {row['note']}")
    return rows


def lab_extrapolation(root: str | Path, out: str | Path, *, fractions: Sequence[float] = FRACTIONS,
                      methods: Sequence[str] = LAB_METHODS, runs: Sequence[str] = RUNS, n_eval: int | None = None,
                      overwrite: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Run the measurement (module docstring) into ``out``: extrapolation.csv, extrapolation.png,
    extrapolation.json. Written under a temporary name, then renamed."""
    import torch

    from opd_dynamics.io.writer import atomic_dir, json_text
    from opd_dynamics.plotting.extrapolation import plot_extrapolation

    log = log or (lambda m: print(m, flush=True))
    known = (*LAB_METHODS, *VARIANTS)
    bad = [m for m in methods if m not in known]
    if bad:
        raise InputError(None, f"method {bad[0]!r} is not one of {', '.join(known)}", ("methods",))
    if not fractions or any(not 0 < f < 1 for f in fractions):
        raise InputError(None, f"fractions must lie in (0, 1), got {list(fractions)}", ("fractions",))
    labs = seed_dirs(root)
    for lab in labs.values():
        lab.require(meta=True)
        for run in runs:
            series = lab.series(run)
            for f in fractions:  # a fraction that observes nothing is refused before any work
                observed_steps(series, f)
    out = Path(out).resolve()
    with atomic_dir(out, "extrapolation", overwrite=overwrite, inputs=[Path(root).resolve()]) as tmp:
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        rows = [r for seed, lab in labs.items()
                for r in _seed_rows(seed, lab, runs, fractions, methods, n_eval, tmp, log)]
        df = pd.DataFrame(rows)
        gain = (df["final_accuracy"] - df["init_accuracy"]).where(lambda g: g != 0)  # a run that gained nothing: NaN
        df["gain_recovered"] = (df["accuracy"] - df["init_accuracy"]) / gain
        df["observed_gain"] = (df["observed_accuracy"] - df["init_accuracy"]) / gain
        df = df[TABLES["extrapolation"].names]
        df.to_csv(tmp / TABLES["extrapolation"].file, index=False)
        plot_extrapolation({"extrapolation": df}).savefig(tmp / "extrapolation.png", dpi=130, bbox_inches="tight")
        (tmp / EXTRAPOLATION_JSON).write_text(json_text({
            "lab": str(Path(root).resolve()), "seeds": list(labs), "runs": list(runs), "fractions": list(fractions),
            "methods": list(methods), "variants": {k: [m, o] for k, (m, o) in VARIANTS.items() if k in methods},
            "expo_alpha": EXPO_ALPHA, "alpharl_target_score": ALPHARL_TARGET_SCORE,
            "effopd_validation": f"sampled, {N_VAL} prompts",
            "n_eval": n_eval, "seconds": round(time.perf_counter() - t0, 1)}))
    return out

"""The EffOPD measurement on a pretrained lab's seeds (`lab run --preset smollm2 --seeds N`): its OPD series at
1×, 3× and 10× the rate and with EffOPD's jumps, read as the tiny lab's EffOPD methods and judged by the same rule.

Each seed-K/ of the root contributes the series it has finished (`pretrained_run.RL_RUNS`): the curve is the held-out
greedy accuracy at the series' checkpoints (``RUN/eval.csv``: steps 0, 1, 2, 4, 8, 16, then every 8th) and at every
early step (``RUN/step_eval.csv``, up to ``eval_every_step_until``), read within a seed on the steps every one of its
series measured, so that no method is read on a finer grid than its baseline (a series made before the early
held-out evaluation leaves its seed the checkpoint grid, where a method needing 11 steps shows as 16). The target,
the speedups and their tests are `lab.effopd`'s (`summarize`, `effopd_verdicts`): the first measured step with
accuracy ≥ 95 % of vanilla's final, the ratio of steps over paired seeds with its one-sided test.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from opd_dynamics.lab.layout import SEED_PREFIX, numbered
from opd_dynamics.lab.pretrained_run import RATE_MULTIPLES, PretrainedLabDir, run_lr
from opd_dynamics.schema import TABLES

#: a pretrained lab's series as the EffOPD measurement's methods (`presets.EFFOPD_METHODS`)
METHOD_OF = {"opd": "vanilla", **{f"opd_{m}x": f"vanilla-{m}x" for m in RATE_MULTIPLES}, "effopd": "effopd"}


def effopd_tables(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(effopd_curves, runs): every finished series of `METHOD_OF` in every seed of ``root``; runs holds lr,
    final_accuracy, wall_s (training's, evaluation excluded), validation_s and tie_accepts per seed and method."""
    curves, runs = [], []
    for seed, d in numbered(root, SEED_PREFIX).items():
        lab = PretrainedLabDir(d)
        preset = SimpleNamespace(**json.loads((d / "preset.json").read_text())["preset"])  # for run_lr
        for run, method in METHOD_OF.items():
            done = lab.done(run)
            if done is None:
                continue
            ev = pd.read_csv(d / run / "eval.csv")
            curves.append(pd.DataFrame({"seed": seed, "method": method, "step": ev["step"],
                                        "accuracy": ev["accuracy"], "wall_s": np.nan}))
            early = d / run / "step_eval.csv"
            early = pd.read_csv(early) if early.is_file() else pd.DataFrame()
            if "heldout_accuracy" in early:
                early = early[~early["step"].isin(ev["step"])]
                curves.append(pd.DataFrame({"seed": seed, "method": method, "step": early["step"],
                                            "accuracy": early["heldout_accuracy"], "wall_s": np.nan}))
            runs.append({"seed": seed, "method": method, "lr": done.get("lr", run_lr(preset, run)),
                         "final_accuracy": float(ev["accuracy"].iloc[-1]), "wall_s": float(done["train_s"]),
                         "validation_s": np.nan, "tie_accepts": 0})
    names = TABLES["effopd_curves"].names
    if not curves:
        return pd.DataFrame(columns=names), pd.DataFrame(runs)
    c = pd.concat(curves, ignore_index=True)[names]
    # the steps every series of the seed measured
    common = c.groupby(["seed", "step"])["method"].transform("nunique") == c.groupby("seed")["method"].transform(
        "nunique")
    return c[common].sort_values(["seed", "method", "step"], ignore_index=True), pd.DataFrame(runs)


def effopd_summary(root: str | Path, target_fraction: float = 0.95) -> tuple[pd.DataFrame, dict]:
    """(effopd_summary table, verdicts) over the seeds of ``root``: `lab.effopd.summarize` and `effopd_verdicts`."""
    return _judged(*effopd_tables(root), target_fraction)


def _judged(curves: pd.DataFrame, runs: pd.DataFrame, target_fraction: float) -> tuple[pd.DataFrame, dict]:
    from opd_dynamics.lab.effopd import effopd_verdicts, summarize

    if curves.empty:
        return pd.DataFrame(columns=TABLES["effopd_summary"].names), {}
    summary = summarize(curves, runs, target_fraction)
    return summary, effopd_verdicts(summary)


def write_effopd(root: str | Path, out: str | Path, *, overwrite: bool = False, target_fraction: float = 0.95,
                 log=print) -> Path:
    """``out``: effopd_summary.csv, effopd_curves.csv and effopd.json (seeds, rates, steps to target, speedups,
    verdicts) for the seeds of ``root``, as `lab effopd` writes them; the steps table and verdicts logged."""
    from opd_dynamics.analysis.stats import RULE
    from opd_dynamics.io.writer import atomic_dir, json_text
    from opd_dynamics.lab.effopd import speedups, steps_table, verdict_lines
    from opd_dynamics.schema import EFFOPD_JSON

    root = Path(root).resolve()
    curves, runs = effopd_tables(root)
    summary, verdicts = _judged(curves, runs, target_fraction)
    if summary.empty:
        from opd_dynamics.errors import InputError

        raise InputError(root, "holds no finished OPD series (seed-K/stages/opd.json); run `lab run --preset "
                               "smollm2 --seeds N` into it first")
    with atomic_dir(out, "effopd-lab", overwrite=overwrite, inputs=[root]) as tmp:
        summary.to_csv(tmp / "effopd_summary.csv", index=False)
        curves.to_csv(tmp / "effopd_curves.csv", index=False)
        meta = {"lab": str(root), "seeds": sorted(int(s) for s in summary["seed"].unique()),
                "independent_seeds": True, "target_fraction": target_fraction,
                "lr": summary.groupby("method")["lr"].first().to_dict(),
                "steps_to_target": {m: {str(int(k)): (None if pd.isna(v) else float(v)) for k, v in col.items()}
                                    for m, col in steps_table(summary, lr=False).items()},
                "speedup": speedups(summary, tuple(METHOD_OF.values())), "verdicts": verdicts,
                "verdict_rule": RULE, "grid": "held-out accuracy at the series' checkpoints (module docstring)"}
        (tmp / EFFOPD_JSON).write_text(json_text(meta))
    for line in verdict_lines(verdicts, summary, target_fraction):
        log(line)
    return Path(out)

"""The EffOPD measurement on a pretrained lab's seeds (`lab run --preset smollm2 --seeds N`): its OPD series at
1×, 3× and 10× the rate and with EffOPD's jumps, read as the tiny lab's EffOPD methods and judged by the same rule.

Each seed-K/ of the root contributes the series it has finished (`pretrained_run.RL_RUNS`): the curve is the held-out
greedy accuracy at the series' checkpoints (``RUN/eval.csv``: steps 0, 1, 2, 4, 8, 16, then every 8th), so a step to
target is read on that grid (a method needing 11 steps shows as 16). The target, the speedups and their tests are
`lab.effopd`'s (`summarize`, `effopd_verdicts`): the first checkpoint with accuracy ≥ 95 % of vanilla's final, the
ratio of steps over paired seeds with its one-sided test.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from opd_dynamics.lab.pretrained_run import RATE_MULTIPLES, PretrainedLabDir, run_lr
from opd_dynamics.schema import TABLES

#: a pretrained lab's series as the EffOPD measurement's methods (`presets.EFFOPD_METHODS`)
METHOD_OF = {"opd": "vanilla", **{f"opd_{m}x": f"vanilla-{m}x" for m in RATE_MULTIPLES}, "effopd": "effopd"}


def seed_dirs(root: str | Path) -> dict[int, Path]:
    """The ``seed-K`` directories of ``root`` by seed."""
    return {int(d.name.split("-")[1]): d for d in Path(root).glob("seed-*") if d.name.split("-")[1].isdigit()}


def effopd_tables(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(effopd_curves, runs): every finished series of `METHOD_OF` in every seed of ``root``; runs holds lr,
    final_accuracy, wall_s (training's, evaluation excluded), validation_s and tie_accepts per seed and method."""
    curves, runs = [], []
    for seed, d in sorted(seed_dirs(root).items()):
        lab = PretrainedLabDir(d)
        for run, method in METHOD_OF.items():
            done = lab.done(run)
            if done is None:
                continue
            ev = pd.read_csv(d / run / "eval.csv").sort_values("step")
            curves.append(pd.DataFrame({"seed": seed, "method": method, "step": ev["step"],
                                        "accuracy": ev["accuracy"], "wall_s": np.nan}))
            preset = SimpleNamespace(**json.loads((d / "preset.json").read_text())["preset"])
            runs.append({"seed": seed, "method": method, "lr": done.get("lr", run_lr(preset, run)),
                         "final_accuracy": float(ev["accuracy"].iloc[-1]), "wall_s": float(done["train_s"]),
                         "validation_s": np.nan, "tie_accepts": 0})
    names = TABLES["effopd_curves"].names
    return (pd.concat(curves, ignore_index=True)[names] if curves else pd.DataFrame(columns=names),
            pd.DataFrame(runs))


def effopd_summary(root: str | Path, target_fraction: float = 0.95) -> tuple[pd.DataFrame, dict]:
    """(effopd_summary table, verdicts) over the seeds of ``root``: `lab.effopd.summarize` and `effopd_verdicts`."""
    from opd_dynamics.lab.effopd import effopd_verdicts, summarize

    curves, runs = effopd_tables(root)
    if curves.empty:
        return pd.DataFrame(columns=TABLES["effopd_summary"].names), {}
    summary = summarize(curves, runs, target_fraction)
    return summary, effopd_verdicts(summary)

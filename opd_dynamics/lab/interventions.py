"""The lab side of the interventions: every weight transform of `opd_dynamics.interventions` on the lab's OPD
and GRPO runs, each scored by greedy held-out accuracy, into scaling/window/rank/rescale/embedding_swap CSVs."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from opd_dynamics.errors import InputError
from opd_dynamics.interventions import (
    StateDict,
    embedding_swap,
    layer_window,
    module_mask,
    module_rescale,
    rank_truncate,
    scale,
    update_norm,
)
from opd_dynamics.io.formats import open_model
from opd_dynamics.io.writer import atomic_dir, check_output, json_text
from opd_dynamics.lab.evaluate import evaluate_model
from opd_dynamics.lab.layout import RUNS, LabDir
from opd_dynamics.lab.models import load_model
from opd_dynamics.lab.task import build_tokenizer
from opd_dynamics.schema import INTERVENTIONS_JSON, TABLES

#: the kind of output an interventions directory is (its marker, `io.writer.OUTPUT_MARKER`)
INTERVENTIONS = "interventions"

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
RANK_PCTS = (0.01, 0.05, 0.10, 0.25, 0.50, 1.0)
BETAS = (0.5, 1.0, 1.5)


def evenly(xs: Sequence[int], n: int) -> list[int]:
    if n <= 0:
        return []
    if len(xs) <= n:
        return list(xs)
    if n == 1:
        return [xs[len(xs) // 2]]
    return sorted({xs[round(i * (len(xs) - 1) / (n - 1))] for i in range(n)})


def lab_interventions(lab_dir: str | Path, out: str | Path, *, step: int | None = None, half_width: int = 1,
                      runs: Sequence[str] = RUNS, n_eval: int | None = None, n_rescale_steps: int = 4,
                      overwrite: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate the intervention grid on a lab directory and write scaling/window/rank/rescale/embedding_swap CSVs.

    Each intervened state dict is loaded into one in-memory student model (no checkpoints written) and scored
    by greedy exact-match accuracy on the lab's held-out problems (the first ``n_eval``, default the lab's).
    ``step`` picks the checkpoint (default: each run's last); rescaling uses up to ``n_rescale_steps``
    earlier checkpoints, evenly spaced. Returns the tables as DataFrames.
    """
    log = log or (lambda m: print(m, flush=True))
    lab = LabDir(lab_dir).require(meta=True)
    base_dir = lab.student_init
    check_output(out, INTERVENTIONS, overwrite=overwrite, inputs=[lab.root])  # before hours of evaluation
    held = lab.heldout(n_eval)
    tok = build_tokenizer()
    model = load_model(base_dir)
    n_layers = int(model.config.num_hidden_layers)

    def acc(sd: StateDict) -> float:
        model.load_state_dict(sd, strict=True)
        return float(evaluate_model(model, tok, held)["accuracy"])

    tables: dict[str, list[dict]] = {k: [] for k in ("scaling", "window", "rank", "rescale", "embedding_swap")}
    t0 = time.time()
    used_steps: dict[str, int] = {}
    with open_model(base_dir) as base:
        for run in runs:
            series = lab.series(run)
            steps = series.step_numbers
            final = steps[-1] if step is None else int(step)
            if final not in steps:
                raise InputError(lab.run(run), f"has no checkpoint-{final} (steps: {steps})")
            used_steps[run] = final
            with series.open_step(final) as ck:
                total = update_norm(base, ck)
                for a in ALPHAS:
                    tables["scaling"].append({"run": run, "alpha": a, "update_norm": a * total,
                                              "accuracy": acc(scale(base, ck, a))})
                log(f"[interventions] {run} step {final}: scaling done ({time.time() - t0:.0f}s)")
                for group in ("mlp", "attention"):
                    for c in range(n_layers):
                        tables["window"].append({
                            "run": run, "center_layer": c, "first_layer": max(0, c - half_width),
                            "last_layer": min(n_layers - 1, c + half_width), "group": group,
                            "accuracy": acc(layer_window(base, ck, c, half_width, (group,)))})
                log(f"[interventions] {run}: window done ({time.time() - t0:.0f}s)")
                svds: dict = {}  # each ΔW decomposed once for all 24 truncations
                for side in ("top", "bottom"):
                    for pct in RANK_PCTS:
                        for resc in (False, True):
                            sd = rank_truncate(base, ck, pct, side, resc, svd_cache=svds)
                            tables["rank"].append({"run": run, "side": side, "pct": pct, "rescaled": resc,
                                                   "accuracy": acc(sd)})
                log(f"[interventions] {run}: rank done ({time.time() - t0:.0f}s)")
                for variant, sd in (("checkpoint", scale(base, ck, 1.0)), ("embedding_swap", embedding_swap(base, ck)),
                                    ("embeddings_only", module_mask(base, ck, groups=("embedding", "lm_head")))):
                    tables["embedding_swap"].append({"run": run, "variant": variant, "accuracy": acc(sd)})
                for mid in evenly([s for s in steps if s < final], n_rescale_steps):
                    with series.open_step(mid) as mk:
                        for beta in BETAS:
                            tables["rescale"].append({"run": run, "step": mid, "beta": beta,
                                                      "accuracy": acc(module_rescale(base, mk, ck, beta))})
                log(f"[interventions] {run}: rescale and embedding swap done ({time.time() - t0:.0f}s)")
    # columns in the schema's order; an empty table (no earlier checkpoint to rescale) stays a bare file
    frames = {k: pd.DataFrame(v, columns=TABLES[k].names if v else None) for k, v in tables.items()}
    with atomic_dir(out, INTERVENTIONS, overwrite=overwrite) as tmp:
        for k, df in frames.items():
            df.to_csv(tmp / f"{k}.csv", index=False)
        (tmp / INTERVENTIONS_JSON).write_text(json_text({
            "lab": str(lab.root.resolve()), "steps": used_steps, "half_width": half_width, "n_eval": len(held),
            "alphas": ALPHAS, "rank_pcts": RANK_PCTS, "betas": BETAS, "wall_s": round(time.time() - t0, 2)}))
    return frames

"""The paper's claims over a lab's seeds: for each claim, OPD's and GRPO's mean ± sd, the paired effect with its
interval, the p-values and a verdict under one rule (`opd_dynamics.analysis.stats`).

`lab claims ROOT` reads every finished seed of a multi-seed lab (``ROOT/seed-K/``, `lab run --seeds N`), analyses
each seed's OPD and GRPO series against its student_init (`opd_dynamics.analysis.analyze`), and writes:

- ``claims_seeds.csv``: one row per seed, claim and run with the value measured and the step it was taken at;
- ``claims.csv``: per claim, mean ± sd over seeds per run, the paired effect with its 95 % t interval, the sign
  test's p-value in each direction, the paired t and Wilcoxon p-values, and the verdict;
- ``claims.md``: the same as a Markdown table (what docs/LAB.md quotes);
- ``claims.json``: the lab, its seeds, the EffOPD measurement read, the rule and the thresholds;
- ``analysis/seed-K/``: each seed's analysis (the CSVs every value comes from).

`claims_from_seeds` (``lab claims --from-seeds claims_seeds.csv``) judges an existing claims_seeds.csv again
without the analysis (what docs/LAB.md's table is recomputed from).

**Preconditions** come first (the brief: show both methods learn before comparing them): the teacher reaches
0.95, GRPO gains ≥ 0.15 held-out accuracy over the init, OPD does not dip (its lowest accuracy in the first
``early_fraction`` of steps, at the checkpoints and at every one of the first `lab.early.DIP_STEPS` steps where
the run kept ``early_eval.csv``, stays within ``DIP_MARGIN`` of the init's). They are checks of every seed, not
hypotheses: *holds* when every seed meets the threshold, else *fails*, and a comparison of OPD with GRPO is
"not testable" on a lab where a precondition fails.

**Verdict of a claim** (the one rule, `analysis.stats.RULE`): the per-seed differences (OPD − GRPO for a paired
claim, the value itself for ``>0``, the log of the speedup for EffOPD) are *confirmed* when the exact one-sided
sign test in the paper's direction gives p < 0.05, *refuted* when it does in the other direction, *inconclusive*
otherwise; the mean difference with its 95 % t interval and the paired t and Wilcoxon p-values stand beside it.
Fewer than five seeds can never decide (3 of 3 gives p = 0.125).

**Matched progress.** OPD moves faster than GRPO at the same rate (further in ‖ΔW‖, ahead in accuracy), so a
comparison at the same step compares different progress. Every paired claim is also judged at matched
progress: per seed, at the claim's step s (the last, or the early step), the run that is behind keeps s and
the other is taken at its first checkpoint that has reached the same held-out accuracy (``accuracy``) or the
same total ‖ΔW‖F (``norm``); claims_seeds.csv records the step each value came from. A seed where the run ahead
never reaches the level (it cannot happen at the early step) has no value.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from opd_dynamics.analysis.stats import (
    ALPHA,
    CONFIDENCE,
    CONFIRMED,
    GREATER,
    INCONCLUSIVE,
    LESS,
    NOT_TESTABLE,
    REFUTED,
    RULE,
    fmt_p,
    paired_test,
    ratio_test,
)
from opd_dynamics.errors import InputError
from opd_dynamics.io.naming import MATRIX_GROUPS
from opd_dynamics.lab.layout import RUNS, LabDir, seed_dir, seed_dirs
from opd_dynamics.schema import EFFOPD_JSON, TABLES

CLAIMS_JSON = "claims.json"
TEACHER_MIN, GRPO_GAIN_MIN, DIP_MARGIN = 0.95, 0.15, 0.02
LOW_UTILITY = ("embedding", "lm_head", "norm")

#: the verdicts of a claim are analysis.stats' (CONFIRMED, REFUTED, INCONCLUSIVE, NOT_TESTABLE); a precondition,
#: a check of every seed, holds or fails
HOLDS, FAILS = "holds", "fails"
__all__ = ["CLAIMS", "CONFIRMED", "FAILS", "HOLDS", "INCONCLUSIVE", "NOT_TESTABLE", "REFUTED", "Claim",
           "claims_from_seeds", "claims_table", "lab_claims", "markdown"]
#: how a paired claim's two runs are matched: at the same step, at equal held-out accuracy, at equal ‖ΔW‖F
MATCHES = ("step", "accuracy", "norm")
_MATCH_TEXT = {"step": "", "accuracy": " (equal accuracy)", "norm": " (equal ‖ΔW‖)"}


@dataclass(frozen=True)
class Claim:
    """One row of the claims table: what is measured and which way the paper says it goes.

    ``expect``: ``"opd>grpo"`` or ``"opd<grpo"`` (paired per seed), ``">0"`` (``run``'s value against zero),
    ``">=min"`` (a precondition: ``run``'s value ≥ ``threshold`` on every seed) or ``"speedup"`` (EffOPD's
    per-seed step speedup against 1). ``at``: the step of a paired claim, ``"last"`` or ``"early"``; ``match``:
    how its runs are matched (`MATCHES`)."""

    key: str
    name: str
    measure: str
    expect: str
    run: str = ""
    threshold: float = 0.0
    untestable: str = ""  # why the lab cannot test it, if it cannot
    at: str = "last"
    match: str = "step"

    @property
    def precondition(self) -> bool:
        return self.expect == ">=min"

    @property
    def paired(self) -> bool:
        return self.expect in ("opd>grpo", "opd<grpo")

    @property
    def base_key(self) -> str:
        """The key of the measure (the claim at matched step)."""
        return self.key.split("@")[0]


_BASE: tuple[Claim, ...] = (
    Claim("teacher", "precondition: teacher", "teacher held-out greedy accuracy", ">=min", "teacher", TEACHER_MIN),
    Claim("grpo_gain", "precondition: GRPO learns", "held-out accuracy gain over the init, last step", ">=min",
          "grpo", GRPO_GAIN_MIN),
    Claim("opd_dip", "precondition: OPD learns without a dip", "lowest accuracy of the checkpoints in the early "
          "window and of every one of the first steps (early_eval.csv) minus the init's", ">=min", "opd",
          -DIP_MARGIN),
    Claim("low_utility", "allocation: low-utility tensors", "share of ‖ΔW‖² in embeddings, lm_head and norms, last "
          "step", "opd<grpo"),
    Claim("mlp_share", "allocation: MLP over attention", "MLP share of the attention+MLP ‖ΔW‖², last step",
          "opd>grpo"),
    Claim("middle_share", "allocation by depth: middle layers", "middle third of the layers' share of the "
          "attention+MLP ‖ΔW‖², last step", "opd>grpo"),
    Claim("spectral_ratio", "low rank: spectral ratio", "σ1/‖ΔW‖F, mean over attention and MLP matrices, last step",
          "opd>grpo"),
    Claim("top1pct", "low rank: top-1% norm ratio", "top-⌈1%·r⌉ share of ‖ΔW‖F, mean over attention and MLP, last "
          "step", "opd>grpo"),
    Claim("effective_rank", "low rank: effective rank", "effective rank, mean over attention and MLP matrices, last "
          "step", "opd<grpo"),
    Claim("opd_above_null", "early alignment above the null (OPD)", "direction cosine to the final update minus its "
          "random-walk null (measured segment norms), mean over attention and MLP, early step", ">0", "opd",
          at="early"),
    Claim("grpo_above_null", "early alignment above the null (GRPO)", "the same for GRPO", ">0", "grpo", at="early"),
    Claim("opd_before_grpo", "early alignment: OPD before GRPO", "the same, OPD against GRPO", "opd>grpo",
          at="early"),
    Claim("opd_rank1_null", "rank 1 in time above the null (OPD)", "rank-1 share of the stacked updates minus its "
          "random-walk null, mean over attention and MLP", ">0", "opd"),
    Claim("grpo_rank1_null", "rank 1 in time above the null (GRPO)", "the same for GRPO", ">0", "grpo"),
    Claim("opd_linear_null", "linear in time above the null (OPD)", "pooled per-entry linear R² minus its "
          "random-walk null, mean over attention and MLP", ">0", "opd"),
    Claim("grpo_linear_null", "linear in time above the null (GRPO)", "the same for GRPO", ">0", "grpo"),
    Claim("embedding_shift", "embedding shift", "1 − mean row cosine of the input embedding to the init's, last "
          "step", "opd<grpo", untestable="the lab's vocabulary has 16 tokens and every sequence uses all of them, so "
          "no row is rarely used; the paper's contrast is over a 150K-token table"),
    Claim("effopd", "EffOPD steps to target", "vanilla's steps to 95% of its final accuracy over EffOPD's, per "
          "paired seed (the paper: about 3×)", "speedup", "effopd"),
)


def _with_matches(claims: tuple[Claim, ...]) -> tuple[Claim, ...]:
    """Every claim, each testable paired one followed by its matched-progress variants."""
    out: list[Claim] = []
    for c in claims:
        out.append(c)
        if c.paired and not c.untestable:
            out += [replace(c, key=f"{c.key}@{m}", name=c.name + _MATCH_TEXT[m], match=m,
                            measure=f"the same, the run ahead at its first checkpoint reaching the other's {what}")
                    for m, what in zip(MATCHES[1:], ("held-out accuracy", "‖ΔW‖F"), strict=True)]
    return tuple(out)


CLAIMS: tuple[Claim, ...] = _with_matches(_BASE)
_BY_KEY = {c.key: c for c in CLAIMS}


def early_step(steps, fraction: float) -> int:
    """The first step at or after ``fraction`` of the last (the 'early' step of the alignment claims)."""
    steps = sorted(steps)
    return next(s for s in steps if s >= fraction * steps[-1])


def _middle(layers) -> set[int]:
    """The middle third of the layer indices 0 … L−1: L//3 ≤ l < L − L//3 (2, 3 of 6)."""
    n = int(max(layers)) + 1
    return set(range(n // 3, n - n // 3))


def _row(key: str, run: str, value: float, step: float = math.nan) -> dict:
    return {"claim": _BY_KEY[key].name, "run": run, "step": step, "value": float(value)}


def step_measures(tables: dict[str, pd.DataFrame], run: str, step: int) -> dict[str, float]:
    """The step-dependent measures of one run at one step, by base claim key (see `CLAIMS`)."""
    a, s, seg, emb = (tables[t] for t in ("module_allocation", "spectrum", "segments", "embedding"))
    ar = a[(a["run"] == run) & (a["step"] == step)]
    f2 = ar["update_norm"].astype(float) ** 2
    mat = ar["group"].isin(MATRIX_GROUPS)
    blocks = mat & ar["layer"].notna()
    mid = ar["layer"].where(blocks).isin(_middle(ar.loc[blocks, "layer"].astype(int))) if blocks.any() else blocks
    sr = s[(s["run"] == run) & (s["step"] == step) & s["group"].isin(MATRIX_GROUPS)]
    sr = sr[sr["spectral_norm"].astype(float) > 0]
    sg = seg[(seg["run"] == run) & (seg["step"] == step) & seg["group"].isin(MATRIX_GROUPS)]
    er = emb[(emb["run"] == run) & (emb["step"] == step) & (emb["group"] == "embedding")]

    def ratio(num, den) -> float:
        return float(num / den) if den > 0 else math.nan

    return {
        "low_utility": ratio(f2[ar["group"].isin(LOW_UTILITY)].sum(), f2.sum()),
        "mlp_share": ratio(f2[ar["group"] == "mlp"].sum(), f2[mat].sum()),
        "middle_share": ratio(f2[blocks & mid].sum(), f2[blocks].sum()),
        "spectral_ratio": sr["spectral_ratio"].astype(float).mean(),
        "top1pct": sr["top1pct_norm_ratio"].astype(float).mean(),
        "effective_rank": sr["effective_rank"].astype(float).mean(),
        "excess": sg["direction_excess"].astype(float).mean(),
        "embedding_shift": 1.0 - er["cosine_mean"].astype(float).mean(),
    }


def progress_levels(tables: dict[str, pd.DataFrame], evals: dict[str, pd.DataFrame], run: str) -> pd.DataFrame:
    """Per analysed step of a run: held-out accuracy (eval.csv) and the total update norm ‖ΔW_t‖F over every
    analysed tensor (index: step; columns accuracy, norm)."""
    a = tables["module_allocation"]
    ar = a[a["run"] == run]
    norm = np.sqrt((ar["update_norm"].astype(float) ** 2).groupby(ar["step"]).sum())
    acc = evals[run].set_index("step")["accuracy"].astype(float)
    return pd.DataFrame({"accuracy": acc.reindex(norm.index), "norm": norm})


def matched_steps(levels: dict[str, pd.DataFrame], step: int, by: str) -> dict[str, float]:
    """The steps at which OPD and GRPO are compared for a claim at ``step`` matched ``by`` "step", "accuracy" or
    "norm": the run behind at ``step`` keeps it, the other is taken at its first analysed step whose level
    reaches the run behind's (NaN when it never does)."""
    if by == "step":
        return dict.fromkeys(RUNS, step)
    lvl = {r: float(levels[r].loc[step, by]) if step in levels[r].index else math.nan for r in RUNS}
    if any(v != v for v in lvl.values()):
        return dict.fromkeys(RUNS, math.nan)
    behind = min(RUNS, key=lambda r: lvl[r])
    out = {behind: step}
    for r in RUNS:
        if r != behind:
            lv = levels[r][by]
            hit = lv[lv >= lvl[behind] - 1e-12]
            out[r] = float(hit.index.min()) if len(hit) else math.nan
    return out


def seed_values(lab: LabDir, tables: dict[str, pd.DataFrame], early_fraction: float) -> list[dict]:
    """One seed's values of every claim but EffOPD's, as rows {claim, run, step, value}."""
    rows = [_row("teacher", "teacher", lab.meta()["teacher"]["accuracy"])]
    evals = {r: pd.read_csv(lab.eval_csv(r)).sort_values("step") for r in RUNS}
    tr = tables.get("trajectory", pd.DataFrame(columns=["run", "group", "rank1_share", "rank1_share_null",
                                                        "linear_r2", "linear_r2_null"]))
    last = {r: int(tables["module_allocation"].loc[tables["module_allocation"]["run"] == r, "step"].max())
            for r in RUNS}
    early = {r: early_step(tables["segments"].loc[tables["segments"]["run"] == r, "step"].unique(), early_fraction)
             for r in RUNS}
    levels = {r: progress_levels(tables, evals, r) for r in RUNS}
    cache: dict[tuple[str, float], dict[str, float]] = {}

    def measure(run: str, step: float) -> dict[str, float]:
        if step != step:
            return {}
        if (run, step) not in cache:
            cache[(run, step)] = step_measures(tables, run, int(step))
        return cache[(run, step)]

    for r in RUNS:
        e = evals[r]
        init = float(e["accuracy"].iloc[0])
        window = e[(e["step"] > 0) & (e["step"] <= early_step(e["step"], early_fraction))]  # checkpoints, not init
        every = lab.run(r) / TABLES["early_eval"].file  # and every one of the first steps (lab.early), where kept
        if every.is_file():
            window = pd.concat([window, pd.read_csv(every).query("step > 0")], ignore_index=True)
        t = tr[(tr["run"] == r) & tr["group"].isin(MATRIX_GROUPS)]
        rows += [
            _row("grpo_gain", r, float(e["accuracy"].iloc[-1]) - init, int(e["step"].iloc[-1])),
            _row("opd_dip", r, float(window["accuracy"].min()) - init),
            _row(f"{r}_above_null", r, measure(r, early[r])["excess"], early[r]),
            _row(f"{r}_rank1_null", r, (t["rank1_share"].astype(float) - t["rank1_share_null"].astype(float)).mean(),
                 last[r]),
            _row(f"{r}_linear_null", r, (t["linear_r2"].astype(float) - t["linear_r2_null"].astype(float)).mean(),
                 last[r]),
        ]
    for c in CLAIMS:
        if not c.paired:
            continue
        at = early if c.at == "early" else last
        if len(set(at.values())) == 1:
            steps = matched_steps(levels, at["opd"], c.match)
        else:  # runs of different lengths: compared at their own step (no matching)
            steps = dict(at) if c.match == "step" else dict.fromkeys(RUNS, math.nan)
        key = "excess" if c.base_key == "opd_before_grpo" else c.base_key
        for r in RUNS:
            rows.append(_row(c.key, r, measure(r, steps[r]).get(key, math.nan), steps[r]))
    return rows


def effopd_values(effopd: Path) -> list[dict]:
    """Per paired seed, EffOPD's step speedup (effopd.json), as rows {seed, claim, run, step, value}; gated-out
    seeds and missed targets have no ratio."""
    meta = json.loads((Path(effopd) / EFFOPD_JSON).read_text())
    per_seed = meta["speedup"].get("effopd", {}).get("per_seed", {})  # none: effopd left out of --methods
    return [{"seed": int(k), **_row("effopd", "effopd", v)} for k, v in per_seed.items() if v is not None and v == v]


def judge(claim: Claim, per_seed: pd.DataFrame, failed: list[str]) -> dict:
    """The verdict of one claim from its per-seed rows (columns seed, run, value): a dict with verdict, note, the
    seeds agreeing / against / compared and, for a tested claim, the test's effect, interval and p-values.
    ``failed`` names the preconditions that failed (then no other claim is testable)."""
    out = {"seeds_agreeing": 0, "seeds_against": 0, "seeds_compared": 0, "effect": math.nan, "ci_low": math.nan,
           "ci_high": math.nan, "p_value": math.nan, "p_other": math.nan, "p_t": math.nan, "p_wilcoxon": math.nan}
    if claim.untestable:
        return {**out, "verdict": NOT_TESTABLE, "note": claim.untestable}
    wide = per_seed.pivot_table(index="seed", columns="run", values="value", dropna=False)
    needed = [claim.run] if claim.run else ["opd", "grpo"]
    if not set(needed) <= set(wide.columns) or wide[needed].dropna().empty:
        if claim.expect == "speedup":
            why = "no seed passed the line-probe gate, or no EffOPD measurement was given"
        elif per_seed.empty:
            why = "not measured (claims_seeds.csv has no rows for it)"
        else:
            why = "no seed has a value" + (" (the run ahead never reached that level)" if claim.match != "step" else "")
        return {**out, "verdict": NOT_TESTABLE, "note": why}
    if claim.precondition:
        v = wide[claim.run].dropna().to_numpy()
        ok = int((v >= claim.threshold).sum())
        return {**out, "seeds_agreeing": ok, "seeds_against": len(v) - ok, "seeds_compared": len(v),
                "verdict": HOLDS if ok == len(v) else FAILS, "note": f"a check of every seed: ≥ {claim.threshold:g}"}
    if failed:
        return {**out, "verdict": NOT_TESTABLE, "note": "a precondition failed: " + "; ".join(failed)}
    if claim.expect == "speedup":
        t = ratio_test(wide[claim.run].to_numpy(), GREATER)
        note = "sign test of the per-seed speedup against 1; effect: geometric mean"
    elif claim.expect == ">0":
        t = paired_test(wide[claim.run].to_numpy(), GREATER)
        note = "sign test of the per-seed value against 0; effect: mean"
    else:
        t = paired_test((wide["opd"] - wide["grpo"]).to_numpy(), GREATER if claim.expect == "opd>grpo" else LESS)
        note = "sign test of OPD − GRPO per seed; effect: mean of OPD − GRPO"
        if claim.match != "step":
            note += f"; matched at equal {'held-out accuracy' if claim.match == 'accuracy' else '‖ΔW‖F'}"
    return {"seeds_agreeing": t.n_agree, "seeds_against": t.n_against, "seeds_compared": t.n, "effect": t.effect,
            "ci_low": t.ci_low, "ci_high": t.ci_high, "p_value": t.p_sign, "p_other": t.p_sign_other, "p_t": t.p_t,
            "p_wilcoxon": t.p_wilcoxon, "verdict": t.verdict, "note": note}


def claims_table(seeds: pd.DataFrame) -> pd.DataFrame:
    """claims.csv from claims_seeds.csv's rows (a claims_seeds.csv without the ``step`` column, as written before
    matched progress, is read too; its claims at matched progress have no rows and are not testable)."""
    failed = []
    for c in CLAIMS:
        if c.precondition:
            j = judge(c, seeds[seeds["claim"] == c.name], [])
            if j["verdict"] != HOLDS:
                failed.append(f"{c.name} holds on {j['seeds_agreeing']} of {j['seeds_compared']} seeds")
    rows = []
    for c in CLAIMS:
        d = seeds[seeds["claim"] == c.name]
        j = judge(c, d, failed)
        stats = {}
        for r in ("opd", "grpo", "teacher", "effopd"):
            v = d.loc[d["run"] == r, "value"].astype(float).dropna()
            stats[r] = (float(v.mean()) if len(v) else np.nan, float(v.std(ddof=1)) if len(v) > 1 else np.nan)
        first = c.run if c.run in ("teacher", "effopd") else "opd"
        rows.append({"claim": c.name, "measure": c.measure, "paper": c.expect, "match": c.match,
                     "opd_mean": stats[first][0], "opd_sd": stats[first][1], "grpo_mean": stats["grpo"][0],
                     "grpo_sd": stats["grpo"][1], "n_seeds": int(d.dropna(subset=["value"])["seed"].nunique()), **j})
    return pd.DataFrame(rows, columns=TABLES["claims"].names)


def _num(x: float, digits: int = 3) -> str:
    return "" if pd.isna(x) else f"{x:.{digits}f}"


def markdown(table: pd.DataFrame) -> str:
    """claims.csv as a Markdown table: mean ± sd per run (the teacher's and EffOPD's values in the OPD column), the
    effect with its 95 % interval, seeds the paper's way, the sign test's p (the direction the verdict went, the
    paper's when inconclusive) and the paired t test's p, the verdict."""
    def pm(m, s):
        return "" if pd.isna(m) else f"{m:.3f}" + ("" if pd.isna(s) else f" ± {s:.3f}")

    lines = [f"| claim | measure | paper | OPD (teacher, EffOPD) | GRPO | effect [{CONFIDENCE:.0%} CI] | seeds the "
             "paper's way | sign p | t p | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        tested = r.verdict in (CONFIRMED, REFUTED, INCONCLUSIVE)
        ratio = r.paper == "speedup"
        if tested and not pd.isna(r.effect):
            fmt = (lambda x: f"{x:.2f}×") if ratio else (lambda x: f"{x:+.3f}")
            eff = fmt(r.effect) + ("" if pd.isna(r.ci_low) else f" [{fmt(r.ci_low)}, {fmt(r.ci_high)}]")
        else:
            eff = ""
        p = (r.p_other if r.verdict == REFUTED else r.p_value) if tested else math.nan
        seeds = f"{r.seeds_agreeing} / {r.seeds_compared}" if r.seeds_compared else ""
        if tested and r.seeds_compared > r.seeds_agreeing + r.seeds_against:
            seeds += f" ({r.seeds_compared - r.seeds_agreeing - r.seeds_against} tied)"
        lines.append(f"| {r.claim} | {r.measure} | {r.paper} | {pm(r.opd_mean, r.opd_sd)} | "
                     f"{pm(r.grpo_mean, r.grpo_sd)} | {eff} | {seeds} | {'' if not tested else fmt_p(p)} | "
                     f"{'' if not tested else fmt_p(r.p_t)} | "
                     f"**{r.verdict}**{': ' + r.note if r.verdict == NOT_TESTABLE else ''} |")
    return "\n".join(lines) + "\n"


def _rules(**extra) -> dict:
    return {"rule": RULE, "alpha": ALPHA, "confidence": CONFIDENCE, "teacher_min": TEACHER_MIN,
            "grpo_gain_min": GRPO_GAIN_MIN, "dip_margin": DIP_MARGIN, "matches": list(MATCHES), **extra}


def _write(tmp: Path, seeds: pd.DataFrame, meta: dict, log: Callable[[str], None]) -> pd.DataFrame:
    from opd_dynamics.io.writer import json_text

    table = claims_table(seeds)
    seeds.to_csv(tmp / TABLES["claims_seeds"].file, index=False)
    table.to_csv(tmp / TABLES["claims"].file, index=False)
    (tmp / "claims.md").write_text(markdown(table))
    (tmp / CLAIMS_JSON).write_text(json_text(meta))
    for r in table.itertuples():
        tested = r.verdict in (CONFIRMED, REFUTED, INCONCLUSIVE)
        log(f"[claims] {r.claim}: {r.verdict}" + (
            f" (sign p = {fmt_p(r.p_other if r.verdict == REFUTED else r.p_value)}, {r.seeds_agreeing}/"
            f"{r.seeds_compared} seeds the paper's way; effect {r.effect:.3g} [{r.ci_low:.3g}, {r.ci_high:.3g}]; "
            f"t p = {fmt_p(r.p_t)})" if tested else ""))
    return table


def lab_claims(root: str | Path, out: str | Path, *, effopd: str | Path | None = None,
               early_fraction: float = 0.2, overwrite: bool = False,
               log: Callable[[str], None] | None = None) -> Path:
    """Analyse every finished seed of ``root`` and write the claims tables into ``out`` (module docstring)."""
    from opd_dynamics.analysis import analyze
    from opd_dynamics.io.writer import atomic_dir

    log = log or (lambda m: print(m, flush=True))
    if not 0 < early_fraction < 1:
        raise InputError(None, f"early_fraction must lie in (0, 1), not {early_fraction}", ("early_fraction",))
    labs = seed_dirs(root)
    for lab in labs.values():
        lab.require(meta=True)
    if effopd is not None and not (Path(effopd) / EFFOPD_JSON).exists():
        raise InputError(effopd, f"is not an EffOPD measurement: {EFFOPD_JSON} is missing")
    out = Path(out).resolve()
    inputs = [Path(root).resolve(), *([Path(effopd).resolve()] if effopd else [])]
    with atomic_dir(out, "claims", overwrite=overwrite, inputs=inputs) as tmp:
        t0 = time.perf_counter()
        rows = []
        for seed, lab in labs.items():
            log(f"[claims] seed {seed}: analysing {', '.join(RUNS)} of {lab.root}")
            rep = analyze([lab.series(r) for r in RUNS], out=seed_dir(tmp / "analysis", seed), progress=False,
                          command=f"opd_dynamics.lab.claims.lab_claims({str(root)!r})")
            rows += [{"seed": seed, **r} for r in seed_values(lab, rep.tables, early_fraction)]
        if effopd is not None:
            rows += effopd_values(Path(effopd))
        seeds = pd.DataFrame(rows, columns=TABLES["claims_seeds"].names)
        _write(tmp, seeds, _rules(
            lab=str(Path(root).resolve()), seeds=list(labs),
            effopd=str(Path(effopd).resolve()) if effopd else None, early_fraction=early_fraction,
            seconds=round(time.perf_counter() - t0, 1)), log)
    return out


def claims_from_seeds(seeds_csv: str | Path, out: str | Path, *, overwrite: bool = False,
                      log: Callable[[str], None] | None = None) -> Path:
    """Judge an existing claims_seeds.csv again under the current rule (no analysis): claims_seeds.csv (with the
    current columns), claims.csv, claims.md and claims.json in ``out``."""
    from opd_dynamics.io.writer import atomic_dir

    log = log or (lambda m: print(m, flush=True))
    src = Path(seeds_csv)
    if not src.is_file():
        raise InputError(src, "is not a file (a claims_seeds.csv written by lab claims)", ("seeds_csv",))
    seeds = pd.read_csv(src)
    missing = {"seed", "claim", "run", "value"} - set(seeds.columns)
    if missing:
        raise InputError(src, f"is not a claims_seeds.csv: it lacks the column(s) {', '.join(sorted(missing))}",
                         ("seeds_csv",))
    seeds = seeds.reindex(columns=TABLES["claims_seeds"].names)
    out = Path(out).resolve()
    with atomic_dir(out, "claims", overwrite=overwrite, inputs=[src.resolve()]) as tmp:
        _write(tmp, seeds, _rules(from_seeds=str(src.resolve())), log)
    return out

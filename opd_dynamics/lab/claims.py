"""The paper's claims over a lab's seeds: for each claim, OPD and GRPO mean ± sd and a verdict, as measured.

`lab claims ROOT` reads every finished seed of a multi-seed lab (``ROOT/seed-K/``, `lab run --seeds N`), analyses
each seed's OPD and GRPO series against its student_init (`opd_dynamics.analysis.analyze`), and writes:

- ``claims_seeds.csv``: one row per seed, claim and run with the value measured;
- ``claims.csv``: per claim, mean ± sd over seeds per run, how many seeds went the paper's way, and the verdict;
- ``claims.md``: the same as a Markdown table (what docs/LAB.md quotes);
- ``claims.json``: the lab, its seeds, the EffOPD measurement read, the rules below;
- ``analysis/seed-K/``: each seed's analysis (the CSVs every value comes from).

Preconditions come first (the brief: show both methods learn before comparing them): the teacher reaches 0.95,
GRPO gains ≥ 0.15 held-out accuracy over the init, OPD does not dip (its lowest accuracy in the first
``early_fraction`` of steps stays within ``DIP_MARGIN`` of the init's). A comparison of OPD with GRPO is
"not testable" on a lab where a precondition fails on any seed.

Verdict of a paired claim (one value per run and seed): **confirmed** when every seed (≥ 3) goes the paper's
way, **refuted** when every seed goes the other way, **inconclusive** otherwise (a sign test: with 3 seeds
the chance that all agree by luck is 1/4). A claim the lab cannot test says why instead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from opd_dynamics.errors import InputError
from opd_dynamics.io.naming import MATRIX_GROUPS
from opd_dynamics.lab.layout import RUNS, LabDir, seed_dir, seed_dirs
from opd_dynamics.schema import EFFOPD_JSON, TABLES

CLAIMS_JSON = "claims.json"
TEACHER_MIN, GRPO_GAIN_MIN, DIP_MARGIN = 0.95, 0.15, 0.02
MIN_SEEDS = 3
LOW_UTILITY = ("embedding", "lm_head", "norm")

#: verdicts
CONFIRMED, REFUTED, INCONCLUSIVE, NOT_TESTABLE = "confirmed", "refuted", "inconclusive", "not testable"


@dataclass(frozen=True)
class Claim:
    """One row of the claims table: what is measured and which way the paper says it goes.

    ``expect``: ``"opd>grpo"`` or ``"opd<grpo"`` (paired per seed), ``">0"`` (``run``'s value against zero),
    ``">=min"`` (a precondition: ``run``'s value ≥ ``threshold`` on every seed) or ``"speedup"`` (EffOPD's
    per-seed step speedup: confirmed at a median ≥ ``threshold`` with every seed > 1)."""

    key: str
    name: str
    measure: str
    expect: str
    run: str = ""
    threshold: float = 0.0
    untestable: str = ""  # why the lab cannot test it, if it cannot

    @property
    def precondition(self) -> bool:
        return self.expect == ">=min"


CLAIMS: tuple[Claim, ...] = (
    Claim("teacher", "precondition: teacher", "teacher held-out greedy accuracy", ">=min", "teacher", TEACHER_MIN),
    Claim("grpo_gain", "precondition: GRPO learns", "held-out accuracy gain over the init, last step", ">=min",
          "grpo", GRPO_GAIN_MIN),
    Claim("opd_dip", "precondition: OPD learns without a dip", "lowest accuracy of the checkpoints in the early "
          "window minus the init's", ">=min", "opd", -DIP_MARGIN),
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
    Claim("opd_above_null", "early alignment above the null (OPD)", "direction cosine to the final update minus "
          "√(t/T), mean over attention and MLP, early step", ">0", "opd"),
    Claim("grpo_above_null", "early alignment above the null (GRPO)", "the same for GRPO", ">0", "grpo"),
    Claim("opd_before_grpo", "early alignment: OPD before GRPO", "the same, OPD against GRPO", "opd>grpo"),
    Claim("embedding_shift", "embedding shift", "1 − mean row cosine of the input embedding to the init's, last "
          "step", "opd<grpo", untestable="the lab's vocabulary has 16 tokens and every sequence uses all of them, so "
          "no row is rarely used; the paper's contrast is over a 150K-token table"),
    Claim("effopd", "EffOPD steps to target", "vanilla's steps to 95% of its final accuracy over EffOPD's, per "
          "paired seed", "speedup", "effopd", 2.0),
)
_BY_KEY = {c.key: c for c in CLAIMS}


def early_step(steps, fraction: float) -> int:
    """The first step at or after ``fraction`` of the last (the 'early' step of the alignment claims)."""
    steps = sorted(steps)
    return next(s for s in steps if s >= fraction * steps[-1])


def _middle(layers) -> set[int]:
    """The middle third of the layer indices 0 … L−1: L//3 ≤ l < L − L//3 (2, 3 of 6)."""
    n = int(max(layers)) + 1
    return set(range(n // 3, n - n // 3))


def _row(key: str, run: str, value: float) -> dict:
    return {"claim": _BY_KEY[key].name, "run": run, "value": float(value)}


def seed_values(lab: LabDir, tables: dict[str, pd.DataFrame], early_fraction: float) -> list[dict]:
    """One seed's values of every claim but EffOPD's, as rows {claim, run, value}."""
    rows = [_row("teacher", "teacher", lab.meta()["teacher"]["accuracy"])]
    a, s, seg, emb = (tables[t] for t in ("module_allocation", "spectrum", "segments", "embedding"))
    for r in RUNS:
        e = pd.read_csv(lab.eval_csv(r)).sort_values("step")
        init = float(e["accuracy"].iloc[0])
        early = e[(e["step"] > 0) & (e["step"] <= early_step(e["step"], early_fraction))]  # checkpoints, not the init
        last = int(a.loc[a["run"] == r, "step"].max())
        ar = a[(a["run"] == r) & (a["step"] == last)]
        f2 = ar["update_norm"].astype(float) ** 2
        mat = ar["group"].isin(MATRIX_GROUPS)
        blocks = mat & ar["layer"].notna()
        mid = ar["layer"].where(blocks).isin(_middle(ar.loc[blocks, "layer"].astype(int)))
        sr = s[(s["run"] == r) & (s["step"] == last) & s["group"].isin(MATRIX_GROUPS)]
        sr = sr[sr["spectral_norm"].astype(float) > 0]
        sg = seg[(seg["run"] == r) & seg["group"].isin(MATRIX_GROUPS)]
        excess = sg.loc[sg["step"] == early_step(sg["step"].unique(), early_fraction), "direction_excess"]
        er = emb[(emb["run"] == r) & (emb["step"] == last) & (emb["group"] == "embedding")]
        rows += [
            _row("grpo_gain", r, float(e["accuracy"].iloc[-1]) - init),
            _row("opd_dip", r, float(early["accuracy"].min()) - init),
            _row("low_utility", r, f2[ar["group"].isin(LOW_UTILITY)].sum() / f2.sum()),
            _row("mlp_share", r, f2[ar["group"] == "mlp"].sum() / f2[mat].sum()),
            _row("middle_share", r, f2[blocks & mid].sum() / f2[blocks].sum()),
            _row("spectral_ratio", r, sr["spectral_ratio"].astype(float).mean()),
            _row("top1pct", r, sr["top1pct_norm_ratio"].astype(float).mean()),
            _row("effective_rank", r, sr["effective_rank"].astype(float).mean()),
            _row(f"{r}_above_null", r, excess.astype(float).mean()),
            _row("opd_before_grpo", r, excess.astype(float).mean()),
            _row("embedding_shift", r, 1.0 - er["cosine_mean"].astype(float).mean()),
        ]
    return rows


def effopd_values(effopd: Path) -> list[dict]:
    """Per paired seed, EffOPD's step speedup (effopd.json), as rows {seed, claim, run, value}; gated-out
    seeds and missed targets have no ratio."""
    meta = json.loads((Path(effopd) / EFFOPD_JSON).read_text())
    per_seed = meta["speedup"]["effopd"]["per_seed"]
    return [{"seed": int(k), **_row("effopd", "effopd", v)} for k, v in per_seed.items() if v == v]


def _sign_verdict(d: np.ndarray) -> str:
    if len(d) < MIN_SEEDS:
        return INCONCLUSIVE
    if (d > 0).all():
        return CONFIRMED
    if (d < 0).all():
        return REFUTED
    return INCONCLUSIVE


def judge(claim: Claim, per_seed: pd.DataFrame, failed: list[str]) -> tuple[str, int, int, str]:
    """(verdict, seeds the paper's way, seeds compared, note) for one claim from its per-seed rows (columns
    seed, run, value); ``failed`` names the preconditions that failed (then no other claim is testable)."""
    if claim.untestable:
        return NOT_TESTABLE, 0, 0, claim.untestable
    wide = per_seed.pivot_table(index="seed", columns="run", values="value")
    needed = [claim.run] if claim.run else ["opd", "grpo"]
    if not set(needed) <= set(wide.columns):
        why = ("no seed passed the line-probe gate, or no EffOPD measurement was given" if claim.expect == "speedup"
               else f"no value for {' and '.join(needed)}")
        return NOT_TESTABLE, 0, 0, why
    if claim.precondition:
        v = wide[claim.run].dropna().to_numpy()
        ok = int((v >= claim.threshold).sum())
        return (CONFIRMED if ok == len(v) else REFUTED), ok, len(v), f"every seed ≥ {claim.threshold:g}"
    if failed:
        return NOT_TESTABLE, 0, 0, "a precondition failed: " + "; ".join(failed)
    if claim.expect == "speedup":
        v = wide[claim.run].dropna().to_numpy()
        med = float(np.median(v))
        ok = int((v > 1).sum())
        verdict = (CONFIRMED if med >= claim.threshold and ok == len(v) and len(v) >= MIN_SEEDS
                   else REFUTED if med <= 1 else INCONCLUSIVE)
        return verdict, ok, len(v), f"median {med:.2f}× (confirmed: ≥ {claim.threshold:g}× with every seed > 1×)"
    if claim.expect == ">0":
        d = wide[claim.run].dropna().to_numpy()
    else:
        d = (wide["opd"] - wide["grpo"]).dropna().to_numpy() * (1 if claim.expect == "opd>grpo" else -1)
    return _sign_verdict(d), int((d > 0).sum()), len(d), "sign over seeds"


def claims_table(seeds: pd.DataFrame) -> pd.DataFrame:
    """claims.csv from claims_seeds.csv's rows."""
    failed = []
    for c in CLAIMS:
        if c.precondition:
            v, ok, n, _ = judge(c, seeds[seeds["claim"] == c.name], [])
            if v != CONFIRMED:
                failed.append(f"{c.name} holds on {ok} of {n} seeds")
    rows = []
    for c in CLAIMS:
        d = seeds[seeds["claim"] == c.name]
        verdict, ok, n, note = judge(c, d, failed)
        stats = {}
        for r in ("opd", "grpo", "teacher", "effopd"):
            v = d.loc[d["run"] == r, "value"].astype(float)
            stats[r] = (float(v.mean()) if len(v) else np.nan, float(v.std(ddof=1)) if len(v) > 1 else np.nan)
        first = c.run if c.run in ("teacher", "effopd") else "opd"
        rows.append({"claim": c.name, "measure": c.measure, "paper": c.expect, "opd_mean": stats[first][0],
                     "opd_sd": stats[first][1], "grpo_mean": stats["grpo"][0], "grpo_sd": stats["grpo"][1],
                     "n_seeds": int(d["seed"].nunique()), "seeds_agreeing": ok, "seeds_compared": n,
                     "verdict": verdict, "note": note})
    return pd.DataFrame(rows, columns=TABLES["claims"].names)


def markdown(table: pd.DataFrame) -> str:
    """claims.csv as a Markdown table (mean ± sd; the teacher's and EffOPD's values in the OPD column)."""
    def pm(m, s):
        return "" if pd.isna(m) else f"{m:.3f}" + ("" if pd.isna(s) else f" ± {s:.3f}")

    lines = ["| claim | measure | paper | OPD (teacher, EffOPD) | GRPO | seeds the paper's way | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.claim} | {r.measure} | {r.paper} | {pm(r.opd_mean, r.opd_sd)} | "
                     f"{pm(r.grpo_mean, r.grpo_sd)} | {r.seeds_agreeing} / {r.seeds_compared} | "
                     f"**{r.verdict}**{': ' + r.note if r.verdict == NOT_TESTABLE else ''} |")
    return "\n".join(lines) + "\n"


def lab_claims(root: str | Path, out: str | Path, *, effopd: str | Path | None = None,
               early_fraction: float = 0.2, overwrite: bool = False,
               log: Callable[[str], None] | None = None) -> Path:
    """Analyse every finished seed of ``root`` and write the claims tables into ``out`` (module docstring)."""
    from opd_dynamics.analysis import analyze
    from opd_dynamics.io.writer import atomic_dir, json_text

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
        table = claims_table(seeds)
        seeds.to_csv(tmp / TABLES["claims_seeds"].file, index=False)
        table.to_csv(tmp / TABLES["claims"].file, index=False)
        (tmp / "claims.md").write_text(markdown(table))
        (tmp / CLAIMS_JSON).write_text(json_text({
            "lab": str(Path(root).resolve()), "seeds": list(labs), "effopd": str(Path(effopd).resolve()) if effopd
            else None, "early_fraction": early_fraction, "teacher_min": TEACHER_MIN, "grpo_gain_min": GRPO_GAIN_MIN,
            "dip_margin": DIP_MARGIN, "min_seeds": MIN_SEEDS, "seconds": round(time.perf_counter() - t0, 1)}))
        for r in table.itertuples():
            log(f"[claims] {r.claim}: {r.verdict}")
    return out

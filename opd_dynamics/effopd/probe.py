"""The line probe: is a trajectory one that extrapolation can help? Score W_t + c·(W_t − W_s) over a grid of c
for chosen pairs of steps (s, t), before spending evaluation on EffOPD or any other extrapolator.

c = 0 is W_t itself, c < 0 steps back towards W_s, c > 0 jumps ahead along the last segment. Candidates are
written beside the output, scored (a callable on a model directory, or a shell command as for `effopd search`),
and removed; one model of each is streamed at a time.

**The gate** (`verdict`): a pair is open when some c in [0.5, 2] (where EffOPD's first candidates lie) gains on
W_t by more than two paired standard errors (`analysis.stats.GATE_SES`) with the teacher KL not worse. A scorer
that returns a `ProbeScore` with per-item scores (e.g. 0/1 correctness per held-out prompt, the same prompts
for every candidate) gives the paired standard error of each gain, sd(x_c,i − x_0,i)/√n; with per-item KL the
KL counts as worse only when it rises by more than two of its own paired standard errors, with a KL alone when
it rises at all. A scorer that returns one number (a shell command) gives no standard error: its gains are taken
without a noise margin, and probe.json says so (``"margin"``). Where no pair opens, EffOPD (whose candidates are
c = 2k) has nothing to accept: that is the regime's verdict, not EffOPD's.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from opd_dynamics.analysis.stats import GATE_SES, gain_passes, paired_se
from opd_dynamics.effopd.offline import command_scorer, extrapolate_checkpoint
from opd_dynamics.effopd.options import EffOPDOptions
from opd_dynamics.effopd.search import Score, primary
from opd_dynamics.errors import InputError
from opd_dynamics.io.series import CheckpointSeries
from opd_dynamics.io.writer import atomic_dir, check_output, hidden_sibling, json_text, writing_for
from opd_dynamics.schema import PROBE_JSON, TABLES

#: the kind of output a probe directory is (its marker, `io.writer.OUTPUT_MARKER`)
PROBE = "probe"

#: the grid of c the design notes give (c = 0 is W_t)
DEFAULT_COEFS = (-0.5, 0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
#: the range of c where EffOPD's first candidates lie: a probe that improves there is worth a search
GATE_RANGE = (0.5, 2.0)
GATE_TEXT = f"c in [{GATE_RANGE[0]:g}, {GATE_RANGE[1]:g}]"


@dataclass(frozen=True)
class ProbeScore:
    """What a probe scorer may return instead of a number: the score (higher is better), and optionally its
    per-item values (``items``, the same items in the same order for every candidate: the score is their mean),
    the teacher KL (lower is better) and its per-item values. The gate needs ``items`` for its noise margin."""

    score: float
    items: Sequence[float] | None = None
    kl: float | None = None
    kl_items: Sequence[float] | None = None
    forward_kl: float | None = None  # KL(teacher ‖ model) on teacher samples: reported, not part of the gate


def _as_probe_score(got) -> ProbeScore:
    if isinstance(got, ProbeScore):
        return got
    return ProbeScore(primary(got))


def _pair_rows(scored: dict[float, ProbeScore]) -> list[dict]:
    """The probe.csv columns after the score for one pair's candidates (c → ProbeScore; c = 0 among them)."""
    w_t = scored[0.0]
    rows = []
    for c, p in scored.items():
        se = kl_se = math.nan
        if p.items is not None and w_t.items is not None:
            se = paired_se(np.asarray(w_t.items, float), np.asarray(p.items, float))
        if p.kl_items is not None and w_t.kl_items is not None:
            kl_se = paired_se(np.asarray(w_t.kl_items, float), np.asarray(p.kl_items, float))
        kl = math.nan if p.kl is None else float(p.kl)
        kl0 = math.nan if w_t.kl is None else float(w_t.kl)
        rows.append({"score": float(p.score), "gain": float(p.score) - float(w_t.score), "paired_se": se,
                     "kl": kl, "kl_se": kl_se, "forward_kl": math.nan if p.forward_kl is None else float(p.forward_kl),
                     "passes": bool(GATE_RANGE[0] <= c <= GATE_RANGE[1] and gate_passes(
                         float(p.score) - float(w_t.score), se, kl - kl0, kl_se))})
    return rows


def gate_passes(gain: float, se: float, kl_rise: float = math.nan, kl_se: float = math.nan) -> bool:
    """One candidate against W_t: its gain exceeds GATE_SES paired standard errors (any gain when the SE is
    unknown: a scorer without per-item scores) and its teacher KL is not worse (a rise of at most GATE_SES of
    its paired standard errors; none at all without them; no KL, no condition)."""
    if gain != gain or not gain > 0:
        return False
    if se == se and not gain_passes(gain, se):
        return False
    if kl_rise == kl_rise:
        return bool(kl_rise <= (GATE_SES * kl_se if kl_se == kl_se else 0.0))
    return True


def step_path(series: CheckpointSeries, step: int) -> Path:
    """The weights of a step (0: the base)."""
    if step == 0:
        return series.base
    found = dict(series.steps)
    if step not in found:
        raise InputError(None, f"step {step} is not a step of run {series.name!r} (its steps: "
                               f"{', '.join(map(str, found))}; 0 is the base)", ("pairs",))
    return found[step]


def check_pairs(series: CheckpointSeries, pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each pair (s, t) with s < t, both steps of the series (s may be 0, the base)."""
    if not pairs:
        raise InputError(None, "pairs is empty: give at least one pair of steps s:t", ("pairs",))
    for s, t in pairs:
        if not s < t:
            raise InputError(None, f"pair {s}:{t} must have its first step before its second", ("pairs",))
        step_path(series, s), step_path(series, t)
    return [(int(s), int(t)) for s, t in pairs]


def line_probe(series: CheckpointSeries, pairs: Sequence[tuple[int, int]], score: Callable[[Path], Score] | str, *,
               coefs: Sequence[float] = DEFAULT_COEFS, out: str | Path | None = None, overwrite: bool = False,
               options: EffOPDOptions | None = None, timeout: float | None = None,
               echo: Callable[[str], None] | None = None, work: str | Path | None = None, **fields) -> pd.DataFrame:
    """probe.csv's rows: score of W_t + c·(W_t − W_s) for each pair (s, t) and each c in ``coefs``. ``options``
    (or its keyword ``fields``: groups, matrices_only, naming_overrides) say which tensors move, as for EffOPD.
    With ``out``, probe.csv and probe.json are written there (atomically). Candidates are written in ``work``
    (default: beside ``out``, else a temporary directory), never among the inputs. c = 0 (W_t) is always
    scored: the verdict compares with it."""
    pairs = check_pairs(series, pairs)
    coefs = sorted({0.0, *(float(c) for c in coefs)})
    opts = replace(options or EffOPDOptions(), **fields)
    if out is not None:
        check_output(out, PROBE, overwrite=overwrite,
                     inputs=[series.base, *(p for _, p in series.steps)])
    scorer = command_scorer(score, timeout=timeout, echo=echo) if isinstance(score, str) else score
    own = work is None and out is None
    work = Path(tempfile.mkdtemp(prefix="opd-probe-")) if own else Path(work if work is not None else Path(out).parent)
    rows = []
    for s, t in pairs:
        ws, wt = step_path(series, s), step_path(series, t)
        scored: dict[float, ProbeScore] = {}
        for c in coefs:
            if c == 0.0:
                got = scorer(wt)
            else:
                cand = hidden_sibling(work / "probe", f"{s}-{t}")
                try:
                    with writing_for(None if out is None else Path(out), cand):  # said of OUT
                        extrapolate_checkpoint(ws, wt, c, cand, opts, read=series.read, weights=series.weights,
                                               prefer_format=series.prefer_format,
                                               metadata={"probe_pair": f"{s}:{t}"})
                    got = scorer(cand)
                finally:
                    shutil.rmtree(cand, ignore_errors=True)
            scored[c] = _as_probe_score(got)
        for c, extra in zip(scored, _pair_rows(scored), strict=True):
            rows.append({"run": series.name, "step_from": s, "step": t, "coef": c, **extra})
    if own:
        shutil.rmtree(work, ignore_errors=True)
    df = pd.DataFrame(rows, columns=TABLES["probe"].names)
    if out is not None:
        with atomic_dir(out, PROBE, overwrite=overwrite) as tmp:
            df.to_csv(tmp / TABLES["probe"].file, index=False)
            (tmp / PROBE_JSON).write_text(json_text({
                "run": series.name, "base": str(series.base), "pairs": pairs, "coefs": coefs,
                "select": opts.selection, "groups": opts.groups, "matrices_only": opts.matrices_only,
                "eval_cmd": score if isinstance(score, str) else None, "verdict": verdict(df),
                "gate": gate_text(df), "margin": margin_text(df)}))
    return df


def pair_label(s: int, t: int) -> str:
    """How a pair is named in verdicts and logs: 's:t'."""
    return f"{int(s)}:{int(t)}"


def verdict(probe: pd.DataFrame, lo: float = GATE_RANGE[0], hi: float = GATE_RANGE[1]) -> dict[str, bool]:
    """Per pair 's:t': whether the gate before EffOPD opens (module docstring): some c in [lo, hi] gains on c = 0
    (W_t) by more than two paired standard errors with the KL not worse. A probe.csv from before the gate had a
    noise margin (no gain column) is judged as it was then: any c in [lo, hi] above W_t."""
    out = {}
    for (s, t), d in probe.groupby(["step_from", "step"]):
        base = d.loc[d["coef"] == 0.0, "score"]
        ahead = d[(d["coef"] >= lo) & (d["coef"] <= hi)]
        if not len(base) or not len(ahead):
            out[pair_label(s, t)] = False
            continue
        if "gain" not in d.columns:
            out[pair_label(s, t)] = bool((ahead["score"] > float(base.iloc[0])).any())
            continue
        kl0 = d.loc[d["coef"] == 0.0, "kl"].astype(float)
        kl0 = float(kl0.iloc[0]) if len(kl0) else math.nan
        out[pair_label(s, t)] = any(gate_passes(float(r.gain), float(r.paired_se), float(r.kl) - kl0, float(r.kl_se))
                                    for r in ahead.itertuples())
    return out


def margin_text(probe: pd.DataFrame) -> str:
    """What noise margin the probe's gate had: two paired standard errors, or none (one number per candidate)."""
    if "paired_se" in probe.columns and probe["paired_se"].notna().any():
        return f"{GATE_SES:g} paired standard errors of the gain over W_t (per-item scores)"
    return "none: the scorer gave one number per candidate, so a gain has no standard error"


def gate_text(probe: pd.DataFrame) -> str:
    """The gate as one sentence, for logs and probe.json."""
    return (f"open where some {GATE_TEXT} gains on W_t by more than {GATE_SES:g} paired standard errors with the "
            f"teacher KL not worse (margin: {margin_text(probe)})")


def best_gain(probe: pd.DataFrame, lo: float = GATE_RANGE[0], hi: float = GATE_RANGE[1]) -> dict[str, dict]:
    """Per pair 's:t': the largest gain over W_t among c in [lo, hi], its c and paired standard error (for logs
    and effopd.json)."""
    out = {}
    for (s, t), d in probe.groupby(["step_from", "step"]):
        ahead = d[(d["coef"] >= lo) & (d["coef"] <= hi)]
        if "gain" not in d.columns or ahead.empty:
            continue
        r = ahead.loc[ahead["gain"].astype(float).idxmax()]
        out[pair_label(s, t)] = {"coef": float(r["coef"]), "gain": float(r["gain"]),
                                 "paired_se": float(r["paired_se"])}
    return out

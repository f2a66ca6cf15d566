"""The line probe: is a trajectory one that extrapolation can help? Score W_t + c·(W_t − W_s) over a grid of c
for chosen pairs of steps (s, t), before spending evaluation on EffOPD or any other extrapolator.

c = 0 is W_t itself, c < 0 steps back towards W_s, c > 0 jumps ahead along the last segment. Where no c in
[0.5, 2] scores above c = 0 at the early steps, EffOPD (whose candidates are c = 2k) has nothing to accept:
that is the regime's verdict, not EffOPD's. Candidates are written beside the output, scored (a callable on a
model directory, or a shell command as for `effopd search`), and removed; one model of each is streamed at
a time.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

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
        for c in coefs:
            if c == 0.0:
                got = scorer(wt)
            else:
                cand = hidden_sibling(work / "probe", f"{s}-{t}")
                try:
                    with writing_for(None if out is None else Path(out), cand):  # said of OUT
                        extrapolate_checkpoint(ws, wt, c, cand, opts, load_mode=series.load_mode,
                                               metadata={"probe_pair": f"{s}:{t}"})
                    got = scorer(cand)
                finally:
                    shutil.rmtree(cand, ignore_errors=True)
            rows.append({"run": series.name, "step_from": s, "step": t, "coef": c, "score": primary(got)})
    if own:
        shutil.rmtree(work, ignore_errors=True)
    df = pd.DataFrame(rows, columns=TABLES["probe"].names)
    if out is not None:
        with atomic_dir(out, PROBE, overwrite=overwrite) as tmp:
            df.to_csv(tmp / TABLES["probe"].file, index=False)
            (tmp / PROBE_JSON).write_text(json_text({
                "run": series.name, "base": str(series.base), "pairs": pairs, "coefs": coefs,
                "groups": opts.groups, "matrices_only": opts.matrices_only,
                "eval_cmd": score if isinstance(score, str) else None, "verdict": verdict(df)}))
    return df


def pair_label(s: int, t: int) -> str:
    """How a pair is named in verdicts and logs: 's:t'."""
    return f"{int(s)}:{int(t)}"


def verdict(probe: pd.DataFrame, lo: float = GATE_RANGE[0], hi: float = GATE_RANGE[1]) -> dict[str, bool]:
    """Per pair 's:t': whether some c in [lo, hi] scores above c = 0 (W_t) — the gate before EffOPD."""
    out = {}
    for (s, t), d in probe.groupby(["step_from", "step"]):
        base = d.loc[d["coef"] == 0.0, "score"]
        ahead = d.loc[(d["coef"] >= lo) & (d["coef"] <= hi), "score"]
        out[pair_label(s, t)] = bool(len(base) and len(ahead) and (ahead > float(base.iloc[0])).any())
    return out

"""Public entry points: `describe` (dry run) and `analyze` (the full pass) over one or more series."""

from __future__ import annotations

import platform
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from opd_dynamics._version import __version__
from opd_dynamics.analysis.caches import default_cache_root
from opd_dynamics.analysis.deltas import steps_text
from opd_dynamics.analysis.executors import JobResult, device_name, execute, resolve_executor
from opd_dynamics.analysis.options import AnalysisOptions, ExecutionOptions, resolve_options
from opd_dynamics.analysis.readers import ReaderCache, make_plans
from opd_dynamics.analysis.report import ANALYSIS, PER_TENSOR_TABLES, Report, api_command, build_tables
from opd_dynamics.errors import InputError
from opd_dynamics.io.model_dir import DTYPES
from opd_dynamics.io.naming import natural_key
from opd_dynamics.io.series import FOREIGN_MEDIAN, CheckpointSeries, check_same_architecture
from opd_dynamics.io.sketches import SketchSeries
from opd_dynamics.io.writer import (
    check_output,
    check_output_again,
    mark_output,
    output_errors,
    output_lock,
    replace_path,
)
from opd_dynamics.numerics import update_dtype

SeriesLike = CheckpointSeries | SketchSeries | Sequence[CheckpointSeries] | Sequence[SketchSeries]


def _as_list(series: SeriesLike) -> list[CheckpointSeries]:
    lst = [series] if isinstance(series, CheckpointSeries) else list(series)
    names = [s.name for s in lst]
    if len(set(names)) != len(names):
        raise InputError(None, f"run names must be distinct, got {names}")
    return lst


def describe(series: SeriesLike, groups: tuple[str, ...] | None = None, overrides=None) -> pd.DataFrame:
    """Dry run: one row per tensor and run with its placement, shape, dtype, steps and bytes to read."""
    rows = []
    lst = _as_list(series)
    with ReaderCache() as readers:  # a dry run keeps no reader
        plans = make_plans(lst, groups=groups, overrides=overrides, readers=readers)
    for plan in plans:
        for tp in plan.tensors:
            i = tp.info
            rows.append({"run": plan.series.name, "tensor": tp.name, "layer": i.layer, "group": i.group,
                         "module": i.module, "expert": i.expert, "shape": "x".join(map(str, tp.shape)),
                         "dtype": tp.stored_dtype, "transposed": tp.transposed, "resized": tp.resized,
                         "n_steps": len(tp.steps), "bytes_to_read": tp.bytes_to_read})
        for sk in plan.skipped:
            rows.append({"run": plan.series.name, "tensor": sk["tensor"], "skipped": sk["reason"]})
        for name, to in plan.tied.items():
            rows.append({"run": plan.series.name, "tensor": name, "tied_to": to})
    order = {s.name: i for i, s in enumerate(lst)}
    rows.sort(key=lambda r: (order[r["run"]], "skipped" in r or "tied_to" in r, natural_key(r["tensor"])))
    df = pd.DataFrame(rows)
    if "layer" in df:
        df["layer"] = pd.array(df["layer"], dtype="Int64")
    return df


def analyze(series: SeriesLike, *, out: str | Path | None = None, options: AnalysisOptions | None = None,
            execution: ExecutionOptions | None = None, overwrite: bool = False,
            groups: tuple[str, ...] | None = None, names: list[str] | None = None, overrides=None,
            command: str | None = None, **fields) -> Report:
    """Analyse one or more checkpoint series (e.g. OPD and RL from one base) into a Report.

    With `out`, the CSVs and run.json are written there: work goes to `.OUT.partial/` (which also holds
    per-tensor results, so rerunning the same command after an interruption resumes), renamed to OUT at
    the end. What is computed is `options`, how it runs `execution`; keyword `fields` of either replace
    theirs (svd='fast', geometry=True, device='cuda', workers=4, executor='ray', progress=False, …).
    `groups` (naming groups) and `names` (tensor names) select tensors; `overrides` adjusts the naming.
    Sketch series (`SketchSeries`, what `record.DynamicsRecorder` writes) give the tables a sketch determines
    (`analysis.sketch`).
    """
    opts, run = resolve_options(options, execution, fields)
    given = [series] if isinstance(series, (CheckpointSeries, SketchSeries)) else list(series)
    if any(isinstance(s, SketchSeries) for s in given):
        if not all(isinstance(s, SketchSeries) for s in given):
            raise InputError(None, "sketch series and checkpoint series cannot be analysed together; analyse them "
                                   "apart and compare the tables")
        from opd_dynamics.analysis.sketch import analyze_sketches

        return analyze_sketches(given, out=out, options=opts, overwrite=overwrite, command=command)
    executor = resolve_executor(run.executor, run.workers, run.ray_address)
    lst = _as_list(series)
    out_path = None if out is None else check_output(
        out, ANALYSIS, overwrite=overwrite, inputs=[p for s in lst for p in (s.base, *(p for _, p in s.steps))])
    _check_ref_step(lst, opts.ref_step)
    partial = out_path.parent / f".{out_path.name}.partial" if out_path is not None else None
    # one analyze per output; this pass's readers are closed when it ends (done or failed)
    with output_errors(out_path, partial), output_lock(out_path), ReaderCache() as readers:
        t0 = time.perf_counter()
        if executor != "ray":  # fail before any work; Ray tasks resolve the device against the cluster
            opts.resolved_device()
        if not opts.force_base:
            for s in lst:
                check_same_architecture(s, "pass --force-base to analyse it anyway")
        plans = make_plans(lst, names=names, groups=groups, overrides=overrides, readers=readers)
        t_plan = time.perf_counter() - t0
        if opts.token_ids:
            _check_token_ids(opts.token_ids, plans)
        resume_dir = partial / "cache" if partial is not None else None
        cache_root = Path(run.cache_dir) if run.cache_dir is not None else default_cache_root()
        results = execute(plans, opts, executor=executor, workers=run.workers, ray_address=run.ray_address,
                          resume_dir=resume_dir, cache_root=cache_root, progress=run.progress, readers=readers)
        tables, failed = _collect(results, lst)
        notes = wrong_base_warnings(tables["module_allocation"]) + nonfinite_warnings(tables["module_allocation"], lst)
        for n in notes:
            warnings.warn(n, UserWarning, stacklevel=2)
        timings = {"plan": round(t_plan, 3), "total": round(time.perf_counter() - t0, 3),
                   "tensor_compute_sum": round(sum(r.seconds for r in results), 3)}
        report = Report(tables, _provenance(plans, readers, results, opts, run, executor, command, timings, failed,
                                            notes, tables))
        if out_path is not None:
            _commit(report, partial, out_path, overwrite)
    if failed and not run.keep_going:
        raise InputError(None, failure_sentence(failed, out_path), ("keep_going",))
    return report


def _check_ref_step(lst: Sequence[CheckpointSeries], ref_step: int | None) -> None:
    """A reference step must be a step of every run."""
    if ref_step is None:
        return
    for s in lst:
        if ref_step not in dict(s.steps):
            raise InputError(None, f"ref_step {ref_step} is not a step of run {s.name!r} "
                                   f"(its steps: {', '.join(str(t) for t, _ in s.steps)})", ("ref_step",))


def _collect(results: list[JobResult], lst: Sequence[CheckpointSeries]) -> tuple[dict[str, pd.DataFrame], list]:
    """The tables from every tensor's rows, and what failed: one entry per tensor and step (step None: the whole
    tensor). Nothing analysed at all is one sentence."""
    rows: dict[str, list[dict]] = {t: [] for t in PER_TENSOR_TABLES}
    failed = []
    for r in results:
        if r.error is not None:
            failed.append({"run": r.run, "tensor": r.tensor, "step": None, "reason": r.error})
            continue
        failed += [{"run": r.run, "tensor": r.tensor, "step": s, "reason": why} for s, why in r.step_errors.items()]
        for t, rs in r.tables.items():
            rows[t].extend(rs)
    if not rows["module_allocation"]:
        first = failed[0]["reason"] if failed else "nothing was analysed"
        raise InputError(lst[0].base, f"no tensor could be analysed ({first})")
    return build_tables(rows), failed


def _provenance(plans, readers: ReaderCache, results, opts: AnalysisOptions, run: ExecutionOptions, executor: str,
                command: str | None, timings: dict, failed: list, notes: list[str],
                tables: dict[str, pd.DataFrame]) -> dict:
    """run.json: versions, command, inputs, options, dtype and device used, timings, what was skipped, tied or
    failed, the warnings and the tables' sizes."""
    return {
        "version": __version__,
        "command": command or api_command(),
        "python": platform.python_version(), "torch": torch.__version__,
        "inputs": [_series_meta(p, readers) for p in plans],
        "options": asdict(opts),
        "dtype": {"asked": opts.dtype, "used": _dtype_used(opts, plans)},
        "device": _device_meta(opts, executor, results),
        "executor": {"kind": executor, "workers": run.workers, "ray_address": run.ray_address},
        "timings_s": timings,
        "skipped": [sk for p in plans for sk in p.skipped],
        "tied": {p.series.name: p.tied for p in plans if p.tied},
        "failed": failed,
        "warnings": notes,
        "tables": {k: len(v) for k, v in tables.items()},
    }


def _commit(report: Report, partial: Path, out: Path, overwrite: bool) -> None:
    """Write the report into ``.OUT.partial/`` (tables an interrupted run left there are not this run's), mark it
    ours, drop the resume cache, and rename it to OUT (checked once more just before)."""
    partial.mkdir(parents=True, exist_ok=True)
    for f in partial.iterdir():
        if f.is_file():
            f.unlink()
    report.write_into(partial)
    mark_output(partial, ANALYSIS, report.meta["command"])
    shutil.rmtree(partial / "cache", ignore_errors=True)
    check_output_again(partial, out, ANALYSIS, overwrite=overwrite)
    replace_path(partial, out)


def failure_sentence(failed: list[dict], out: Path | None, most: int = 3) -> str:
    """One sentence for what could not be read (run.json's ``failed``): each tensor with its steps and the first
    reason, what was written anyway, and the flag that accepts the gaps."""
    by: dict[tuple[str, str], list[dict]] = {}
    for f in failed:
        by.setdefault((f["run"], f["tensor"]), []).append(f)
    runs = {r for r, _ in by}

    def item(run: str, tensor: str, fs: list[dict], alone: bool) -> str:
        steps = [f["step"] for f in fs if f["step"] is not None]
        where = (f" at {steps_text(steps)}" if steps else "") if not alone else \
            (f" could not be read at {steps_text(steps)}" if steps else " could not be analysed")
        of = f" of run {run!r}" if alone or len(runs) > 1 else ""
        return f"{'tensor ' if alone else ''}{tensor!r}{of}{where} ({fs[0]['reason']})"

    if len(by) == 1:
        (run, tensor), fs = next(iter(by.items()))
        text = item(run, tensor, fs, True)
    else:
        items = [item(r, t, fs, False) for (r, t), fs in list(by.items())[:most]]
        more = f" and {len(by) - most} more" if len(by) > most else ""
        text = (f"{len(by)} tensors{f' of run {next(iter(runs))!r}' if len(runs) == 1 else ''} failed: "
                + ", ".join(items) + more)
    gaps = "gap" if len(failed) == 1 else "gaps"
    wrote = (f"; the other tensors and steps were written to {out} (run.json lists what failed)"
             if out is not None else "")
    return f"{text}{wrote}; pass keep_going=True to accept the {gaps}"


def nonfinite_warnings(alloc: pd.DataFrame, series: Sequence[CheckpointSeries], most: int = 5) -> list[str]:
    """One sentence per run whose base holds NaN or Inf, and per run and step whose weights do (module_allocation's
    ``finite`` is False), naming the tensors: their updates have no norm, spectrum or share to speak of."""
    bases = {s.name: s.base for s in series}

    def names(ts) -> str:
        ts = list(dict.fromkeys(ts))  # in the tables' order
        shown = ", ".join(repr(t) for t in ts[:most]) + (f" and {len(ts) - most} more" if len(ts) > most else "")
        return f"{len(ts)} tensor{'s' if len(ts) > 1 else ''} ({shown})"

    out = []
    bad = alloc[~alloc["finite"].astype(bool)]
    for run, a in bad.groupby("run", sort=False):
        base_bad = ~np.isfinite(pd.to_numeric(a["base_norm"], errors="coerce"))
        if base_bad.any():
            ts = a.loc[base_bad, "tensor"]
            out.append(f"run {run!r}: the base {bases.get(run)} holds NaN or Inf in {names(ts)}, whose rows have "
                       "finite=False at every step and NaN spectra, energy shares and trajectories")
        for step, b in a[~base_bad].groupby("step", sort=True):
            out.append(f"run {run!r}, step {step}: NaN or Inf in {names(b['tensor'])}, whose rows have finite=False "
                       "and NaN spectra, energy shares and trajectories")
    return out


def wrong_base_warnings(alloc: pd.DataFrame) -> list[str]:
    """One sentence per run whose first step moved its median tensor by ≥ FOREIGN_MEDIAN of the base's norm:
    the signature of a wrong base (fine-tuning moves weights by a few percent; another model by about √2)."""
    out = []
    for run, a in alloc.groupby("run", sort=False):
        first = a[a["step"] == a["step"].min()]
        med = float(pd.to_numeric(first["relative_update"], errors="coerce").median())
        if med >= FOREIGN_MEDIAN:
            step = int(first["step"].iloc[0])
            out.append(f"run {run!r}: the median relative update ‖ΔW‖/‖W0‖ at its first step ({step}) is {med:.2f}; "
                       "is the base the run's start? (another model gives about 1.4)")
    return out


def _dtype_used(opts, plans) -> str:
    """What ΔW was formed in (`numerics.update_dtype`): the asked precision, float64 for tensors stored in float64."""
    used = {update_dtype(DTYPES[tp.stored_dtype], opts.torch_dtype) for p in plans for tp in p.tensors}
    text = opts.dtype if used <= {opts.torch_dtype} else "float32, float64 for tensors stored in float64"
    return text + "; norms and cosines summed in float64"


def _device_meta(opts: AnalysisOptions, executor: str, results: Sequence[JobResult]) -> dict:
    """run.json's device: what the workers that computed tensors used (with Ray, the cluster's cards)."""
    used = sorted({r.device for r in results if r.device is not None})
    if not used and executor != "ray":  # every tensor from the resume cache
        dev = opts.resolved_device()
        used = [(dev, device_name(dev))]
    return {"asked": opts.device, "used": ", ".join(u for u, _ in used) or "none (every tensor came from the cache)",
            "name": ", ".join(sorted({n for _, n in used}))}


def _check_token_ids(ids: Sequence[int], plans) -> None:
    """Token ids must index the largest embedding table of every run (before any work is done)."""
    for plan in plans:
        rows = [tp.shape[0] for tp in plan.tensors if tp.info.group == "embedding" and len(tp.shape) == 2]
        if not rows:
            raise InputError(None, f"token_ids were given but run {plan.series.name!r} has no embedding table",
                             ("token_ids",))
        bad = [i for i in ids if not 0 <= i < max(rows)]
        if bad:
            raise InputError(None, f"token id {bad[0]} is outside the vocabulary of run {plan.series.name!r} "
                                   f"({max(rows)} embedding rows)")


def _series_meta(plan, readers: ReaderCache) -> dict:
    s = plan.series
    r = readers.reader_for(s)
    return {"run": s.name, "base": str(s.base), "base_header_sha256": r.base.header_sha256,
            "base_bytes": r.base.nbytes(),
            "steps": [{"step": st, "path": str(p), "header_sha256": r.steps[st].header_sha256,
                       "bytes": r.steps[st].nbytes()} for st, p in s.steps],
            "tensors": len(plan.tensors), "bytes_to_read": plan.bytes_to_read}

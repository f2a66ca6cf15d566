"""The one-command demo: smoke lab → analysis of OPD and GRPO → interventions → EffOPD → figures → HTML.

Layout of ``out``: ``lab/`` (teacher, student_init, opd/, grpo/), ``analysis/`` (CSVs + run.json),
``interventions/``, ``effopd/``, ``extrapolation/`` (every extrapolator from each saved step but the last),
``figures/`` (PNG), ``report.html`` and
``demo.json`` (stage timings). ``fast=True`` shrinks every stage (a few SFT/RL steps, short EffOPD) so a
test can run the whole chain in well under a few minutes; the numbers it produces mean nothing.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from opd_dynamics.io.writer import check_output, json_text, mark_output, output_errors

STAGES = ("lab", "analysis", "interventions", "effopd", "extrapolation", "figures", "report")
_MARKER = "demo.json"
#: the kind of output a demo directory is (its marker, `io.writer.OUTPUT_MARKER`)
DEMO = "demo"


def fast_preset(preset: str = "smoke"):
    """A shrunken copy of ``preset``: short SFT, 10 RL steps saved every 5, 32 eval prompts (for tests)."""
    from opd_dynamics.lab.presets import get_preset

    p = get_preset(preset)
    return replace(p, name=f"{p.name}-fast", n_train=2000, n_heldout=100, teacher_max_steps=60,
                   student_max_steps=40, sft_eval_every=20, rl_steps=10, save_steps=5, rollouts_per_step=16,
                   grpo_generations=4, n_eval=32)


def _prepare(out: Path, overwrite: bool) -> None:
    """Refuse an existing ``out`` unless ``overwrite``; even then only replace an earlier demo's output (or an empty
    directory); then make ``out``, marked as the demo's from the start (an interrupted demo is replaced by the
    next). The stages write into it as it goes, each its own output."""
    if check_output(out, DEMO, overwrite=overwrite).exists():
        with output_errors(out):
            shutil.rmtree(out)
    with output_errors(out):
        out.mkdir(parents=True)
        mark_output(out, DEMO)


def run_demo(out: str | Path, preset: str = "smoke", *, overwrite: bool = False, fast: bool = False,
             seed: int = 0, log: Callable[[str], None] | None = None) -> Path:
    """Run every stage into ``out`` and return the path of ``out/report.html``."""
    from opd_dynamics.analysis import analyze
    from opd_dynamics.lab.effopd import EffOPDLabOptions, run_effopd_lab
    from opd_dynamics.lab.extrapolation import lab_extrapolation
    from opd_dynamics.lab.interventions import lab_interventions
    from opd_dynamics.lab.layout import RUNS, LabDir
    from opd_dynamics.lab.presets import get_preset
    from opd_dynamics.lab.run import run_lab
    from opd_dynamics.plotting import plot_all
    from opd_dynamics.plotting.html import render_html

    log = log or (lambda m: print(m, flush=True))
    out = Path(out).resolve()
    p = fast_preset(preset) if fast else get_preset(preset)  # a bad preset is refused before OUT is touched
    _prepare(out, overwrite)
    timings: dict[str, float] = {}
    meta = {"preset": p.name, "seed": seed, "fast": fast, "status": "running", "timings_s": timings}
    with output_errors(out):
        (out / _MARKER).write_text(json_text(meta))
    t_all = time.perf_counter()

    def stage(name: str, i: int) -> float:
        log(f"[demo] stage {i}/{len(STAGES)}: {name}")
        return time.perf_counter()

    t = stage("lab (teacher, student_init, OPD and GRPO runs)", 1)
    lab = run_lab(out / "lab", preset=p, seed=seed, log=log)
    timings["lab"] = round(time.perf_counter() - t, 1)

    t = stage("analysis of opd and grpo against student_init", 2)
    series = [LabDir(lab).series(r) for r in RUNS]
    analyze(series, out=out / "analysis", progress=False, command=f"opd_dynamics.lab.demo.run_demo({str(out)!r})")
    timings["analysis"] = round(time.perf_counter() - t, 1)

    t = stage("interventions", 3)
    inter = out / "interventions"
    lab_interventions(lab, inter, log=log, **({"n_eval": 16, "n_rescale_steps": 2} if fast else {}))
    timings["interventions"] = round(time.perf_counter() - t, 1)

    t = stage("EffOPD comparison (vanilla, effopd, fixed; 1 seed)", 4)
    opt = EffOPDLabOptions(max_steps=10, eval_every=5, n_val=10) if fast else EffOPDLabOptions(eval_every=10)
    opt = replace(opt, methods=("vanilla", "effopd", "fixed"))  # the demo leaves out the rate controls (lab effopd)
    eff = run_effopd_lab(out / "effopd", preset=p, seeds=[seed], lab=lab, options=opt, log=log)
    timings["effopd"] = round(time.perf_counter() - t, 1)

    t = stage("extrapolators from each saved step but the last", 5)
    steps = series[0].step_numbers
    extrap = lab_extrapolation(lab, out / "extrapolation", fractions=[s / steps[-1] for s in steps[:-1]],
                               log=log, **({"n_eval": 16} if fast else {}))
    timings["extrapolation"] = round(time.perf_counter() - t, 1)

    sources = [out / "analysis", lab, inter, eff, extrap]
    t = stage("figures", 6)
    res = plot_all(sources, out / "figures", formats=("png",))
    log(f"[demo] {len(res)} figure files in {out / 'figures'}"
        + (f"; not drawn: {', '.join(sorted(res.skipped))}" if getattr(res, "skipped", None) else ""))
    timings["figures"] = round(time.perf_counter() - t, 1)

    t = stage("HTML report", 7)
    html = render_html(sources, out / "report.html", title="opd-dynamics demo")
    timings["report"] = round(time.perf_counter() - t, 1)

    timings["total"] = round(time.perf_counter() - t_all, 1)
    meta.update(status="done", report=str(html))
    with output_errors(out):
        (out / _MARKER).write_text(json_text(meta))
    log(f"[demo] done in {timings['total']:.0f} s; report: {html}")
    return html

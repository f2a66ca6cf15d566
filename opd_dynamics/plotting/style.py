"""One look for every figure: seaborn theme as an rc context, and the fixed colour of each run and method.

OPD is always the same blue; every other run (GRPO, RL, PPO, ...) takes the next colour of a fixed
colour-blind-safe palette in sorted-name order, so 'grpo' is the same vermillion in every figure.
Nothing here touches global matplotlib state: figures are built inside `opd_style()` (an rc context)
on `matplotlib.figure.Figure` objects that pyplot never registers.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import matplotlib
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from opd_dynamics.io.naming import GROUPS, natural_key
from opd_dynamics.plotting._fit import FittedLayout

# Okabe-Ito (colour-blind safe)
OPD_COLOR = "#0072B2"
OTHER_RUN_COLORS = ("#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
METHOD_COLORS = {"vanilla": OPD_COLOR, "effopd": "#009E73", "fixed": "#E69F00"}
GROUP_ORDER = GROUPS  # the naming order
GROUP_MARKERS = {"attention": "o", "mlp": "s"}
HEATMAP_CMAP = "viridis"

_F = TypeVar("_F", bound=Callable[..., Figure])


def is_opd(run: str) -> bool:
    """A run named 'opd' (any case) gets the OPD colour."""
    return str(run).strip().lower() == "opd"


def run_colors(runs: Iterable[str]) -> dict[str, str]:
    """Colour per run: 'opd' → OPD_COLOR; the others, in natural name order (seed-2 before seed-10), →
    OTHER_RUN_COLORS in order."""
    runs = sorted({str(r) for r in runs}, key=natural_key)
    others = [r for r in runs if not is_opd(r)]
    out = {r: OPD_COLOR for r in runs if is_opd(r)}
    for i, r in enumerate(others):
        out[r] = OTHER_RUN_COLORS[i % len(OTHER_RUN_COLORS)]
    return out


def method_colors(methods: Iterable[str]) -> dict[str, str]:
    """Colour per EffOPD method: vanilla (OPD blue), effopd, fixed fixed; unknown ones from the run palette."""
    methods = sorted({str(m) for m in methods})
    unknown = [m for m in methods if m not in METHOD_COLORS]
    spare = [c for c in OTHER_RUN_COLORS if c not in METHOD_COLORS.values()]
    out = {m: METHOD_COLORS[m] for m in methods if m in METHOD_COLORS}
    for i, m in enumerate(unknown):
        out[m] = spare[i % len(spare)]
    return out


def order_runs(runs: Iterable[str]) -> list[str]:
    """OPD first, then the others in natural name order (legend order)."""
    runs = sorted({str(r) for r in runs}, key=natural_key)
    return [r for r in runs if is_opd(r)] + [r for r in runs if not is_opd(r)]


def _rc() -> dict:
    rc = dict(sns.axes_style("whitegrid"))
    rc.update(sns.plotting_context("notebook", font_scale=0.85))
    rc.update({
        "figure.dpi": 100,
        "savefig.dpi": 150,
        "axes.titlesize": 11,
        "axes.titleweight": "bold",
        "figure.titlesize": 13,
        "figure.titleweight": "bold",
        "legend.frameon": False,
        "legend.fontsize": 9,
        "lines.linewidth": 1.8,
        "lines.markersize": 5,
        "svg.fonttype": "none",
    })
    return rc


@contextlib.contextmanager
def opd_style() -> Iterator[None]:
    """The project's seaborn/matplotlib look, restored on exit (no global state leaks)."""
    with matplotlib.rc_context(rc=_rc()):
        yield


def styled(fn: _F) -> _F:
    """Decorator: build the figure inside `opd_style()`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with opd_style():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def new_figure(nrows: int = 1, ncols: int = 1, *, width: float | None = None, height: float | None = None,
               sharex: bool | str = False, sharey: bool | str = False):
    """A pyplot-free Figure (never registered globally, so no leaks) with a 2-D array of axes, laid out by
    `FittedLayout`: constrained layout whose every draw wraps (or shrinks) a title or axis label that would not fit
    in the canvas."""
    width = width if width is not None else 4.2 * ncols + 0.6
    height = height if height is not None else 3.3 * nrows + 0.5
    fig = Figure(figsize=(width, height), layout=FittedLayout())
    FigureCanvasAgg(fig)  # a real renderer: the texts are measured (fit_texts) and `fig.canvas.draw()` works
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=sharex, sharey=sharey)
    return fig, axes

"""Small drawing helpers shared by the figure modules."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes

from opd_dynamics.plotting._fit import MARGIN


def grouped_bars(ax: Axes, categories: Sequence[str], series: Mapping[str, Sequence[float]],
                 colors: Mapping[str, str], *, labels: bool = True, fmt: str = "{:.3g}") -> None:
    """One bar per (category, series), series side by side within each category; value printed on top."""
    n = max(len(series), 1)
    width = 0.8 / n
    x = np.arange(len(categories))
    for i, (name, values) in enumerate(series.items()):
        vals = np.asarray(values, dtype=float)
        bars = ax.bar(x + (i - (n - 1) / 2) * width, np.nan_to_num(vals), width * 0.95, label=name,
                      color=colors[name])
        if labels:
            ax.bar_label(bars, labels=["" if np.isnan(v) else fmt.format(v) for v in vals], fontsize=7, padding=1)
    ax.set_xticks(x, list(categories))
    ax.grid(axis="x", visible=False)


def zoom_ylim(ax: Axes, values, *, pad: float = 0.15, floor: float | None = None, ceil: float | None = None) -> None:
    """Y range around the data (for quantities like cosines near 1 where a 0-based axis hides differences)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return
    lo, hi = float(v.min()), float(v.max())
    span = max(hi - lo, 1e-3 * max(abs(hi), 1.0))
    lo, hi = lo - pad * span * 2, hi + pad * span * 2
    if floor is not None:
        lo = max(lo, floor)
    if ceil is not None:
        hi = min(hi, ceil)
    ax.set_ylim(lo, hi)


def iqr_band(ax: Axes, x, q25, q75, color: str) -> None:
    ax.fill_between(np.asarray(x, float), np.asarray(q25, float), np.asarray(q75, float), color=color, alpha=0.15,
                    linewidth=0)


def no_data(ax: Axes, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def fig_legend(fig, axes, *, title: str | None = None, ncol: int | None = None) -> None:
    """One legend for the whole figure, below the panels (labels deduplicated, order of first appearance), in
    `ncol` columns (default up to 4), fewer when that is wider than the canvas."""
    seen: dict[str, object] = {}
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if not lab.startswith("_") and lab not in seen:
                seen[lab] = h
    if not seen:
        return
    ncol = ncol or min(len(seen), 4)
    room = fig.bbox.width * (1 - 2 * MARGIN)
    while True:  # fewer columns while the legend is wider than the canvas
        leg = fig.legend(list(seen.values()), list(seen.keys()), loc="outside lower center", title=title, ncol=ncol)
        if ncol == 1 or leg.get_window_extent(fig.canvas.get_renderer()).width <= room:
            return
        leg.remove()
        ncol -= 1


def integer_xticks(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def layer_ticks(first: int, last: int, most: int = 11) -> list[int]:
    """Integer ticks from `first` to `last`, both included, at a round spacing (1, 2, 5, 10, 20 …) that gives at
    most about `most` of them; the last layer replaces a tick closer to it than half the spacing."""
    span = max(last - first, 0)
    step = 1
    for base in (1, 2, 5, 10, 20, 25, 50, 100, 200, 500, 1000):
        step = base
        if span / base + 1 <= most:
            break
    ticks = list(range(first, last + 1, step))
    if ticks[-1] != last:
        if last - ticks[-1] < step / 2 and len(ticks) > 1:
            ticks[-1] = last
        else:
            ticks.append(last)
    return ticks


def layer_axis(ax: Axes, layers, axis: str = "x") -> None:
    """A layer axis that spans exactly the layers shown: from half a layer before the first to half a layer
    after the last (layers 0–29: −0.5 … 29.5, never 30), integer ticks ending at the last layer."""
    v = sorted({int(x) for x in layers})
    if not v:
        return
    lo, hi = v[0], v[-1]
    if axis == "x":
        ax.set_xlim(lo - 0.5, hi + 0.5)
        ax.set_xticks(layer_ticks(lo, hi))
    else:
        ax.set_ylim(lo - 0.5, hi + 0.5)
        ax.set_yticks(layer_ticks(lo, hi))


def percent_axis(ax: Axes, axis: str = "y") -> None:
    """Show fractions as percentages (decimals chosen from the range, so close ticks stay distinct)."""
    from matplotlib.ticker import PercentFormatter

    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(PercentFormatter(1.0, decimals=None))

"""Texts that fit: every figure's suptitle, axes titles and axis labels are measured with the renderer after the
layout (`FittedLayout`, the figures' layout engine) and wrapped onto more lines (never inside a $…$ math span), or
shrunk, until each lies inside its room: the suptitle within the canvas less a margin on each side, an axes title
and x label within the panel's width, a y label within its height. (A figure legend gets fewer columns when
wider than the canvas: `_draw.fig_legend`.)

The layout is in inches and text in points, so a figure that fits at one resolution fits at another up to the
rounding of glyph widths; the margin (MARGIN of the width on each side) absorbs that, and the texts are fitted again
at each draw's own resolution, so the PNG (150 dpi) and the HTML report's image (110 dpi) show the same whole
titles."""

from __future__ import annotations

import math

from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.text import Text

#: the share of the canvas width kept free on each side of the suptitle, and of a panel for its texts
MARGIN = 0.03
_MIN_SCALE = 0.7  # a text is never shrunk below 70 % of its size
_ROUNDS = 3


def _words(s: str) -> list[str]:
    """Words of `s` split at spaces, a $…$ math span kept in one piece."""
    out: list[str] = []
    for w in s.split(" "):
        if out and out[-1].count("$") % 2 == 1:  # inside a math span: glue the space back
            out[-1] += " " + w
        else:
            out.append(w)
    return out


def _greedy(words: list[str], width: int) -> list[str]:
    lines: list[str] = []
    cur = ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    return [*lines, cur]


def _wrap(words: list[str], n_lines: int) -> str:
    """The words on `n_lines` lines of about equal length: the narrowest greedy wrap with that many lines."""
    width = math.ceil((sum(len(w) for w in words) + len(words) - 1) / n_lines)
    while len(lines := _greedy(words, width)) > n_lines:
        width += 1
    return "\n".join(lines)


def _extent(t: Text, renderer, vertical: bool) -> float:
    bb = t.get_window_extent(renderer)
    return bb.height if vertical else bb.width


def fit_text(t: Text, room: float, renderer, *, vertical: bool = False) -> bool:
    """Make `t` at most `room` display units long (wide, or tall when `vertical`): wrap it onto 2, 3, … lines
    (as many as it has words), then shrink it; True when it changed."""
    text = t.get_text()
    if not text or not t.get_visible() or room <= 0 or _extent(t, renderer, vertical) <= room:
        return False
    one_line = " ".join(text.split("\n"))
    words = _words(one_line)
    for n in range(2, len(words) + 1):
        t.set_text(_wrap(words, n))
        if _extent(t, renderer, vertical) <= room:
            return True
        if n >= 4:  # four lines is the most a title gets; shrink beyond that
            break
    size = t.get_fontsize()
    floor = size * _MIN_SCALE
    while _extent(t, renderer, vertical) > room and size > floor:
        size *= 0.92
        t.set_fontsize(size)
    return True


def _titles(ax) -> list[Text]:
    return [t for t in (ax.title, ax._left_title, ax._right_title) if t.get_text()]


def fit_texts(fig: Figure, renderer=None) -> bool:
    """Wrap or shrink the suptitle, panel titles and axis labels of the laid-out `fig` until each fits its room
    (module docstring); True when one changed (the layout is then out of date)."""
    r = renderer or fig._get_renderer()
    width = fig.bbox.width
    changed = False
    if fig._suptitle is not None:
        changed |= fit_text(fig._suptitle, width * (1 - 2 * MARGIN), r)
    for ax in fig.axes:
        if not ax.get_visible() or not ax.axison and not _titles(ax):
            continue
        panel = ax.bbox.width * (1 - MARGIN)
        for t in _titles(ax):
            changed |= fit_text(t, min(panel, width * (1 - 2 * MARGIN)), r)
        changed |= fit_text(ax.xaxis.label, panel, r)
        changed |= fit_text(ax.yaxis.label, ax.bbox.height * (1 - MARGIN), r, vertical=True)
    return changed


class FittedLayout(ConstrainedLayoutEngine):
    """Constrained layout, then `fit_texts` at the resolution being drawn; laid out again while a text changed
    (at most a few rounds). Every draw runs it, so a figure fits in the PNG, the report and a notebook alike, and
    the texts are wrapped once: later draws find them fitting and cost no extra layout."""

    def execute(self, fig):
        super().execute(fig)
        for _ in range(_ROUNDS):
            if not fit_texts(fig):
                break
            super().execute(fig)

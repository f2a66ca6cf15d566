"""This process's open readers of the series being analysed, kept across the tensors of a pass (and, in a Ray
worker, across passes while the files are unchanged), and the plans made from them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from opd_dynamics.analysis.deltas import Plan, SeriesReader, plan_series
from opd_dynamics.errors import InputError
from opd_dynamics.io.series import CheckpointSeries

_READERS: dict[tuple, SeriesReader] = {}


def _reader_key(series: CheckpointSeries) -> tuple:
    return (series.name, str(series.base), tuple((s, str(p)) for s, p in series.steps), series.load_mode)


@contextmanager
def readers_released(series: Sequence[CheckpointSeries]) -> Iterator[None]:
    """On leaving (done or failed), close this process's readers of `series`: no descriptor or mapping of
    the inputs outlives a pass over them."""
    try:
        yield
    finally:
        for s in series:
            r = _READERS.pop(_reader_key(s), None)
            if r is not None:
                r.close()


def is_open(series: CheckpointSeries) -> bool:
    """Whether this process holds a reader of `series` (none outlives a pass: see `readers_released`)."""
    return _reader_key(series) in _READERS


def reader_for(series: CheckpointSeries, inputs: str | None = None) -> SeriesReader:
    """This process's reader of `series`; with `inputs` (the identity the analysis started from), a reader
    kept from an earlier analysis (a Ray worker's) whose files were rewritten since is opened afresh."""
    key = _reader_key(series)
    r = _READERS.get(key)
    if r is not None and inputs is not None and r.identity != inputs:
        r.close()
        r = None
    if r is None:
        r = _READERS[key] = SeriesReader(series)
        if inputs is not None and r.identity != inputs:
            raise InputError(None, f"the base or a checkpoint of run {series.name!r} changed on disk after the "
                                   "analysis started; run again")
    return r


# Below this many elements a tensor is analysed on one thread, torch's and BLAS's alike: two threads gain
# nothing there (48x128 decompositions: 0.38 ms either way), and on a loaded machine each tiny parallel
# region waits for a descheduled thread (the shipped lab series: 22 s with two torch threads vs 3.4 s with
# one, beside two busy processes), while idle OpenBLAS threads spin and slow their neighbours. From
# 128x512 up, two threads are faster (2.1 vs 2.4 ms), so larger tensors keep them, except that torch keeps
# one where spectra run on the CPU: those do their heavy linear algebra in scipy's BLAS, whose threads
# and torch's would take turns spinning (2 layers x 2 steps of 0.5B shapes: 4.1 s with one torch thread
# against 6.0 s with two).

def make_plans(series: Sequence[CheckpointSeries], names: list[str] | None = None,
               groups: tuple[str, ...] | None = None, overrides=None) -> list[Plan]:
    return [plan_series(s, names=names, groups=groups, overrides=overrides, reader=reader_for(s)) for s in series]


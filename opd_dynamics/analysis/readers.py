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


def make_plans(series: Sequence[CheckpointSeries], names: list[str] | None = None,
               groups: tuple[str, ...] | None = None, overrides=None) -> list[Plan]:
    return [plan_series(s, names=names, groups=groups, overrides=overrides, reader=reader_for(s)) for s in series]


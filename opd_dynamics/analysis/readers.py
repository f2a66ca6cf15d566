"""Open readers of the series being analysed, kept across the tensors of a pass, and the plans made from them.

A `ReaderCache` is an explicit object: `analyze` and `describe` make one per pass and hand it to the plans and
the in-process run, and close it when the pass ends (done or failed). A worker process (a `--workers` process or
a Ray worker) analyses jobs that arrive one at a time, so it keeps one cache for its lifetime
(`worker_readers`): a Ray worker reuses its readers across passes while the files are unchanged. The
module-level functions (`reader_for`, `readers_released`, `is_open`, `make_plans` without `readers`) act on
that worker cache."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from opd_dynamics.analysis.deltas import Plan, SeriesReader, plan_series
from opd_dynamics.errors import InputError
from opd_dynamics.io.series import CheckpointSeries


def _reader_key(series: CheckpointSeries) -> tuple:
    return (series.name, str(series.base), tuple((s, str(p)) for s, p in series.steps), series.read, series.weights,
            series.prefer_format)


class ReaderCache:
    """Open `SeriesReader`s by series. As a context manager it closes every reader it holds on leaving."""

    def __init__(self) -> None:
        self._readers: dict[tuple, SeriesReader] = {}

    def reader_for(self, series: CheckpointSeries, inputs: str | None = None) -> SeriesReader:
        """The reader of `series`, opened once; with `inputs` (the identity the analysis started from), a reader
        kept from an earlier analysis (a Ray worker's) whose files were rewritten since is opened afresh, and
        one that still differs (a checkpoint rewritten during the run) is refused."""
        key = _reader_key(series)
        r = self._readers.get(key)
        if r is not None and inputs is not None and r.identity != inputs:
            r.close()
            r = None
        if r is None:
            r = self._readers[key] = SeriesReader(series)
            if inputs is not None and r.identity != inputs:
                raise InputError(None, f"the base or a checkpoint of run {series.name!r} changed on disk after "
                                       "the analysis started; run again")
        return r

    def is_open(self, series: CheckpointSeries) -> bool:
        """Whether this cache holds a reader of `series`."""
        return _reader_key(series) in self._readers

    def close(self, series: Sequence[CheckpointSeries] | None = None) -> None:
        """Close the readers of `series` (all of them when None): no descriptor or mapping outlives them."""
        keys = list(self._readers) if series is None else [_reader_key(s) for s in series]
        for key in keys:
            r = self._readers.pop(key, None)
            if r is not None:
                r.close()

    @contextmanager
    def released(self, series: Sequence[CheckpointSeries]) -> Iterator[ReaderCache]:
        """On leaving (done or failed), close the readers of `series`."""
        try:
            yield self
        finally:
            self.close(series)

    def __enter__(self) -> ReaderCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@functools.cache
def worker_readers() -> ReaderCache:
    """This worker process's readers, one cache for its lifetime (made on first use; the process that runs
    `analyze` passes its own cache instead)."""
    return ReaderCache()


def readers_released(series: Sequence[CheckpointSeries]):
    """`ReaderCache.released` of this process's worker cache."""
    return worker_readers().released(series)


def is_open(series: CheckpointSeries) -> bool:
    """Whether this process's worker cache holds a reader of `series`."""
    return worker_readers().is_open(series)


def reader_for(series: CheckpointSeries, inputs: str | None = None) -> SeriesReader:
    """`ReaderCache.reader_for` of this process's worker cache."""
    return worker_readers().reader_for(series, inputs)


def make_plans(series: Sequence[CheckpointSeries], names: list[str] | None = None,
               groups: tuple[str, ...] | None = None, overrides=None,
               readers: ReaderCache | None = None) -> list[Plan]:
    """One plan per series, read through `readers` (this process's worker cache when None)."""
    readers = readers if readers is not None else worker_readers()
    return [plan_series(s, names=names, groups=groups, overrides=overrides, reader=readers.reader_for(s))
            for s in series]

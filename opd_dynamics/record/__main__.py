"""``python -m opd_dynamics.record``: the recorder's worker process (`record.worker.main`), started by
`record.worker.ProcessWorker`. The entry point is the package, not ``record.worker`` itself, which the package
imports first and runpy would then run a second time. Guarded: the worker's helper processes (`record.shards`,
multiprocessing's spawn) import this module again under another name."""

from opd_dynamics.record.worker import main

if __name__ == "__main__":
    main()

"""Running the per-tensor jobs of a pass: serially, in worker processes, or as Ray tasks; with thread limits
tuned to the tensor's size, a resume cache, and progress."""

from __future__ import annotations

import functools
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from threadpoolctl import ThreadpoolController, threadpool_limits

from opd_dynamics.analysis.caches import ResultCache
from opd_dynamics.analysis.deltas import Plan, TensorPlan, failure_reason
from opd_dynamics.analysis.options import EXECUTORS, AnalysisOptions
from opd_dynamics.analysis.readers import ReaderCache, worker_readers
from opd_dynamics.analysis.tensor import analyze_tensor
from opd_dynamics.errors import InputError
from opd_dynamics.io.series import CheckpointSeries


@functools.cache
def device_name(device: str) -> str:
    """The card's or the CPU's name, for run.json."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()



@dataclass
class Job:
    """One tensor of one series: picklable, so it can run in a worker process or a Ray task."""

    series: CheckpointSeries
    plan: TensorPlan
    opts: AnalysisOptions
    cache_root: str | None
    inputs: str | None = None  # the series' identity when the analysis started (SeriesReader.identity)
    # the in-process run's readers (`analyze`'s cache); None in a worker process or Ray task, which reads
    # through its own lifetime cache (`readers.worker_readers`). Never sent to a worker: it holds open files.
    readers: ReaderCache | None = field(default=None, repr=False, compare=False)


@dataclass
class JobResult:
    run: str
    tensor: str
    tables: dict[str, list[dict]] = field(default_factory=dict)
    error: str | None = None  # why the tensor has no rows at all
    seconds: float = 0.0
    device: tuple[str, str] | None = None  # (device used, its name), as the worker that ran the job saw it
    step_errors: dict[int, str] = field(default_factory=dict)  # steps that could not be read (the others have rows)


# Below this many elements a tensor is analysed on one thread, torch's and BLAS's alike: two threads gain
# nothing there (48x128 decompositions: 0.38 ms either way), and on a loaded machine each tiny parallel
# region waits for a descheduled thread (the shipped lab series: 22 s with two torch threads vs 3.4 s with
# one, beside two busy processes), while idle OpenBLAS threads spin and slow their neighbours. From
# 128x512 up, two threads are faster (2.1 vs 2.4 ms), so larger tensors keep them, except that torch keeps
# one where spectra run on the CPU: those do their heavy linear algebra in scipy's BLAS, whose threads
# and torch's would take turns spinning (2 layers x 2 steps of 0.5B shapes: 4.1 s with one torch thread
# against 6.0 s with two).
SINGLE_THREAD_NUMEL = 1 << 16
_BLAS = ThreadpoolController()  # scipy's BLAS is loaded by now (metrics.spectrum imports it)


@contextmanager
def _thread_limits(job: Job) -> Iterator[None]:
    small = job.plan.numel < SINGLE_THREAD_NUMEL
    one_torch = small or (job.opts.svd != "none" and job.opts.resolved_device() == "cpu")
    before = torch.get_num_threads()
    with ExitStack() as stack:
        if small:
            stack.enter_context(_BLAS.limit(limits=1, user_api="blas"))
        if one_torch and before > 1:
            torch.set_num_threads(1)
            stack.callback(torch.set_num_threads, before)
        yield


def run_job(job: Job) -> JobResult:
    """Analyse one tensor; any failure is returned as a reason, never raised (one bad tensor ≠ a lost run): a step
    that cannot be read in ``step_errors`` (the tensor's other steps keep their rows), anything else in ``error``."""
    t0 = time.perf_counter()
    try:
        dev = job.opts.resolved_device()
        failed: dict[int, str] = {}
        with _thread_limits(job):
            readers = job.readers if job.readers is not None else worker_readers()
            tables = analyze_tensor(readers.reader_for(job.series, job.inputs), job.plan, job.opts,
                                    Path(job.cache_root) if job.cache_root else None, failed)
        return JobResult(job.series.name, job.plan.name, tables, None, time.perf_counter() - t0,
                         (dev, device_name(dev)), dict(sorted(failed.items())))
    except Exception as e:  # noqa: BLE001 — recorded with where it was raised in run.json
        return JobResult(job.series.name, job.plan.name, {}, failure_reason(e), time.perf_counter() - t0)


def _init_worker(threads: int, parent: int) -> None:
    """Each worker process gets its share of the cores, for torch and for scipy's BLAS alike, and dies with the
    process that started it (`die_with_parent`)."""
    die_with_parent(parent)
    torch.set_num_threads(threads)
    threadpool_limits(threads, user_api="blas")


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when its parent dies, even by SIGKILL, which no cleanup sees (Linux's
    PR_SET_PDEATHSIG; elsewhere nothing): a killed analyze must not leave workers holding half a GB each. A parent
    that died before this call is caught by comparing the parent pid."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:
            os._exit(1)



def resolve_executor(executor: str | None, workers: int, ray_address: str | None) -> str:
    """The executor to use: unnamed, Ray when a cluster address is given, worker processes when more than
    one worker is asked for, else serial. Options the named executor would ignore are refused."""
    if executor is None:
        executor = "ray" if ray_address else "process" if workers > 1 else "serial"
    if executor not in EXECUTORS:
        raise InputError(None, f"executor must be one of {EXECUTORS}, not {executor!r}", ("executor",))
    if executor == "serial" and workers > 1:
        raise InputError(None, f"workers {workers} needs executor process or ray: serial analyses one tensor "
                               "at a time", ("workers", "executor"))
    if ray_address and executor != "ray":
        raise InputError(None, f"ray_address is for executor ray, not {executor}", ("ray_address", "executor"))
    return executor


def execute(plans: Sequence[Plan], opts: AnalysisOptions, *, executor: str = "serial", workers: int = 1,
            ray_address: str | None = None, resume_dir: Path | None = None, cache_root: Path | None = None,
            progress: bool = True, readers: ReaderCache | None = None) -> list[JobResult]:
    """Run every tensor of every plan (executor as `resolve_executor` chose it); results come back in plan order.
    `readers` are the plans' (`make_plans`), which the serial run reads through (this process's worker cache
    when None); worker processes and Ray tasks each read through their own."""
    from tqdm.auto import tqdm

    readers = readers if readers is not None else worker_readers()
    cache = ResultCache(resume_dir)
    jobs: list[tuple[Job, str]] = []
    done: dict[int, JobResult] = {}
    for plan in plans:
        inputs = readers.reader_for(plan.series).identity
        for tp in plan.tensors:
            job = Job(plan.series, tp, opts, str(cache_root) if cache_root else None, inputs)
            key = cache.key(job.series.name, tp, job.inputs, opts)
            hit = cache.get(key)
            if hit is not None:
                done[len(jobs)] = JobResult(plan.series.name, tp.name, hit, None, 0.0)
            jobs.append((job, key))
    todo = [i for i in range(len(jobs)) if i not in done]
    bar = tqdm(total=len(jobs), initial=len(done), unit="tensor", desc="analyse", disable=not progress,
               dynamic_ncols=True)

    def finish(i: int, res: JobResult) -> None:
        done[i] = res
        if res.error is None and not res.step_errors:  # a tensor with gaps is read again by the next run
            cache.put(jobs[i][1], res.tables)
        bar.update(1)

    try:
        if executor == "serial" or not todo:
            for i in todo:
                finish(i, run_job(replace(jobs[i][0], readers=readers)))
        elif executor == "process":
            import multiprocessing as mp

            threads = max(1, (os.cpu_count() or 1) // max(1, workers))
            from concurrent.futures.process import BrokenProcessPool

            pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                       initializer=_init_worker, initargs=(threads, os.getpid()))
            try:
                futs = {pool.submit(run_job, jobs[i][0]): i for i in todo}
                for f in as_completed(futs):
                    finish(futs[f], f.result())
            except BrokenProcessPool as e:
                raise InputError(None, f"a worker process died ({e}), e.g. killed for memory; rerun with fewer "
                                       "workers (with out, the tensors already finished are not redone)",
                                 ("workers", "out")) from e
            finally:  # on Ctrl-C or a dead worker, do not run the queued tensors first
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            _run_ray(jobs, todo, finish, workers, ray_address, opts.device)
    finally:
        bar.close()
    return [done[i] for i in range(len(jobs))]


def ray_task_device(asked: str, cluster_gpus: float) -> tuple[str, int]:
    """(device, GPUs per task) for Ray tasks. Ray hides every GPU from a task that asks for none
    (CUDA_VISIBLE_DEVICES=''), so CUDA work must ask for one; Ray then gives each task its own card,
    which is why 'cuda:N' has no meaning here. 'auto' means CUDA when the cluster has GPUs."""
    if asked.startswith("cuda:"):
        raise InputError(None, f"device {asked} cannot be used with executor ray: Ray gives each task its "
                               "own GPU; use device cuda (or auto)", ("device", "executor"))
    if asked == "cuda" and cluster_gpus < 1:
        raise InputError(None, "device cuda was asked for but the Ray cluster has no GPU "
                               "(ray.cluster_resources() lists none)", ("device",))
    if asked == "cuda" or (asked == "auto" and cluster_gpus >= 1):
        return "cuda", 1
    return "cpu", 0


def _run_ray(jobs: list[tuple[Job, str]], todo: list[int], finish: Callable[[int, JobResult], None],
             workers: int, address: str | None, device: str) -> None:
    """Each tensor as a Ray task; at most `workers` in flight so memory stays bounded on every node.
    The device is resolved against the cluster, not the driver (which may have no GPU)."""
    try:
        import ray
    except ImportError as e:
        raise InputError(None, "executor ray needs Ray: pip install 'opd-dynamics[ray]'", ("executor",)) from e
    started_here = not ray.is_initialized()
    if started_here and address and address != "auto":
        _check_reachable(address)
    if started_here:
        kw = {"address": address} if address else {"num_cpus": max(workers, 1), "include_dashboard": False}
        ray.init(ignore_reinit_error=True, log_to_driver=False, **kw)
    pending: dict = {}
    queue = list(todo)
    try:
        task_device, gpus = ray_task_device(device, ray.cluster_resources().get("GPU", 0))
        remote = ray.remote(num_cpus=1, num_gpus=gpus)(run_job)
        while queue or pending:
            while queue and len(pending) < max(workers, 1):
                i = queue.pop(0)
                job = jobs[i][0]
                pending[remote.remote(replace(job, opts=replace(job.opts, device=task_device)))] = i
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    res = ray.get(ref)
                except ray.exceptions.RayError as e:  # a worker that died: the tensor is named, the run goes on
                    res = JobResult(jobs[i][0].series.name, jobs[i][0].plan.name, {},
                                    f"its Ray worker failed: {type(e).__name__}", 0.0)
                finish(i, res)
    finally:
        if started_here:
            ray.shutdown()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """One sentence instead of Ray's endless reconnection warnings when --ray-address points nowhere."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise InputError(None, f"ray_address {address} cannot be reached ({e}); start the cluster or "
                               "leave it out to start a local Ray instance", ("ray_address",)) from None



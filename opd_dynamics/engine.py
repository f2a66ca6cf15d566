"""The analysis engine: one pass per tensor over a whole series, on any device, serial, in worker
processes, or as Ray tasks, with a per-tensor result cache so an interrupted run resumes.

Per tensor: W_0 is read once; the reference step's update (default the last step) is read and
decomposed once; then every step's W_t is read once and all metrics of that step are computed from the
one decomposition of its ΔW_t. The base's own decomposition (geometry) is computed once per base tensor
and cached on disk, shared by every run and series from that base.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from threadpoolctl import ThreadpoolController, threadpool_limits

from opd_dynamics.deltas import Plan, SeriesReader, StepUpdate, TensorPlan, iter_updates, plan_series, read_base, read_step
from opd_dynamics.errors import InputError
from opd_dynamics.metrics.embeddings import embedding_metrics
from opd_dynamics.metrics.geometry import BaseDecomposition, decompose_base, geometry_metrics
from opd_dynamics.metrics.norms import fro2, norm_metrics
from opd_dynamics.metrics.spectrum import decompose, spectrum_metrics, top_singular_values
from opd_dynamics.metrics.subspace import alignment_metrics
from opd_dynamics.report import PER_TENSOR_TABLES
from opd_dynamics.series import CheckpointSeries
from opd_dynamics.writer import atomic_file, atomic_write_text

SVD_MODES = ("exact", "fast", "none")
EXECUTORS = ("serial", "process", "ray")


@dataclass(frozen=True)
class AnalysisOptions:
    """Everything that changes what a pass computes (part of the resume-cache key)."""

    svd: str = "exact"  # exact | fast (randomized top-k, labelled) | none (norms only)
    ks: tuple[int, ...] = (1, 4, 16, 64)
    k_subspace: int = 16
    k_paired: int = 20
    ref_step: int | None = None  # alignment reference; None = last step
    alignment: bool = True
    geometry: bool = False  # geometry.csv; exact in every svd mode (needs W_t's whole spectrum)
    dtype: str = "float32"  # float32 | float64: precision of W_t − W_0
    device: str = "cpu"  # cpu | cuda | auto
    n_singular_values: int = 64
    spectra_groups: tuple[str, ...] = ("attention", "mlp")
    token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.svd not in SVD_MODES:
            raise InputError(None, f"--svd must be one of {SVD_MODES}, not {self.svd!r}")
        if self.dtype not in ("float32", "float64"):
            raise InputError(None, f"--dtype must be float32 or float64 (never a 16-bit type), not {self.dtype!r}")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise InputError(None, f"--device must be cpu, cuda or auto, not {self.device!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            vis = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise InputError(None, "--device cuda was asked for but torch sees no CUDA device"
                                   + (f" (CUDA_VISIBLE_DEVICES={vis!r})" if vis is not None else ""))
        return self.device


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


def default_cache_root() -> Path:
    return Path(os.environ.get("OPD_DYNAMICS_CACHE", Path.home() / ".cache" / "opd-dynamics"))


def _sha(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------------------------
# per tensor
# ---------------------------------------------------------------------------------------------
def _ident(series: CheckpointSeries, tp: TensorPlan) -> dict:  # identifying columns of every row
    i = tp.info
    return {"run": series.name, "tensor": tp.name, "layer": i.layer, "group": i.group, "module": i.module,
            "expert": i.expert}


def _base_decomposition(reader: SeriesReader, tp: TensorPlan, w0: torch.Tensor, cache_root: Path | None,
                        unit: int | None = None) -> BaseDecomposition:
    """The base's decomposition for geometry, from the disk cache when an earlier run made it."""
    if cache_root is None:
        return decompose_base(w0)
    from safetensors.torch import load_file, save_file

    from opd_dynamics import __version__

    key = _sha(tp.name, tp.shape, unit, w0.dtype, __version__)  # a new version may decompose differently
    path = cache_root / "base" / reader.base.identity / f"{key}.safetensors"
    if path.exists():
        try:
            return BaseDecomposition.from_tensors({k: v.to(w0.device) for k, v in load_file(str(path)).items()})
        except Exception:  # a damaged cache entry is recomputed, never trusted
            path.unlink(missing_ok=True)
    dec = decompose_base(w0)
    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in dec.to_tensors().items()}, str(tmp))
    return dec


def _steps_with_ref(reader: SeriesReader, tp: TensorPlan, w0: torch.Tensor, ref: StepUpdate | None,
                    materialize: bool) -> Iterator[StepUpdate]:
    """Every step's update in order, reusing the already-read reference step instead of reading it twice."""
    others = [s for s in tp.steps if ref is None or s != ref.step]
    it = iter_updates(reader, tp, w0, others, materialize=materialize)
    for s in tp.steps:
        yield ref if (ref is not None and s == ref.step) else next(it)


def _units(tp: TensorPlan) -> list[int | None]:
    """The matrices inside one stored tensor: itself, or one per expert for stacked experts ((E, out, in)
    as analysed: see naming.stored_transposed)."""
    if len(tp.shape) == 3 and tp.info.group == "mlp" and "experts" in tp.name:
        return list(range(tp.shape[0]))
    return [None]


def analyze_tensor(reader: SeriesReader, tp: TensorPlan, opts: AnalysisOptions,
                   cache_root: Path | None = None) -> dict[str, list[dict]]:
    """All rows of every table for one stored tensor over the whole series."""
    series = reader.series
    device = opts.resolved_device()
    out: dict[str, list[dict]] = {t: [] for t in PER_TENSOR_TABLES}
    group = tp.info.group
    units = _units(tp)
    mshape = tp.shape[1:] if units != [None] else tp.shape
    matrix = (len(mshape) == 2 and min(mshape) > 1 and group in opts.spectra_groups and opts.svd != "none")
    # the norm columns and embedding cosines run on the base and steps as stored; only spectra need floats
    # ΔW in the asked precision, never below the stored one (float64 checkpoints stay float64)
    work = torch.float64 if tp.stored_dtype == "F64" else opts.torch_dtype
    w0 = read_base(reader, tp, work if matrix else None, device)
    k_vec = max(opts.k_subspace, opts.k_paired)
    part = (lambda t, u: t if u is None else t[u])  # noqa: E731
    ref_update, dec_ref = None, {}
    if matrix and opts.alignment:
        ref_step = opts.ref_step if opts.ref_step in tp.steps else tp.steps[-1]
        ref_update = read_step(reader, tp, ref_step, w0)
        dec_ref = {u: decompose(part(ref_update.delta, u), k_vectors=k_vec, mode=opts.svd) for u in units}
    base_dec = ({u: _base_decomposition(reader, tp, part(w0, u), cache_root, u) for u in units}
                if (matrix and opts.geometry) else {})
    shape_s = "x".join(map(str, mshape))
    numel = tp.numel // len(units)
    base_f2 = {u: fro2(part(w0, u)) for u in units}
    for upd in _steps_with_ref(reader, tp, w0, ref_update, materialize=matrix):
        for u in units:
            ident = {**_ident(series, tp), "step": upd.step}
            if u is not None:
                ident["expert"] = u
            w0u = part(w0, u)
            lora = None if upd.lora_delta is None else part(upd.lora_delta, u)
            out["module_allocation"].append({**ident, "shape": shape_s, "numel": numel,
                                             **norm_metrics(w0u, part(upd.raw, u), lora, base_f2[u]),
                                             "resized": tp.resized})
            if group == "embedding" and len(mshape) == 2:
                wt_raw = part(upd.raw, u)
                ids = None if opts.token_ids is None else \
                    [i for i in opts.token_ids if i < max(w0u.shape[0], wt_raw.shape[0])]  # a positional table: fewer rows
                out["embedding"].append({**ident, **embedding_metrics(w0u, wt_raw, ids),
                                         "resized": tp.resized})
            if not matrix:
                continue
            wtu, du = part(upd.weight, u), part(upd.delta, u)
            is_ref = ref_update is not None and upd.step == ref_update.step
            dec = dec_ref[u] if is_ref else decompose(du, k_vectors=k_vec, mode=opts.svd)
            out["spectrum"].append({**ident, **spectrum_metrics(dec, opts.ks)})
            fro = dec.fro2 ** 0.5 if dec.fro2 > 0 else float("nan")
            for i, s in enumerate(top_singular_values(dec, opts.n_singular_values).tolist(), start=1):
                out["singular_values"].append({**ident, "index": i, "sigma": s, "sigma_normalized": s / fro})
            if ref_update is not None:
                out["alignment"].append({**ident, "ref_step": ref_update.step,
                                         **alignment_metrics(dec, dec_ref[u], du, part(ref_update.delta, u),
                                                             k=opts.k_subspace, K=opts.k_paired)})
            if base_dec:
                out["geometry"].append({**ident, **geometry_metrics(base_dec[u], wtu, du, dec.fro2)})
    return out


# ---------------------------------------------------------------------------------------------
# scheduling
# ---------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One tensor of one series: picklable, so it can run in a worker process or a Ray task."""

    series: CheckpointSeries
    plan: TensorPlan
    opts: AnalysisOptions
    cache_root: str | None
    inputs: str | None = None  # the series' identity when the analysis started (SeriesReader.identity)


@dataclass
class JobResult:
    run: str
    tensor: str
    tables: dict[str, list[dict]] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    device: tuple[str, str] | None = None  # (device used, its name), as the worker that ran the job saw it


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


def _reader_for(series: CheckpointSeries, inputs: str | None = None) -> SeriesReader:
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
    """Analyse one tensor; any failure is returned as a reason, never raised (one bad tensor ≠ a lost run)."""
    t0 = time.perf_counter()
    try:
        dev = job.opts.resolved_device()
        with _thread_limits(job):
            tables = analyze_tensor(_reader_for(job.series, job.inputs), job.plan, job.opts,
                                    Path(job.cache_root) if job.cache_root else None)
        return JobResult(job.series.name, job.plan.name, tables, None, time.perf_counter() - t0,
                         (dev, device_name(dev)))
    except InputError as e:
        return JobResult(job.series.name, job.plan.name, {}, str(e), time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 — recorded with where it was raised in run.json
        where = traceback.extract_tb(e.__traceback__)[-1]
        return JobResult(job.series.name, job.plan.name, {},
                         f"{type(e).__name__}: {e} (at {Path(where.filename).name}:{where.lineno})",
                         time.perf_counter() - t0)


def _init_worker(threads: int) -> None:
    """Each worker process gets its share of the cores, for torch and for scipy's BLAS alike."""
    torch.set_num_threads(threads)
    threadpool_limits(threads, user_api="blas")


class ResultCache:
    """Per-tensor results on disk, keyed by the inputs' identity and the options."""

    def __init__(self, root: Path | None):
        self.root = root

    def key(self, job: Job) -> str:
        """Everything a tensor's rows depend on: the package version, the run name, the tensor as planned (its
        parsed name under any naming overrides, orientation, shape, steps), the inputs and the options."""
        from opd_dynamics import __version__

        return _sha(__version__, job.series.name, repr(job.plan), job.inputs,
                    json.dumps(asdict(job.opts), sort_keys=True))

    def get(self, key: str) -> dict | None:
        if self.root is None:
            return None
        p = self.root / f"{key}.json"
        if not p.exists():
            return None
        try:
            got = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a damaged entry is recomputed, never trusted
        return got if isinstance(got, dict) else None

    def put(self, key: str, tables: dict) -> None:
        if self.root is None:
            return
        atomic_write_text(self.root / f"{key}.json", json.dumps(tables))


def resolve_executor(executor: str | None, workers: int, ray_address: str | None) -> str:
    """The executor to use: unnamed, Ray when a cluster address is given, worker processes when more than
    one worker is asked for, else serial. Options the named executor would ignore are refused."""
    if executor is None:
        executor = "ray" if ray_address else "process" if workers > 1 else "serial"
    if executor not in EXECUTORS:
        raise InputError(None, f"--executor must be one of {EXECUTORS}, not {executor!r}")
    if executor == "serial" and workers > 1:
        raise InputError(None, f"--workers {workers} needs --executor process or ray: serial analyses one tensor "
                               "at a time")
    if ray_address and executor != "ray":
        raise InputError(None, f"--ray-address is for --executor ray, not {executor}")
    return executor


def execute(plans: Sequence[Plan], opts: AnalysisOptions, *, executor: str = "serial", workers: int = 1,
            ray_address: str | None = None, resume_dir: Path | None = None, cache_root: Path | None = None,
            progress: bool = True) -> list[JobResult]:
    """Run every tensor of every plan (executor as `resolve_executor` chose it); results come back in plan order."""
    from tqdm.auto import tqdm

    cache = ResultCache(resume_dir)
    jobs: list[tuple[Job, str]] = []
    done: dict[int, JobResult] = {}
    for plan in plans:
        inputs = _reader_for(plan.series).identity
        for tp in plan.tensors:
            job = Job(plan.series, tp, opts, str(cache_root) if cache_root else None, inputs)
            key = cache.key(job)
            hit = cache.get(key)
            if hit is not None:
                done[len(jobs)] = JobResult(plan.series.name, tp.name, hit, None, 0.0)
            jobs.append((job, key))
    todo = [i for i in range(len(jobs)) if i not in done]
    bar = tqdm(total=len(jobs), initial=len(done), unit="tensor", desc="analyse", disable=not progress,
               dynamic_ncols=True)

    def finish(i: int, res: JobResult) -> None:
        done[i] = res
        if res.error is None:
            cache.put(jobs[i][1], res.tables)
        bar.update(1)

    try:
        if executor == "serial" or not todo:
            for i in todo:
                finish(i, run_job(jobs[i][0]))
        elif executor == "process":
            import multiprocessing as mp

            threads = max(1, (os.cpu_count() or 1) // max(1, workers))
            from concurrent.futures.process import BrokenProcessPool

            pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                       initializer=_init_worker, initargs=(threads,))
            try:
                futs = {pool.submit(run_job, jobs[i][0]): i for i in todo}
                for f in as_completed(futs):
                    finish(futs[f], f.result())
            except BrokenProcessPool as e:
                raise InputError(None, f"a worker process died ({e}), e.g. killed for memory; rerun with fewer "
                                       "--workers (with --out, the tensors already finished are not redone)") from e
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
        raise InputError(None, f"--device {asked} cannot be used with --executor ray: Ray gives each task its "
                               "own GPU; use --device cuda (or auto)")
    if asked == "cuda" and cluster_gpus < 1:
        raise InputError(None, "--device cuda was asked for but the Ray cluster has no GPU "
                               "(ray.cluster_resources() lists none)")
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
        raise InputError(None, "--executor ray needs Ray: pip install 'opd-dynamics[ray]'") from e
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
        raise InputError(None, f"--ray-address {address} cannot be reached ({e}); start the cluster or "
                               "leave the option out to start a local Ray instance") from None


def make_plans(series: Sequence[CheckpointSeries], names: list[str] | None = None,
               groups: tuple[str, ...] | None = None, overrides=None) -> list[Plan]:
    return [plan_series(s, names=names, groups=groups, overrides=overrides, reader=_reader_for(s)) for s in series]

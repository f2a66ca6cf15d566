"""Where the exact analysis spends its time on one device: per-operation timings on one model's large
matrices, then a torch.profiler table of `analyze` (geometry on, base decomposition cached) on a small
series of that model's shapes.

Operations, each the median of --repeat runs after a warm-up: the float64 Gram, eigvalsh and eigh of it
(and, on CUDA, four eigh serially against two threads on two streams), `decompose` of an update (top-20 vectors,
spectrum and alignment) and of W_t (top ceil(1% r) vectors, geometry), `decompose_base`, and the
geometry, alignment and spectrum metrics given their decompositions.

    python benchmarks/profile_analysis.py --device cuda --model 7b
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_io  # noqa: E402
from bench_analysis import MODELS  # noqa: E402
from bench_kernels import sync, timed  # noqa: E402

from opd_dynamics import CheckpointSeries, analyze  # noqa: E402
from opd_dynamics.analysis.metrics.geometry import decompose_base, geometry_metrics, top_k_for  # noqa: E402
from opd_dynamics.analysis.metrics.spectrum import spectrum_metrics  # noqa: E402
from opd_dynamics.analysis.metrics.subspace import alignment_metrics  # noqa: E402
from opd_dynamics.numerics.decomposition import decompose  # noqa: E402


def concurrent_eigh(G: torch.Tensor, device: str, repeat: int) -> tuple[float, float]:
    """Four float64 eigh of G one after another, and the same four from two threads on two CUDA streams:
    whether the solver leaves the GPU room to overlap two decompositions."""
    from concurrent.futures import ThreadPoolExecutor

    streams = [torch.cuda.Stream() for _ in range(2)]

    def two(i: int) -> None:
        with torch.cuda.stream(streams[i]):
            for _ in range(2):
                torch.linalg.eigh(G)
        streams[i].synchronize()

    with ThreadPoolExecutor(2) as pool:
        serial = timed(lambda: [torch.linalg.eigh(G) for _ in range(4)], device, repeat)
        overlap = timed(lambda: list(pool.map(two, range(2))), device, repeat)
    return serial, overlap


def ops(shape: tuple[int, int], device: str, repeat: int) -> None:
    g = torch.Generator(device="cpu").manual_seed(0)
    w0 = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16).to(device)
    wt = (w0.float() + 1e-3 * torch.randn(shape, generator=g).to(device)).to(torch.bfloat16)
    wT = (w0.float() + 2e-3 * torch.randn(shape, generator=g).to(device)).to(torch.bfloat16)
    d, dT, wtf = wt.float() - w0.float(), wT.float() - w0.float(), wt.float()
    M = d.double()
    G = M @ M.T if shape[0] <= shape[1] else M.T @ M
    k1 = top_k_for(1, min(shape))
    dec, decT = decompose(d, 20), decompose(dT, 20)
    base = decompose_base(w0.float())
    t = {
        "delta fp32 from bf16": timed(lambda: wt.float() - w0.float(), device, repeat),
        "to float64": timed(lambda: d.double(), device, repeat),
        "gram f64": timed(lambda: M @ M.T if shape[0] <= shape[1] else M.T @ M, device, repeat),
    }
    t["eigvalsh f64"] = timed(lambda: torch.linalg.eigvalsh(G), device, repeat)
    t["eigh f64"] = timed(lambda: torch.linalg.eigh(G), device, repeat)
    if device.startswith("cuda"):
        t["4x eigh f64, serial"], t["4x eigh f64, 2 streams"] = concurrent_eigh(G, device, repeat)
    t |= {
        "decompose dW (k=20)": timed(lambda: decompose(d, 20), device, repeat),
        "decompose dW values only": timed(lambda: decompose(d, 0), device, repeat),
        f"decompose W_t (k={k1})": timed(lambda: decompose(wtf, k1), device, repeat),
        f"decompose_base (k={base.U.shape[1]})": timed(lambda: decompose_base(w0.float()), device, repeat),
        "geometry_metrics": timed(lambda: geometry_metrics(base, wtf, d, dec.fro2), device, repeat),
        "alignment_metrics": timed(lambda: alignment_metrics(dec, decT, d, dT), device, repeat),
        "spectrum_metrics": timed(lambda: spectrum_metrics(dec), device, repeat),
    }
    print(f"## {shape[0]}x{shape[1]}")
    for k, v in t.items():
        print(f"  {k:<34}{v * 1e3:10.1f} ms")
    sync(device)


def profile(model: str, device: str, layers: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    h, i, kv = MODELS[model]
    bench_io.KV = kv
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "series"
        bench_io.build_series(root, layers, 2, h, i)
        s = CheckpointSeries.discover(root / "run", base=root / "base")
        kw = dict(svd="exact", geometry=True, device=device, progress=False, cache_dir=Path(tmp) / "cache",
                  groups=("attention", "mlp"))
        analyze(s, **kw)  # warm-up, and the base decomposition cached
        with tprofile(activities=acts) as prof:
            analyze(s, **kw)
            sync(device)
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(f"## torch.profiler: analyze, {layers} layer(s) of {model} shapes, base + 2 steps, geometry, cached base")
    print(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60))
    if device.startswith("cuda"):
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", choices=sorted(MODELS), default="0.5b")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", type=int, default=1, help="layers in the profiled series")
    a = ap.parse_args()
    h, i, _ = MODELS[a.model]
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"# profile_analysis: Qwen2.5-{a.model} shapes on {a.device} ({name}), torch {torch.__version__}")
    for shape in [(i, h), (h, h)]:
        ops(shape, a.device, a.repeat)
    profile(a.model, a.device, a.layers)


if __name__ == "__main__":
    main()

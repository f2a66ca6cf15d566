"""Per-matrix kernel timings: the naive research-script route vs the exact Gram route vs fast mode.

Routes, all on the same fp32 update matrices in one process (so the ratios are comparable):
  naive      fp32 `torch.linalg.svdvals` (spectrum) + fp32 `torch.linalg.svd` (vectors), as the usual
             analysis scripts do per matrix;
  exact      `decompose(mode='exact')` + spectrum_metrics: float64 Gram, all values, top-20 vectors
             (default route for the device: one tridiagonal reduction + dstemr on CPU, one eigh on CUDA);
  ex-eigh    the same with values and vectors from full `eigh`;  ex-subsp  with certified subspace iteration;
  values     exact spectrum only (k_vectors=0: Gram + eigvalsh);
  fast       `decompose(mode='fast')`: randomized top-64 (q=74), fp32 sketch.
Accuracy against a float64 SVD of the same matrix is printed too (max |error| of energy_top{1,4,16,64}
and effective-rank relative error for exact; energy_top{1,4,16} for fast; the naive fp32 svdvals).

    python benchmarks/bench_kernels.py                         # Qwen2.5-0.5B shapes, CPU
    python benchmarks/bench_kernels.py --device cuda --model 7b
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from opd_dynamics.analysis.metrics.spectrum import spectrum_metrics
from opd_dynamics.numerics.decomposition import Decomposition, decompose

MODELS = {  # (out, in) of one decoder layer's matrices, with how many of each a layer has; layer count
    "0.5b": ({"q/o 896x896": ((896, 896), 2), "k/v 128x896": ((128, 896), 2),
              "gate/up 4864x896": ((4864, 896), 2), "down 896x4864": ((896, 4864), 1)}, 24),
    "7b": ({"q/o 3584x3584": ((3584, 3584), 2), "k/v 512x3584": ((512, 3584), 2),
            "gate/up 18944x3584": ((18944, 3584), 2), "down 3584x18944": ((3584, 18944), 1)}, 28),
}
KS = (1, 4, 16, 64)


def make_update(shape, device, seed=0) -> torch.Tensor:
    """A trained-update-like fp32 delta: a rank-64 part with decaying strength plus dense small noise."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    m, n = shape
    A = torch.randn(m, 64, generator=g) * (0.8 ** torch.arange(64.0))
    B = torch.randn(64, n, generator=g)
    d = (A @ B) / math.sqrt(n) + 0.05 * torch.randn(m, n, generator=g)
    return d.to(device=device, dtype=torch.float32)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int, threads: int) -> float:
    torch.set_num_threads(threads)
    fn()  # warm-up (library init, workspace allocation)
    sync(device)
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def naive(d):
    s = torch.linalg.svdvals(d)
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    return s, U[:, :20], Vh[:20]


ROUTES = {
    "naive": naive,
    "exact": lambda d: spectrum_metrics(decompose(d, k_vectors=20), KS),
    "ex-eigh": lambda d: spectrum_metrics(decompose(d, k_vectors=20, vectors="eigh"), KS),
    "ex-subsp": lambda d: spectrum_metrics(decompose(d, k_vectors=20, vectors="subspace"), KS),
    "values": lambda d: spectrum_metrics(decompose(d, k_vectors=0), KS),
    "fast": lambda d: spectrum_metrics(decompose(d, k_vectors=20, mode="fast"), KS),
}


def accuracy(d: torch.Tensor) -> str:
    d64 = d.to(torch.float64)
    ref = spectrum_metrics(decompose(d64, k_vectors=0, exact_method="svd"), KS)
    ex, fa = ROUTES["exact"](d), ROUTES["fast"](d)
    nv = spectrum_metrics(Decomposition(torch.linalg.svdvals(d).to(torch.float64), None, None,
                                        float(d64.square().sum()), "naive-fp32", True, tuple(d.shape)), KS)

    def e(got, ks=KS):
        return max(abs(got[f"energy_top{k}"] - ref[f"energy_top{k}"]) for k in ks)

    def er(got):
        return abs(got["effective_rank"] - ref["effective_rank"]) / ref["effective_rank"]

    return (f"{ex['svd_method']} E {e(ex):.0e} erank {er(ex):.0e} | fast E<=16 {e(fa, (1, 4, 16)):.0e} | "
            f"naive-fp32 E {e(nv):.0e} erank {er(nv):.0e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", choices=sorted(MODELS), default="0.5b")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads of the naive route (ours run "
                    "as the engine runs them on the CPU: one torch thread, the heavy work in scipy's BLAS)")
    ap.add_argument("--routes", default=",".join(ROUTES), help="comma-separated subset of " + ",".join(ROUTES))
    ap.add_argument("--no-check", action="store_true", help="skip the float64 SVD accuracy check")
    args = ap.parse_args()
    dev = args.device
    routes = [r for r in args.routes.split(",") if r]
    shapes, n_layers = MODELS[args.model]
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else \
        f"CPU, naive on {args.threads} torch threads, ours on 1 (as in the engine)"
    print(f"# bench_kernels: Qwen2.5-{args.model} shapes on {dev} ({name}), torch {torch.__version__}, "
          f"median of {args.repeat} after a warm-up; seconds per matrix")
    print(f"{'matrix':<20}" + "".join(f"{r:>10}" for r in routes)
          + "".join(f"{'naive/' + r:>15}" for r in routes if r != "naive"))
    per_layer = dict.fromkeys(routes, 0.0)
    for label, (shape, count) in shapes.items():
        d = make_update(shape, dev)
        t = {r: timed(lambda r=r, d=d: ROUTES[r](d), dev, args.repeat,
                      args.threads if (r == "naive" or dev != "cpu") else 1) for r in routes}
        for r in routes:
            per_layer[r] += count * t[r]
        ratios = "".join(f"{t['naive'] / t[r]:15.1f}" for r in routes if r != "naive") if "naive" in t else ""
        print(f"{label:<20}" + "".join(f"{t[r]:10.4f}" for r in routes) + ratios)
        if not args.no_check:
            print(f"{'':<20}accuracy vs float64 SVD: {accuracy(d)}")
        del d
    ratios = "".join(f"{per_layer['naive'] / per_layer[r]:15.1f}" for r in routes if r != "naive") \
        if "naive" in per_layer else ""
    print(f"{'per layer':<20}" + "".join(f"{per_layer[r]:10.3f}" for r in routes) + ratios)
    print(f"{f'x {n_layers} layers':<20}" + "".join(f"{n_layers * per_layer[r]:10.2f}" for r in routes)
          + "   (seconds per checkpoint, spectra+vectors of attention and MLP matrices, no I/O)")


if __name__ == "__main__":
    main()

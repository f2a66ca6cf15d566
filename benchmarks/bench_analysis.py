"""Full analysis (spectra, alignment to the final step, geometry vs base) against a naive research script.

Series: Qwen2.5-0.5B-shaped decoder layers (hidden 896, intermediate 4864, kv 128; `--model 7b` for
Qwen2.5-7B shapes: 3584, 18944, 512), bf16, base + `--steps` checkpoints, written to a temporary dir.

Naive baseline (the usual script): for each step, load the base, the step and the final checkpoint whole
(`safetensors.torch.load_file`), then per matrix: fp32 ΔW_t and ΔW_T, `torch.linalg.svdvals(ΔW_t)` for the
spectrum, `torch.linalg.svd` of ΔW_t and ΔW_T for alignment, `torch.linalg.svd` of W_0 and W_t for geometry.
Ours: `analyze(series, geometry=True)` exact (base decomposition cache empty at start, so it is paid once,
then again with it cached) and `svd='fast'`, against the naive script; then, like with like for the default
analysis (no geometry), ours exact and fast without geometry against the naive script without its two SVDs
of W_0 and W_t. All in one process, one run. The process's
one-time start-up (loading the compiled kernels, starting BLAS threads) is paid first on a tiny series and
printed; the ratio is printed without it and with it counted.

    python benchmarks/bench_analysis.py [--layers 2] [--steps 2] [--device cpu|cuda] [--model 0.5b|7b]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import bench_io  # noqa: E402

from opd_dynamics import CheckpointSeries, analyze  # noqa: E402
from opd_dynamics.io.naming import parse_name  # noqa: E402

MODELS = {"0.5b": (896, 4864, 128), "7b": (3584, 18944, 512)}


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd |= load_file(str(f))
    return sd


def naive(root: Path, steps: list[int], device: str, geometry: bool = True) -> float:
    t0 = time.perf_counter()
    final = steps[-1]
    for t in steps:
        base, cur, fin = load_dir(root / "base"), load_dir(root / "run" / f"checkpoint-{t}"), \
            load_dir(root / "run" / f"checkpoint-{final}")
        for name, w0 in base.items():
            if parse_name(name).group not in ("attention", "mlp"):
                continue
            a, b, c = (x.to(device, torch.float32) for x in (w0, cur[name], fin[name]))
            d, dT = b - a, c - a
            s = torch.linalg.svdvals(d)
            f = torch.linalg.norm(d)
            _ = (s[0] / f, (s[:16] ** 2).sum() / f ** 2, (s / s.sum()))
            U, _, _ = torch.linalg.svd(d, full_matrices=False)
            UT, _, _ = torch.linalg.svd(dT, full_matrices=False)
            _ = torch.linalg.norm(U[:, :16].T @ UT[:, :16]) ** 2 / 16
            if not geometry:
                continue
            U0, S0, V0 = torch.linalg.svd(a, full_matrices=False)
            _, St, _ = torch.linalg.svd(b, full_matrices=False)
            _ = (torch.linalg.norm(U0[:, :9].T @ d @ V0[:9].T), torch.linalg.norm(St - S0))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        del base, cur, fin
    return time.perf_counter() - t0


def ours(root: Path, device: str, svd: str, cache: Path, steps: list[int] | None = None,
         geometry: bool = True) -> float:
    t0 = time.perf_counter()
    s = CheckpointSeries.discover(root / "run", base=root / "base")
    if steps is not None:  # a prefix of the series: the linearity check
        s = CheckpointSeries.from_list([(t, root / "run" / f"checkpoint-{t}") for t in steps], base=root / "base")
    analyze(s, svd=svd, geometry=geometry, device=device, progress=False, cache_dir=cache,
            groups=("attention", "mlp"))
    return time.perf_counter() - t0


def rss_gb() -> float:
    return bench_io.peak_rss() / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", choices=sorted(MODELS), default="0.5b")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--exact-only", action="store_true", help="skip fast mode and the linearity check "
                    "(a 28-layer 7B series: the per-checkpoint figure alone)")
    a = ap.parse_args()
    h, i, kv = MODELS[a.model]
    bench_io.KV = kv
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "series"
        t = time.perf_counter()
        gen = "cuda" if a.device.startswith("cuda") else "cpu"
        bench_io.build_series(root, a.layers, a.steps, h, i, device=gen)
        gb = sum(f.stat().st_size for f in root.rglob("*.safetensors")) / 1e9
        print(f"{a.layers} layers of Qwen2.5-{a.model} shapes, base + {a.steps} steps, bf16, {gb:.2f} GB "
              f"(built in {time.perf_counter() - t:.0f} s); device {a.device}")
        steps = list(range(1, a.steps + 1))
        tiny = Path(tmp) / "tiny"  # the process's one-time start-up: kernels loaded, BLAS threads started
        bench_io.build_series(tiny, 1, 2, 64, 128)
        startup = sum(ours(tiny, a.device, m, Path(tmp) / f"cache-tiny-{m}") for m in ("exact", "fast"))
        print(f"one-time start-up (both modes on a 1-layer 64-wide series first): {startup:.2f} s")
        bench_io.reset_peak_rss()  # building the series held it all in memory: not ours
        rss0 = bench_io.current_rss() / 1e9
        exact = ours(root, a.device, "exact", Path(tmp) / "cache-exact")
        exact_warm = ours(root, a.device, "exact", Path(tmp) / "cache-exact")
        print(f"ours exact (geometry, cold base cache): {exact:8.2f} s  ({exact / a.steps:.2f} s per checkpoint)")
        print(f"ours exact (base decomposition cached): {exact_warm:8.2f} s  ({exact_warm / a.steps:.2f} s per "
              "checkpoint)")
        plain = ours(root, a.device, "exact", Path(tmp) / "cache-exact", geometry=False)
        print(f"ours exact without geometry (spectra + alignment, the default analysis): {plain:.2f} s  "
              f"({plain / a.steps:.2f} s per checkpoint)")
        if not a.exact_only:
            fast = ours(root, a.device, "fast", Path(tmp) / "cache-fast")
            print(f"ours fast  (randomized top-k):          {fast:8.2f} s")
            fast_plain = ours(root, a.device, "fast", Path(tmp) / "cache-fast", geometry=False)
            print(f"ours fast without geometry:             {fast_plain:8.2f} s")
            half = ours(root, a.device, "exact", Path(tmp) / "cache-exact", steps[: max(1, a.steps // 2)])
            print(f"linearity (exact, cached base): {max(1, a.steps // 2)} steps {half:.2f} s, {a.steps} steps "
                  f"{exact_warm:.2f} s: {half / max(1, a.steps // 2):.2f} vs {exact_warm / a.steps:.2f} s per step")
        largest = max(h * i, bench_io.VOCAB * h) * 4 / 1e9
        print(f"peak RSS after ours (before the naive script): {rss_gb():.2f} GB, {rss_gb() - rss0:.2f} GB over the "
              f"RSS when they started; largest tensor in float32 {largest:.2f} GB")
        if not a.skip_naive:
            nv = naive(root, steps, a.device)
            print(f"naive script:                           {nv:8.2f} s  ({nv / a.steps:.2f} s per checkpoint)")
            fast_s = "" if a.exact_only else f", fast {nv / fast:.1f}x"
            fast_su = "" if a.exact_only else f", fast {nv / (fast + startup):.1f}x"
            print(f"speedup exact {nv / exact:.1f}x (cached base {nv / exact_warm:.1f}x){fast_s}; "
                  f"with the start-up counted: exact {nv / (exact + startup):.1f}x{fast_su}")
            nv_plain = naive(root, steps, a.device, geometry=False)
            print(f"naive script without its geometry (spectra + alignment): {nv_plain:.2f} s; against ours without "
                  f"geometry: exact {nv_plain / plain:.1f}x"
                  + ("" if a.exact_only else f", fast {nv_plain / fast_plain:.1f}x"))
        print(f"peak RSS of this process (naive included): {rss_gb():.2f} GB")


if __name__ == "__main__":
    main()

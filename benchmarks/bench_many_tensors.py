"""Per-tensor overhead on a checkpoint of many small matrices (fine-grained MoE experts stored one tensor
per expert, as Qwen-MoE and DeepSeek do), with and without reading ahead on a thread.

Builds a bf16 series (base + STEPS steps) of LAYERS layers × EXPERTS experts × (gate, up, down) matrices of
EXPERT_SHAPE, then times `analyze` interleaved, best of --repeat, in one process: the default (small tensors
read on the caller's thread, `deltas.PREFETCH_MIN_NUMEL`) against reading ahead for every tensor (the
threshold set to 0, what the engine did before). Printed: seconds, per-tensor milliseconds, and the ratio.

    python benchmarks/bench_many_tensors.py [--experts 64] [--layers 4] [--steps 2] [--svd none]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from opd_dynamics import CheckpointSeries, analyze
from opd_dynamics.analysis import deltas


def build(root: Path, experts: int, layers: int, steps: int, shape: tuple[int, int]) -> int:
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{layer}.mlp.experts.{e}.{m}.weight":
            (torch.randn(*(shape if m != "down_proj" else shape[::-1]), generator=g) * 0.02).to(torch.bfloat16)
            for layer in range(layers) for e in range(experts) for m in ("gate_proj", "up_proj", "down_proj")}
    (root / "base").mkdir(parents=True)
    save_file(base, str(root / "base" / "model.safetensors"))
    for t in range(1, steps + 1):
        d = root / "run" / f"checkpoint-{t}"
        d.mkdir(parents=True)
        save_file({k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
                   for k, v in base.items()}, str(d / "model.safetensors"))
    return len(base)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--shape", default="96x256", help="gate/up shape (down is its transpose)")
    ap.add_argument("--svd", default="none", choices=["none", "exact", "fast"])
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    shape = tuple(int(x) for x in a.shape.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        n = build(Path(tmp), a.experts, a.layers, a.steps, shape)
        s = CheckpointSeries.discover(Path(tmp) / "run", base=Path(tmp) / "base")
        print(f"{n} tensors of {a.shape} (bf16), base + {a.steps} steps, svd={a.svd}; threshold "
              f"{deltas.PREFETCH_MIN_NUMEL} elements")
        analyze(s, svd=a.svd, progress=False)  # warm: kernels, page cache
        default = deltas.PREFETCH_MIN_NUMEL
        best = {"caller's thread (default)": float("inf"), "read ahead on a thread (before)": float("inf")}
        for _ in range(a.repeat):
            for label, thr in (("caller's thread (default)", default), ("read ahead on a thread (before)", 0)):
                deltas.PREFETCH_MIN_NUMEL = thr
                t0 = time.perf_counter()
                analyze(s, svd=a.svd, progress=False)
                best[label] = min(best[label], time.perf_counter() - t0)
        deltas.PREFETCH_MIN_NUMEL = default
        for label, t in best.items():
            print(f"{label:<34} {t:6.2f} s  {t / n * 1e3:.2f} ms per tensor")
        print(f"ratio (before / default): {best['read ahead on a thread (before)'] / best[next(iter(best))]:.2f}")


if __name__ == "__main__":
    main()

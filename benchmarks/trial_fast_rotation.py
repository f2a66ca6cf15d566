"""Trial of a fast principal_rotation_deg (not built into the package; this records why).

The candidate: W_t's top-k1 left subspace from a block subspace iteration on W_t started at the cached
base's top-p right vectors (W_t is W_0 plus a small update, so the start is close), then Rayleigh-Ritz.
It is compared with the exact rotation (`geometry_metrics`) on Qwen2.5-0.5B shapes: W_0 Gaussian with a
spectrum tilted 3:1, ΔW a decaying rank-16 part plus dense noise at three scales. Printed: the exact
rotation, the trial's, its relative error and time, for block sizes p = 2·k1 + 10, 4·k1 and the cached
20% (k_max), and 1, 2 or 4 iterations.

    python benchmarks/trial_fast_rotation.py
"""

from __future__ import annotations

import math
import time

import torch

from opd_dynamics.analysis.metrics.geometry import BaseDecomposition, decompose_base, geometry_metrics, top_k_for
from opd_dynamics.analysis.metrics.subspace import principal_angles


def warm_top_left(base: BaseDecomposition, wt: torch.Tensor, k1: int, p: int, niter: int) -> torch.Tensor:
    W = wt.to(torch.float64)
    V = base.V[:, :p]
    for _ in range(niter):
        V = torch.linalg.qr(W.T @ torch.linalg.qr(W @ V)[0])[0]
    return torch.linalg.svd(W @ V, full_matrices=False)[0][:, :k1]


def main() -> None:
    torch.manual_seed(0)
    print(f"{'shape':<10}{'scale':>8}{'exact deg':>11}{'p':>5}{'iters':>6}{'trial deg':>11}{'rel err':>9}{'ms':>8}")
    for m, n in [(4864, 896), (896, 896)]:
        U0, S0, V0 = torch.linalg.svd(torch.randn(m, n, dtype=torch.float64) * 0.02, full_matrices=False)
        w0 = (U0 * (S0 * torch.linspace(3, 1, S0.numel(), dtype=torch.float64))) @ V0.T
        base = decompose_base(w0)
        k1 = top_k_for(1, min(m, n))
        for scale in (1e-4, 1e-3, 1e-2):
            A = torch.randn(m, 16, dtype=torch.float64) * 0.8 ** torch.arange(16.0, dtype=torch.float64)
            d = scale * (A @ torch.randn(16, n, dtype=torch.float64) / math.sqrt(n)
                         + 0.3 * torch.randn(m, n, dtype=torch.float64))
            exact = geometry_metrics(base, w0 + d, d)["principal_rotation_deg"]
            for p in (2 * k1 + 10, 4 * k1, base.U.shape[1]):
                for niter in (1, 2, 4):
                    t = time.perf_counter()
                    Ut = warm_top_left(base, w0 + d, k1, p, niter)
                    ms = (time.perf_counter() - t) * 1e3
                    got = math.degrees(float(principal_angles(base.U[:, :k1], Ut).mean()))
                    print(f"{f'{m}x{n}':<10}{scale:>8.0e}{exact:>11.5f}{p:>5}{niter:>6}{got:>11.5f}"
                          f"{abs(got - exact) / exact:>9.1e}{ms:>8.1f}")


if __name__ == "__main__":
    main()

"""Peak RSS of the trajectory metrics and of the extrapolators against the number of steps (issue 19).

Builds bf16 series of Qwen2.5-0.5B-shaped decoder layers (`bench_io.build_series`) with T = 4 … 32 steps, then
measures, each in a fresh child process (VmHWM, so the peak is that run's alone), the growth of RSS over the RSS
after start-up of:

- ``trajectory``: `analyze(svd='none', trajectory=True)`, i.e. the norm pass plus trajectory.csv and segments.csv
  (the per-entry linear fit, the T × T Gram of the stacked updates, segment cosines, alignment to the final step);
- ``norms``: the same with ``trajectory=False`` (the baseline the trajectory pass adds to);
- ``relex``: `extrapolate(method='relex', rank=1)` to step 2T, the method that reads every step per row block.

The claim checked: peak RSS does not grow with T beyond the T × T Gram (and the row blocks' budget, which is fixed
in bytes: rows per block shrink as T grows).

    python benchmarks/bench_trajectory.py [--layers 2] [--steps 4,8,16,32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_io  # noqa: E402

MODES = ("norms", "trajectory", "relex")


def child(mode: str, root: Path) -> None:
    """One measurement: seconds and RSS growth as JSON."""
    torch.set_num_threads(1)
    from opd_dynamics import CheckpointSeries, analyze
    from opd_dynamics.extrapolate import extrapolate

    s = CheckpointSeries.discover(root / "run", base=root / "base")
    bench_io.reset_peak_rss()
    rss0 = bench_io.current_rss()
    t = time.perf_counter()
    if mode == "relex":
        extrapolate(s, 2 * s.step_numbers[-1], root / "pred", method="relex", rank=1)
    else:
        analyze(s, svd="none", trajectory=mode == "trajectory", alignment=False, progress=False,
                cache_dir=root / "cache")
    dt = time.perf_counter() - t
    print(json.dumps({"seconds": dt, "growth": bench_io.peak_rss() - rss0, "rss_before": rss0}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", default="4,8,16,32")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], Path(a.child[1]))
    largest = bench_io.INTER * bench_io.H
    print(f"{a.layers} Qwen2.5-0.5B-shaped layers, bf16; largest matrix {bench_io.INTER}×{bench_io.H}: "
          f"{largest * 2 / 1e6:.1f} MB stored, {largest * 8 / 1e6:.1f} MB in float64")
    print("steps  series_GB  " + "  ".join(f"{m}_growth_MB {m}_s" for m in MODES))
    for steps in (int(x) for x in a.steps.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "series"
            bench_io.build_series(root, a.layers, steps, scale=1e-4)  # step 32 is 16 % of the base's norm away
            gb = sum(f.stat().st_size for f in root.rglob("*.safetensors")) / 1e9
            rows = [bench_io.measure(m, root, __file__) for m in MODES]
            print(f"{steps:5d}  {gb:9.2f}  " + "  ".join(f"{r['growth'] / 1e6:14.0f} {r['seconds']:7.1f}"
                                                           for r in rows), flush=True)


if __name__ == "__main__":
    main()

"""Norm-only pass vs simply reading the same safetensors files; peak RSS against series and model size.

Builds bf16 series of Qwen2.5-0.5B-shaped decoder layers (hidden 896, intermediate 4864, kv 128) in a
temporary directory, then, each in a fresh child process (so peak RSS is that run's alone):

- read:  every byte of every file of the series (base + all steps) read into memory, nothing else
  (`safetensors.torch.load_file` maps lazily and would not read the data at all);
- norms: `analyze(series, svd='none')` (W_t − W_0 in float32 and every module_allocation column).

The rate ratio norms/read is what the issue asks to be ≥ 0.7. Files are read warm (from the page cache)
in both cases: the ratio measures our overhead over the read itself, not the disk.

    python benchmarks/bench_io.py [--layers 6] [--steps 4] [--rss]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

H, INTER, KV, VOCAB = 896, 4864, 128, 8192


def layer_shapes(i: int, hidden: int, inter: int) -> dict[str, tuple[int, int]]:
    p = f"model.layers.{i}."
    return {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (KV, hidden),
            p + "self_attn.v_proj.weight": (KV, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter)}


def build_series(root: Path, layers: int, steps: int, hidden: int = H, inter: int = INTER,
                 device: str = "cpu", scale: float = 1e-3) -> None:
    """Base (entries of sd 0.02) + `steps` checkpoints (step t adds noise of sd ``scale``·t), one safetensors file
    per 2 layers (sharded, with an index). The random numbers are drawn on ``device`` (a GPU draws 7B-sized
    series in seconds, a CPU core in minutes)."""
    g = torch.Generator(device=device).manual_seed(0)
    shapes = {"model.embed_tokens.weight": (VOCAB, hidden)}
    for i in range(layers):
        shapes |= layer_shapes(i, hidden, inter)
    base = {n: (torch.randn(s, generator=g, device=device) * 0.02).to(torch.bfloat16) for n, s in shapes.items()}
    for d, sd in [("base", 0.0)] + [(f"run/checkpoint-{t}", scale * t) for t in range(1, steps + 1)]:
        out = root / d
        out.mkdir(parents=True)
        names = list(shapes)
        chunks = [names[i:i + 14] for i in range(0, len(names), 14)]
        wm = {}
        for k, chunk in enumerate(chunks):
            f = f"model-{k + 1:05d}-of-{len(chunks):05d}.safetensors"
            save_file({n: (base[n].float() + sd * torch.randn(shapes[n], generator=g, device=device))
                       .to(torch.bfloat16).cpu() for n in chunk}, str(out / f))
            wm |= {n: f for n in chunk}
        (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
        (out / "config.json").write_text(json.dumps({"model_type": "qwen2"}))


def _status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int:
    """This process's resident set size in bytes now (0 where /proc is missing)."""
    return _status("VmRSS") or 0


def peak_rss() -> int:
    """This process's peak RSS in bytes. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a
    child would report its parent's peak (the process that built the series)."""
    hwm = _status("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Start VmHWM afresh from the current RSS (Linux ≥ 4.0), so a later peak_rss() covers only what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def child(mode: str, root: Path) -> None:
    """Run one measurement and print seconds, bytes read and peak RSS as JSON."""
    torch.set_num_threads(2)
    files = sorted(root.rglob("*.safetensors"))
    nbytes = sum(f.stat().st_size for f in files)
    startup = 0.0
    if mode != "read":  # one-time start-up (imports, loading the compiled kernels) is reported apart
        t = time.perf_counter()
        from opd_dynamics import CheckpointSeries, analyze
        from opd_dynamics.numerics import fused

        tiny = torch.ones(8, 8, dtype=torch.bfloat16)  # loads the bf16 kernels from numba's cache
        fused.fused_update_stats(tiny, tiny, 1e-3), fused.fused_sum_squares(tiny), fused.fused_row_stats(tiny, tiny)
        startup = time.perf_counter() - t
    rss0 = current_rss()
    t = time.perf_counter()
    if mode == "read":  # every byte of every file into memory, one file at a time (the I/O floor)
        for f in files:
            with open(f, "rb") as fh:
                fh.read()
    else:
        s = CheckpointSeries.discover(root / "run", base=root / "base")
        analyze(s, svd="none", trajectory=False, progress=False, cache_dir=root / "cache")  # the norm-only pass
    dt = time.perf_counter() - t
    rss = peak_rss()
    print(json.dumps({"seconds": dt, "bytes": nbytes, "peak_rss": rss, "rss_before": rss0, "startup": startup}))


def measure(mode: str, root: Path, script: str = __file__) -> dict:
    """Run ``script --child MODE ROOT`` in a fresh process and return the JSON line it prints last."""
    out = subprocess.run([sys.executable, script, "--child", mode, str(root)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rss", action="store_true", help="also sweep steps and model size for peak RSS")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], Path(a.child[1]))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "series"
        build_series(root, a.layers, a.steps)
        measure("read", root)  # warm the page cache
        rows = []
        for _ in range(a.repeat):  # interleaved, so both see the same machine load
            rows.append((measure("read", root), measure("norms", root)))
        read = min(r[0]["seconds"] for r in rows)
        norms = min(r[1]["seconds"] for r in rows)
        gb = rows[0][0]["bytes"] / 1e9
        print(f"series: {a.layers} Qwen2.5-0.5B-shaped layers, base + {a.steps} steps, bf16, {gb:.2f} GB")
        print(f"read only (all bytes of all files): {read:.2f} s  {gb / read:.2f} GB/s")
        print(f"norm-only pass (analyze svd=none): {norms:.2f} s  {gb / norms:.2f} GB/s")
        print(f"rate ratio norms/read: {read / norms:.2f}   (goal >= 0.70)")
        start = min(r[1]["startup"] for r in rows)
        print(f"one-time start-up of the norms child, not in its time (imports, loading the compiled "
              f"kernels): {start:.2f} s; ratio with it counted: {read / (norms + start):.2f}")
        print(f"peak RSS: read {rows[0][0]['peak_rss'] / 1e6:.0f} MB, norms {rows[0][1]['peak_rss'] / 1e6:.0f} MB")
    if not a.rss:
        return
    print("\npeak RSS of the norm-only pass (MB): the whole child, and its growth over the RSS after start-up;"
          "\nlargest tensor (the embedding or gate/up) as stored in bf16")
    print("layers steps hidden inter  series_GB  largest_MB  peak_rss_MB  growth_MB")
    for layers, steps, hidden, inter in [(6, 2, H, INTER), (6, 8, H, INTER), (6, 16, H, INTER), (3, 4, H, INTER),
                                         (12, 4, H, INTER), (6, 4, 2 * H, 2 * INTER)]:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "series"
            build_series(root, layers, steps, hidden, inter)
            r = measure("norms", root)
            largest = max(hidden * inter, VOCAB * hidden) * 2 / 1e6
            print(f"{layers:6d} {steps:5d} {hidden:6d} {inter:5d}  {r['bytes'] / 1e9:9.2f}  {largest:10.1f}  "
                  f"{r['peak_rss'] / 1e6:11.0f}  {(r['peak_rss'] - r['rss_before']) / 1e6:9.0f}")


if __name__ == "__main__":
    main()

"""Each checkpoint format read in place: the norm-only pass against reading the files, and its peak RSS (issue 20).

Builds one Qwen2.5-0.5B-shaped series (`bench_io.build_series`: hidden 896, MLP 4864, an 8192-row embedding, bf16
safetensors base + steps) and writes its steps again in every format the toolkit reads, with the real writers:

- ``safetensors``: as built (bf16);
- ``bin``: `torch.save` of each step's state dict as ``pytorch_model.bin`` (transformers 4's layout; bf16);
- ``fsdp``: verl's rank files, `torch.save(model.state_dict())` on each of 2 gloo ranks after FSDP2 `fully_shard`
  (float32, as verl keeps its actor's master weights);
- ``dcp``: `torch.distributed.checkpoint.save({"model": state_dict})` from the same 2 ranks (accelerate's call;
  float32);
- ``deepspeed``, only with ``--deepspeed-python PYTHON`` (an interpreter that has DeepSpeed; the toolkit does not
  depend on it): DeepSpeed's own ZeRO-2 ``save_checkpoint`` of a one-rank bf16 engine holding each step's weights
  (`write_deepspeed.py`), its model-states file (bf16) read; the optimizer partitions are removed.

Then, each in a fresh child process (`bench_io.measure`): ``read`` every byte of the base and step files (the I/O
floor), and ``norms``, `analyze(svd='none')` of the series against the safetensors base; peak RSS growth over the
RSS after start-up. Files are warm in the page cache.

    python benchmarks/bench_formats.py [--layers 4] [--steps 2] [--deepspeed-python PYTHON]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_io  # noqa: E402
from write_deepspeed import module_from  # noqa: E402

FORMATS = ("safetensors", "bin", "fsdp", "dcp")


def _fsdp_worker(rank: int, world: int, src: str, actor: str, dcp_dir: str, store: str) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from opd_dynamics.io.formats import open_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    with open_model(src) as r:
        m = module_from({n: r.get(n) for n in r.names()}, torch.float32, trainable=False)
    fully_shard(m, mesh=init_device_mesh("cpu", (world,)))
    torch.save(m.state_dict(), os.path.join(actor, f"model_world_size_{world}_rank_{rank}.pt"))
    if rank == 0:
        Path(actor, "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": world}))
    dcp.save({"model": m.state_dict()}, storage_writer=dcp.FileSystemWriter(dcp_dir))
    dist.barrier()
    dist.destroy_process_group()


def write_formats(root: Path, steps: int) -> None:
    """root/{bin,fsdp,dcp}/checkpoint-N from root/run/checkpoint-N (safetensors)."""
    import torch.multiprocessing as mp

    from opd_dynamics.io.formats import open_model

    for t in range(1, steps + 1):
        src = root / "run" / f"checkpoint-{t}"
        b = root / "bin" / f"checkpoint-{t}"
        b.mkdir(parents=True)
        with open_model(src) as r:
            torch.save({n: r.get(n) for n in r.names()}, b / "pytorch_model.bin")
        actor = root / "fsdp" / f"global_step_{t}" / "actor"
        actor.mkdir(parents=True)
        dcp_dir = root / "dcp" / f"checkpoint-{t}" / "pytorch_model_fsdp_0"
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_fsdp_worker, args=(2, str(src), str(actor), str(dcp_dir), f"{tmp}/store"), nprocs=2)


def write_deepspeed(root: Path, steps: int, python: str) -> None:
    """root/deepspeed/global_stepN from root/run/checkpoint-N, by DeepSpeed itself under ``python``."""
    script = str(Path(__file__).with_name("write_deepspeed.py"))
    for t in range(1, steps + 1):
        subprocess.run([python, script, str(root / "run" / f"checkpoint-{t}"), str(root / "deepspeed"), str(t)],
                       check=True, capture_output=True)


def _run_dir(root: Path, fmt: str) -> Path:
    return root / {"safetensors": "run", "bin": "bin", "fsdp": "fsdp", "dcp": "dcp", "deepspeed": "deepspeed"}[fmt]


def child(mode: str, root: Path) -> None:
    """mode 'read:FMT' or 'norms:FMT': seconds, bytes and RSS growth as JSON."""
    torch.set_num_threads(2)
    kind, fmt = mode.split(":")
    run = _run_dir(root, fmt)
    files = [f for f in sorted(run.rglob("*")) if f.is_file() and not f.name.endswith(".json")]
    files += sorted((root / "base").glob("*.safetensors"))
    nbytes = sum(f.stat().st_size for f in files)
    startup = 0.0
    if kind == "norms":  # one-time start-up, reported apart: imports and the kernels' cache (no reader imports
        t = time.perf_counter()  # torch.distributed.tensor or .checkpoint: DTensors and DCP metadata are read inert)
        from opd_dynamics import CheckpointSeries, analyze
        from opd_dynamics.numerics import fused

        tiny = torch.ones(8, 8, dtype=torch.bfloat16)
        fused.fused_update_stats(tiny, tiny, 1e-3), fused.fused_sum_squares(tiny)
        startup = time.perf_counter() - t
    bench_io.reset_peak_rss()
    rss0 = bench_io.current_rss()
    t = time.perf_counter()
    if kind == "read":
        for f in files:
            with open(f, "rb") as fh:
                fh.read()
    else:
        s = CheckpointSeries.discover(run, base=root / "base")
        analyze(s, svd="none", trajectory=False, progress=False, cache_dir=root / "cache")  # the norm-only pass
    dt = time.perf_counter() - t
    print(json.dumps({"seconds": dt, "bytes": nbytes, "growth": bench_io.peak_rss() - rss0, "startup": startup}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--deepspeed-python", help="an interpreter with DeepSpeed, to add a ZeRO-2 row")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], Path(a.child[1]))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "series"
        bench_io.build_series(root, a.layers, a.steps)
        write_formats(root, a.steps)
        formats = FORMATS
        if a.deepspeed_python:
            write_deepspeed(root, a.steps, a.deepspeed_python)
            formats += ("deepspeed",)
        largest = bench_io.INTER * bench_io.H
        print(f"{a.layers} Qwen2.5-0.5B-shaped layers + 8192-row embedding, base (bf16 safetensors) + {a.steps} steps; "
              f"largest matrix {largest * 2 / 1e6:.1f} MB in bf16, {largest * 4 / 1e6:.1f} MB in float32")
        print("format       series_GB  read_s  read_GB/s  norms_s  norms_GB/s  ratio  norms_RSS_growth_MB  startup_s")
        for fmt in formats:
            bench_io.measure(f"read:{fmt}", root, __file__)  # warm the page cache
            rows = [(bench_io.measure(f"read:{fmt}", root, __file__), bench_io.measure(f"norms:{fmt}", root, __file__))
                    for _ in range(a.repeat)]
            read = min(r[0]["seconds"] for r in rows)
            norms = min(r[1]["seconds"] for r in rows)
            gb = rows[0][0]["bytes"] / 1e9
            growth = max(r[1]["growth"] for r in rows) / 1e6
            start = min(r[1]["startup"] for r in rows)
            print(f"{fmt:11s}  {gb:9.2f}  {read:6.2f}  {gb / read:9.2f}  {norms:7.2f}  {gb / norms:10.2f}  "
                  f"{read / norms:5.2f}  {growth:19.0f}  {start:9.2f}", flush=True)


if __name__ == "__main__":
    main()

"""Build tiny real checkpoints on disk in every layout the toolkit reads (safetensors written directly)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False}


def llama_like(n_layers: int = 2, hidden: int = 32, inter: int = 64, vocab: int = 50, kv: int = 16,
               seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A Llama-shaped state dict with small random weights."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * 0.05).to(dtype)  # noqa: E731
    sd = {"model.embed_tokens.weight": r(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=dtype),
          "lm_head.weight": r(vocab, hidden)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        sd |= {p + "self_attn.q_proj.weight": r(hidden, hidden), p + "self_attn.k_proj.weight": r(kv, hidden),
               p + "self_attn.v_proj.weight": r(kv, hidden), p + "self_attn.o_proj.weight": r(hidden, hidden),
               p + "mlp.gate_proj.weight": r(inter, hidden), p + "mlp.up_proj.weight": r(inter, hidden),
               p + "mlp.down_proj.weight": r(hidden, inter),
               p + "input_layernorm.weight": torch.ones(hidden, dtype=dtype),
               p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype)}
    return sd


def write_dir(path: Path, sd: dict[str, torch.Tensor], layout: str = "single", n_shards: int = 2,
              config: dict | None = None) -> Path:
    """layout: 'single' (model.safetensors), 'sharded' (shards + index), 'noindex' (shards, no index)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or LLAMA_CONFIG))
    if layout == "single":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
        return path
    names = list(sd)
    chunks = [names[i::n_shards] for i in range(n_shards)]
    weight_map = {}
    for i, chunk in enumerate(chunks):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: sd[k].contiguous() for k in chunk}, str(path / fname))
        weight_map |= {k: fname for k in chunk}
    if layout == "sharded":
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def perturb(sd: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    """sd + scale·noise for every float tensor, computed in float64 then cast to the stored dtype."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v.double() + scale * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(v.dtype)
            for k, v in sd.items()}


# ---- the formats real training stacks leave (written by the real libraries: torch.save, FSDP2, DCP) ----

TINY_LLAMA = dict(vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False)


def tiny_llama(step: int):
    """A transformers Llama (67-token vocabulary: FSDP's row split over 2 ranks is uneven) whose weights are the
    seed-0 init plus step × 0.001 × fixed noise: step 0 is the base, every rank of every process builds the same."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(step * 1e-3 * torch.randn(p.shape, generator=g))
    return m


def save_bin(model, out: Path, shards: int = 1) -> Path:
    """transformers 4's `save_pretrained(safe_serialization=False)` layout: torch.save of the state dict as
    pytorch_model.bin, or `shards` pytorch_model-0000k-of-0000n.bin with pytorch_model.bin.index.json."""
    out.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(out / "config.json")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(sd, out / "pytorch_model.bin")
        return out
    names = list(sd)
    weight_map = {}
    for i in range(shards):
        f = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in names[i::shards]}
        torch.save(part, out / f)
        weight_map |= {k: f for k in part}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def fsdp_worker(rank: int, world: int, step: int, actor: str, dcp_dir: str, store: str) -> None:
    """One of `world` gloo ranks: FSDP2 `fully_shard` of tiny_llama(step), then what verl writes
    (`torch.save(model.state_dict())` per rank + fsdp_config.json) and what accelerate writes
    (`dcp.save({"model": state_dict})`)."""
    import os

    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(1)  # two or four ranks on a 2-core machine
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    m = tiny_llama(step)
    for blk in m.model.layers:
        fully_shard(blk, mesh=mesh)
    fully_shard(m, mesh=mesh)
    torch.save(m.state_dict(), os.path.join(actor, f"model_world_size_{world}_rank_{rank}.pt"))
    if rank == 0:
        Path(actor, "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": world}))
    dcp.save({"model": m.state_dict()}, storage_writer=dcp.FileSystemWriter(dcp_dir))
    dist.barrier()
    dist.destroy_process_group()


def spawn_gloo(worker, args: tuple, nprocs: int, reset=None, tries: int = 3) -> None:
    """``mp.spawn(worker, (*args, store))`` over ``nprocs`` gloo ranks sharing a fresh file store, tried again (after
    ``reset()`` clears what the failed try wrote) when a rank is killed by a signal: on the loaded 2-core machine
    gloo now and then aborts a rank as it shuts down ("terminate called without an active exception", SIGABRT),
    which says nothing about the files being tested. A Python exception in a rank is never retried."""
    import tempfile

    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessExitedException

    for attempt in range(tries):
        with tempfile.TemporaryDirectory() as t:
            try:
                mp.spawn(worker, args=(*args, f"{t}/store"), nprocs=nprocs)
                return
            except ProcessExitedException:
                if attempt == tries - 1:
                    raise
        if reset is not None:
            reset()


def write_fsdp_step(root: Path, step: int, world: int = 2) -> tuple[Path, Path]:
    """verl's global_step_N/actor/ (rank files, fsdp_config.json, huggingface/config.json) and accelerate's
    checkpoint-N/pytorch_model_fsdp_0/ (with checkpoint-N/config.json) for tiny_llama(step), written by `world`
    spawned gloo processes. Returns (the actor dir, the checkpoint dir)."""
    import shutil

    actor = root / "verl" / f"global_step_{step}" / "actor"
    ckpt = root / "accelerate" / f"checkpoint-{step}"
    (actor / "huggingface").mkdir(parents=True)
    ckpt.mkdir(parents=True)
    cfg = tiny_llama(0).config
    cfg.to_json_file(actor / "huggingface" / "config.json")
    cfg.to_json_file(ckpt / "config.json")

    def reset() -> None:
        for f in actor.glob("model_world_size_*"):
            f.unlink()
        shutil.rmtree(ckpt / "pytorch_model_fsdp_0", ignore_errors=True)

    spawn_gloo(fsdp_worker, (world, step, str(actor), str(ckpt / "pytorch_model_fsdp_0")), world, reset)
    return actor, ckpt


def hsdp_worker(rank: int, world: int, step: int, actor: str, store: str) -> None:
    """One of 4 gloo ranks: HSDP (2 replicas × 2 shards, verl's ("ddp", "fsdp") mesh) of tiny_llama(step) held
    under `_orig_mod` (the attribute torch.compile's wrapper keeps the model in, so keys carry that prefix), then
    verl's per-rank `torch.save(model.state_dict())`."""
    import os

    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(1)  # two or four ranks on a 2-core machine
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ddp", "fsdp"))
    wrapper = torch.nn.Module()
    wrapper._orig_mod = tiny_llama(step)
    fully_shard(wrapper, mesh=mesh)
    torch.save(wrapper.state_dict(), os.path.join(actor, f"model_world_size_{world}_rank_{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def record_fsdp_worker(rank: int, world: int, out: str, store: str) -> None:
    """One of `world` gloo ranks: FSDP2 `fully_shard` of tiny_llama(0), a `DynamicsRecorder` on every rank over
    three SGD steps on a fixed batch, and the whole weights of each step gathered and saved by rank 0 as a
    safetensors checkpoint (the reference the sketches are checked against)."""
    import os

    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(1)  # two or four ranks on a 2-core machine
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from opd_dynamics.record import DynamicsRecorder

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    m = tiny_llama(0)
    cfg = m.config
    for blk in m.model.layers:
        fully_shard(blk, mesh=mesh)
    fully_shard(m, mesh=mesh)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    ids = torch.randint(0, 67, (4, 8), generator=torch.Generator().manual_seed(0))
    rec = DynamicsRecorder(Path(out) / "sk", k=3)

    def save(step: int) -> None:
        full = {n: p.full_tensor().detach().clone() for n, p in m.named_parameters()}
        if rank == 0:
            d = Path(out) / ("base" if step == 0 else f"run/checkpoint-{step}")
            d.mkdir(parents=True)
            save_file(full, str(d / "model.safetensors"))
            cfg.to_json_file(d / "config.json")

    rec.record(m, 0)
    save(0)
    for step in (1, 2, 3):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        rec.record(m, step)
        save(step)
    rec.close()
    dist.barrier()
    dist.destroy_process_group()


def placements_worker(rank: int, world: int, actor: str, store: str) -> None:
    """One of `world` gloo ranks: rank files (`torch.save` of a dict, verl's call) holding a DTensor sharded along
    dim 1 (uneven: 7 columns), a replicated one, one sharded along dim 0 and a plain tensor, all from seed 0."""
    import os

    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(1)  # two or four ranks on a 2-core machine
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    full = placements_tensors()
    sd = {"cols.weight": distribute_tensor(full["cols.weight"], mesh, [Shard(1)]),
          "rep.weight": distribute_tensor(full["rep.weight"], mesh, [Replicate()]),
          "rows.weight": distribute_tensor(full["rows.weight"], mesh, [Shard(0)]),
          "plain.bias": full["plain.bias"]}
    torch.save(sd, os.path.join(actor, f"model_world_size_{world}_rank_{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def placements_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"cols.weight": torch.randn(5, 7, generator=g), "rep.weight": torch.randn(4, 3, generator=g),
            "rows.weight": torch.randn(9, 2, generator=g).to(torch.bfloat16), "plain.bias": torch.randn(6, generator=g)}

"""Write one bench step as a DeepSpeed ZeRO-2 checkpoint with DeepSpeed itself (run by an interpreter that has it;
`bench_formats.py --deepspeed-python` calls this): the safetensors step's weights as the module of a one-rank
ZeRO-2 engine on DeepSpeed's CPU accelerator, bf16 mixed precision as OpenRLHF runs it, `save_checkpoint(out,
tag=global_stepN)`, then the optimizer partitions removed (the bench reads the model-states weights, the default
precision; 0.8 GB of fp32 masters and moments per step it would not read).

    python write_deepspeed.py SRC_DIR OUT_DIR STEP
"""

import os
import socket
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def module_from(sd: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                trainable: bool = True) -> torch.nn.Module:
    """An nn.Module tree whose parameters carry exactly the state dict's names (so an FSDP or DeepSpeed
    engine's keys are the same); bench_formats.py uses it too (this file imports nothing but torch and
    safetensors at its top, so an interpreter without opd_dynamics can run it)."""
    root = torch.nn.Module()
    for name, t in sd.items():
        *path, leaf = name.split(".")
        m = root
        for p in path:
            if not hasattr(m, p):
                m.add_module(p, torch.nn.Module())
            m = getattr(m, p)
        m.register_parameter(leaf, torch.nn.Parameter(t.to(dtype or t.dtype, copy=True), requires_grad=trainable))
    return root


def main() -> None:
    src, out, step = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    import deepspeed

    sd = {}
    for f in sorted(src.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    model = module_from(sd)
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    eng.save_checkpoint(str(out), tag=f"global_step{step}")
    for f in (out / f"global_step{step}").glob("*optim_states.pt"):
        f.unlink()
    for f in out.glob("zero_to_*.py"):
        f.unlink()
    (out / "latest").unlink(missing_ok=True)
    module = torch.load(out / f"global_step{step}" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.equal(module[n], sd[n]) for n in sd), "DeepSpeed changed the weights"


if __name__ == "__main__":
    main()

"""Write the DeepSpeed ZeRO fixtures of tests/test_formats.py with DeepSpeed itself (not a test dependency).

    python -m venv ds && ds/bin/pip install deepspeed==0.19.8 torch==2.13.0 transformers   # or any venv with them
    cd tests/data && DS_ACCELERATOR=cpu deepspeed --num_gpus 2 make_deepspeed.py 2
    cd tests/data && DS_ACCELERATOR=cpu deepspeed --num_gpus 2 make_deepspeed.py 3

On 2 CPU ranks (DeepSpeed's CPU accelerator, gloo): the tiny Llama of builders.tiny_llama(0), bf16 mixed precision
as OpenRLHF runs it, one AdamW step, then `save_checkpoint(deepspeed/zeroS, tag="global_step1")`. Beside it, as
references: `base/` (the weights before the step, float32 safetensors), `zeroS/fp32_reference.safetensors` (the
fp32 masters as DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint` rebuilds them) and, for ZeRO-2,
`zeroS/module_reference.safetensors` (the engine's bf16 module weights).
"""

import os
import sys
from pathlib import Path

import deepspeed
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from builders import tiny_llama  # noqa: E402

stage = int([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0])
out = Path(__file__).resolve().parent / "deepspeed"
model = tiny_llama(0)
rank = int(os.environ.get("RANK", "0"))
if rank == 0:
    model.save_pretrained(out / "base")
cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}, "bf16": {"enabled": True},
       "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
torch.manual_seed(rank)
x = torch.randint(0, 67, (1, 8))
eng.backward(eng(input_ids=x, labels=x).loss)
eng.step()
d = out / f"zero{stage}"
eng.save_checkpoint(str(d), tag="global_step1")
module = {k: v.detach().clone().contiguous() for k, v in eng.module.state_dict().items()} if stage < 3 else None
torch.distributed.barrier()
if rank == 0:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model.config.to_json_file(d / "global_step1" / "config.json")
    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(d), tag="global_step1")
    save_file({k: v.contiguous() for k, v in fp32.items()}, str(d / "fp32_reference.safetensors"))
    if module is not None:
        save_file(module, str(d / "module_reference.safetensors"))
    for f in d.glob("zero_to_*.py"):
        f.unlink()  # DeepSpeed's converter script: not needed by the tests

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

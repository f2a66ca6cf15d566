"""Tiny Qwen3-style causal LMs for the lab (teacher and student share one shape; the teacher is trained from
the student init).

Untied embeddings so that the embedding and the LM head show up as separate tensors in the
parameter analysis; float32 everywhere (updates are small, and the analysis subtracts weights).
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen3Config

from opd_dynamics.lab.presets import ModelSpec
from opd_dynamics.lab.task import VOCAB


def make_config(spec: ModelSpec, tokenizer) -> Qwen3Config:
    """A Qwen3 config of the given size over the lab's character vocabulary."""
    return Qwen3Config(
        vocab_size=len(VOCAB),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        head_dim=spec.hidden // spec.heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
        dtype="float32",
    )


def make_model(spec: ModelSpec, tokenizer, seed: int) -> PreTrainedModel:
    """A freshly initialised float32 model (seeded)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(spec, tokenizer), dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def load_model(path, device: str | torch.device = "cpu") -> PreTrainedModel:
    """Load a saved lab model in float32 on ``device``, in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.to(device).eval()


def n_params(model: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())

"""Parameter name → (layer, group, module, expert) for the architectures researchers post-train.

Grouping (docs/METRICS.md): attention, mlp, embedding, lm_head, norm, other. The parser works on the
dotted path: wrapper prefixes are dropped, the decoder-block index is the number after a block container
(`layers`, `h`, `blocks`, `layer`, `block`), the expert index the number after `experts`, and the group
comes from the parent path (attn / mlp …) before the leaf name, because leaves such as `c_proj` or
`dense` mean attention or MLP depending on where they sit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

GROUPS = ("attention", "mlp", "embedding", "lm_head", "norm", "other")
MATRIX_GROUPS = ("attention", "mlp")

#: what a PeftModel puts before the wrapped model's names
PEFT_PREFIX = "base_model.model."
# Wrappers that carry no meaning for analysis: PEFT, multimodal towers, DDP, torch.compile, HF bases.
_PREFIXES = (
    PEFT_PREFIX,
    "_orig_mod.",
    "module.",
    "model.language_model.",
    "language_model.model.",
    "language_model.",
    "model.decoder.",
    "model.model.",
    "model.",
    "transformer.",
    "gpt_neox.",
    "decoder.",
)
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|block|decoder_layers)\.(\d+)(?:\.|$)")
_EXPERT = re.compile(r"(?:^|\.)experts\.(\d+)(?:\.|$)")
_ADAPTER_PARTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "base_layer"}
_PARAM_SUFFIXES = ("weight", "bias", "lora_A", "lora_B", "scale", "g_idx")

_ATTN_PARENTS = {"attn", "attention", "self_attn", "self_attention", "attn_layer", "mixer", "cross_attn",
                 "linear_attn", "encdec_attention"}
_MLP_PARENTS = {"mlp", "feed_forward", "block_sparse_moe", "moe", "ffn", "feedforward", "experts",
                "shared_expert", "shared_experts"}
_ATTN_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn", "out_proj",
                "query", "key", "value", "wqkv", "Wqkv", "wq", "wk", "wv", "wo", "q_a_proj", "q_b_proj",
                "kv_a_proj_with_mqa", "kv_b_proj", "in_proj", "dense"}
_MLP_LEAVES = {"gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc", "dense_h_to_4h",
               "dense_4h_to_h", "w1", "w2", "w3", "fc_in", "fc_out", "shared_expert_gate", "router",
               "wi", "wi_0", "wi_1"}
_EMBED_LEAVES = {"embed_tokens", "wte", "wpe", "word_embeddings", "embed_positions", "embed_in",
                 "embeddings", "tok_embeddings", "position_embeddings"}
_HEAD_LEAVES = {"lm_head", "embed_out", "output"}
# Towers and projectors of multimodal models: their blocks are not the language model's decoder layers.
_NON_LM_PARTS = {"visual", "vision_tower", "vision_model", "vision_encoder", "image_encoder", "audio_tower",
                 "audio_model", "multi_modal_projector", "mm_projector", "vision_embed_tokens"}
# GPT-2 style Conv1D layers store (in, out); analysis wants (out, in).
_CONV1D_LEAVES = {"c_attn", "c_proj", "c_fc", "c_fc2"}


@dataclass(frozen=True)
class TensorName:
    """Where one parameter sits in the model."""

    name: str
    layer: int | None
    group: str
    module: str
    expert: int | None
    param: str  # 'weight', 'bias', … (the last path component)


Override = Mapping[str, Mapping[str, object]] | Callable[[str], Mapping[str, object] | None]


def strip_prefixes(name: str) -> str:
    """Drop wrapper prefixes (PEFT, multimodal, DDP, compile, HF base) from a parameter name."""
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if name.startswith(p) and len(name) > len(p):
                name = name[len(p):]
                changed = True
    return name


def _leaf_and_param(parts: list[str]) -> tuple[str, str]:
    if len(parts) >= 2 and parts[-1] in _PARAM_SUFFIXES:
        return parts[-2], parts[-1]
    return parts[-1], ""


def _group(parts: list[str], leaf: str) -> str:
    low = leaf.lower()
    if "norm" in low or low.startswith("ln") or low in {"layernorm", "final_layernorm"}:
        return "norm"
    if leaf in _HEAD_LEAVES and len(parts) <= 2:
        return "lm_head"
    if leaf in _EMBED_LEAVES:
        return "embedding"
    parents = set(parts[:-1])
    if parents & _MLP_PARENTS:
        return "mlp"
    if parents & _ATTN_PARENTS:
        return "attention"
    if leaf in _MLP_LEAVES:
        return "mlp"
    if leaf in _ATTN_LEAVES:
        return "attention"
    if leaf == "gate":  # MoE router outside a recognised parent
        return "mlp"
    return "other"


def parse_name(name: str, overrides: Override | None = None) -> TensorName:
    """Parse a parameter name. `overrides` maps a regex (searched in the full name) to fields to force,
    or is a callable returning such fields (or None); the first matching regex wins."""
    bare = strip_prefixes(name)
    parts = [x for x in bare.split(".") if x not in _ADAPTER_PARTS]
    bare = ".".join(parts)
    leaf, param = _leaf_and_param(parts)
    m = _BLOCK.search(bare)
    layer = int(m.group(1)) if m else None
    e = _EXPERT.search(bare)
    expert = int(e.group(1)) if e else None
    group = _group(parts[:-1] if param else parts, leaf)
    if _NON_LM_PARTS & set(parts):  # a vision or audio tower: 'other', and no decoder-layer index
        group, layer, expert = "other", None, None
    module = leaf
    if leaf == "gate" and group == "mlp":
        module = "router"
    if group == "embedding" and layer is not None:
        layer = None
    fields: dict[str, object] = {"layer": layer, "group": group, "module": module, "expert": expert}
    forced = _match_override(name, overrides)
    if forced:
        unknown = set(forced) - set(fields)
        if unknown:
            raise ValueError(f"naming override for {name!r} sets unknown fields {sorted(unknown)}")
        fields.update(forced)
    if fields["group"] not in GROUPS:
        raise ValueError(f"naming override for {name!r} gives group {fields['group']!r}, not one of {GROUPS}")
    return TensorName(name=name, param=param or leaf, **fields)  # type: ignore[arg-type]


def _match_override(name: str, overrides: Override | None) -> Mapping[str, object] | None:
    if overrides is None:
        return None
    if callable(overrides):
        return overrides(name)
    for pattern, fields in overrides.items():
        if re.search(pattern, name):
            return fields
    return None


def is_selected(name: str, shape: Sequence[int], groups: Sequence[str] | None = MATRIX_GROUPS,
                matrices_only: bool = True, overrides: Override | None = None) -> bool:
    """The one parameter-selection rule (EffOPD, offline extrapolation, interventions): the tensor's naming group
    is one of ``groups`` (None: any) and, with ``matrices_only``, it is 2-D."""
    return (groups is None or parse_name(name, overrides).group in groups) and (not matrices_only or len(shape) == 2)


#: model types whose stacked experts are stored (E, in, out) and used as x @ W[e] (transformers 5.x);
#: Mixtral, Qwen-MoE and DeepSeek stack theirs (E, out, in) like nn.Linear.
_EXPERTS_IN_OUT = {"llama4", "llama4_text", "gpt_oss"}


def stored_transposed(name: str, shape: tuple[int, ...], model_type: str | None = None) -> bool:
    """True for weights stored (..., in, out), which analysis transposes to (out, in): GPT-2 style Conv1D
    matrices and, for the model types in _EXPERTS_IN_OUT, stacked (E, in, out) experts."""
    parts = strip_prefixes(name).split(".")
    leaf, param = _leaf_and_param(parts)
    if len(shape) == 3:
        return model_type in _EXPERTS_IN_OUT and "experts" in parts
    if model_type is not None and model_type not in {"gpt2", "imagegpt", "decision_transformer"}:
        return False
    return param == "weight" and leaf in _CONV1D_LEAVES and len(shape) == 2


def natural_key(name: str) -> tuple:
    """Sort key that orders the numbers inside a name as numbers: layers 0, 1, 2, …, 10 (not 0, 1, 10, 11, …, 2)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part)

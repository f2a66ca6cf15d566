"""Parameter names → layer/group/module/expert, on the real parameter names of each architecture family."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from opd_dynamics.io.naming import GROUPS, parse_name, stored_transposed

SMALL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, vocab_size=64)
FAMILIES = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {"head_dim": 8}, "gemma": {"head_dim": 8},
    "phi3": {"pad_token_id": 0}, "gpt_neox": {}, "gpt2": dict(n_embd=16, n_layer=2, n_head=2, vocab_size=64),
    "opt": dict(ffn_dim=32, word_embed_proj_dim=16), "falcon": {},
    "mixtral": dict(num_local_experts=2, num_experts_per_tok=1),
    "qwen2_moe": dict(num_experts=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                      num_experts_per_tok=1),
    "deepseek_v3": dict(n_routed_experts=2, moe_intermediate_size=16, first_k_dense_replace=1, q_lora_rank=8,
                        kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4, n_group=1,
                        topk_group=1, num_experts_per_tok=1),
}
ATTN = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn", "dense", "out_proj",
        "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "c_proj"}
MLP = {"gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc", "c_proj", "dense_h_to_4h",
       "dense_4h_to_h", "router", "shared_expert_gate"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_real_parameter_names_of_each_family(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(family, **{**SMALL, **FAMILIES[family]})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    seen = set()
    for name, p in model.named_parameters():
        t = parse_name(name)
        seen.add(t.group)
        assert t.group != "other", name
        if p.dim() >= 2 and t.group == "attention":
            assert t.module in ATTN, name
        if p.dim() >= 2 and t.group == "mlp":
            assert t.module in MLP, name
        for marker in (".layers.", ".h."):
            if marker in name:
                assert t.layer == int(name.split(marker)[1].split(".")[0]), name
        if t.group in ("embedding", "lm_head") or name.endswith("model.norm.weight"):
            assert t.layer is None, name
    assert {"attention", "mlp", "embedding", "norm"} <= seen


@pytest.mark.parametrize("name,layer,group,module,expert", [
    ("model.layers.3.self_attn.q_proj.weight", 3, "attention", "q_proj", None),
    ("transformer.h.2.attn.c_proj.weight", 2, "attention", "c_proj", None),
    ("transformer.h.2.mlp.c_proj.weight", 2, "mlp", "c_proj", None),
    ("model.layers.1.block_sparse_moe.experts.5.w2.weight", 1, "mlp", "w2", 5),
    ("model.layers.1.block_sparse_moe.gate.weight", 1, "mlp", "router", None),
    ("model.layers.4.mlp.experts.17.gate_proj.weight", 4, "mlp", "gate_proj", 17),
    ("model.layers.4.mlp.shared_expert_gate.weight", 4, "mlp", "shared_expert_gate", None),
    ("model.language_model.layers.7.mlp.gate_up_proj.weight", 7, "mlp", "gate_up_proj", None),
    ("language_model.model.layers.2.self_attn.o_proj.weight", 2, "attention", "o_proj", None),
    ("gpt_neox.layers.0.attention.dense.weight", 0, "attention", "dense", None),
    ("gpt_neox.embed_in.weight", None, "embedding", "embed_in", None),
    ("embed_out.weight", None, "lm_head", "embed_out", None),
    ("model.decoder.layers.4.fc2.weight", 4, "mlp", "fc2", None),
    ("lm_head.weight", None, "lm_head", "lm_head", None),
    ("model.layers.0.self_attn.q_norm.weight", 0, "norm", "q_norm", None),
    ("transformer.ln_f.weight", None, "norm", "ln_f", None),
    ("base_model.model.model.layers.2.mlp.down_proj.lora_A.weight", 2, "mlp", "down_proj", None),
    ("_orig_mod.module.model.layers.9.mlp.up_proj.weight", 9, "mlp", "up_proj", None),
    ("blocks.9.mixer.in_proj.weight", 9, "attention", "in_proj", None),  # general fallback (Mamba-like)
    ("encoder.block.3.layer.1.DenseReluDense.wi.weight", 3, "mlp", "wi", None),
])
def test_known_names(name, layer, group, module, expert):
    t = parse_name(name)
    assert (t.layer, t.group, t.module, t.expert) == (layer, group, module, expert)


def test_override_mapping_and_callable():
    ov = {r"\.custom_mix\.": {"group": "mlp", "module": "mix"}}
    t = parse_name("model.layers.2.custom_mix.weight", ov)
    assert (t.layer, t.group, t.module) == (2, "mlp", "mix")
    t = parse_name("stem.conv.weight", lambda n: {"group": "other", "layer": 0} if n.startswith("stem") else None)
    assert (t.layer, t.group) == (0, "other")
    with pytest.raises(ValueError, match="not one of"):
        parse_name("a.b.weight", {"a": {"group": "bogus"}})


@pytest.mark.parametrize("name", ["model.visual.blocks.3.attn.qkv.weight",
                                  "model.vision_tower.vision_model.encoder.layers.2.self_attn.q_proj.weight",
                                  "model.multi_modal_projector.linear_1.weight",
                                  "vision_model.model.layers.1.mlp.fc1.weight"])
def test_multimodal_towers_are_not_language_model_layers(name):
    t = parse_name(name)
    assert (t.group, t.layer) == ("other", None)
    lm = parse_name("model.language_model.layers.2.self_attn.q_proj.weight")
    assert (lm.group, lm.layer) == ("attention", 2)


def test_transposed_only_for_weights_stored_in_out():
    assert stored_transposed("transformer.h.0.attn.c_attn.weight", (16, 48), "gpt2")
    assert not stored_transposed("transformer.h.0.attn.c_attn.bias", (48,), "gpt2")
    assert not stored_transposed("model.layers.0.mlp.c_proj.weight", (16, 48), "llama")
    assert not stored_transposed("transformer.h.0.attn.c_attn.weight", (48, 16), "gpt_bigcode")  # nn.Linear


@pytest.mark.parametrize("model_type, name", [
    ("gpt_oss", "model.layers.0.mlp.experts.gate_up_proj"),
    ("llama4", "language_model.model.layers.0.feed_forward.experts.down_proj"),
])
def test_stacked_experts_in_out_follow_the_architecture(model_type, name):
    """GPT-OSS and Llama 4 stack experts (E, in, out) (their transformers modules compute x @ W[e]);
    Mixtral and Qwen-MoE stack them (E, out, in); without a model type nothing is assumed."""
    assert stored_transposed(name, (4, 16, 32), model_type)
    assert not stored_transposed(name, (4, 32, 16), "qwen3_moe")
    assert not stored_transposed(name, (4, 32, 16), None)


_PREFIX = st.sampled_from(["", "model.", "base_model.model.model.", "model.language_model.", "transformer.",
                           "_orig_mod.model."])
_CONTAINER = st.sampled_from(["layers", "h", "blocks", "layer"])
_MOD = st.sampled_from([("self_attn.q_proj", "attention", "q_proj"), ("mlp.down_proj", "mlp", "down_proj"),
                        ("attention.query_key_value", "attention", "query_key_value"),
                        ("mlp.dense_h_to_4h", "mlp", "dense_h_to_4h"), ("input_layernorm", "norm", "input_layernorm"),
                        ("attn.c_attn", "attention", "c_attn"), ("mlp.c_fc", "mlp", "c_fc")])


@given(prefix=_PREFIX, container=_CONTAINER, layer=st.integers(0, 200), mod=_MOD,
       param=st.sampled_from(["weight", "bias"]))
def test_parser_properties(prefix, container, layer, mod, param):
    path, group, module = mod
    t = parse_name(f"{prefix}{container}.{layer}.{path}.{param}")
    assert (t.layer, t.group, t.module, t.param) == (layer, group, module, param)
    assert t.group in GROUPS


@given(layer=st.integers(0, 99), expert=st.integers(0, 255))
def test_expert_index_property(layer, expert):
    t = parse_name(f"model.layers.{layer}.mlp.experts.{expert}.up_proj.weight")
    assert (t.layer, t.expert, t.group) == (layer, expert, "mlp")

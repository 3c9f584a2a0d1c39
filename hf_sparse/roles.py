"""Roles of linear layers (``q``, ``down``, ``qkv``, ...) from their qualified names."""

from __future__ import annotations

from .moe import is_router

# Leaf module name -> role. Fused projections keep a role of their own (qkv, gate_up): one
# matrix, one solve. Parent-dependent names (GPT-2's ``c_proj`` is "o" under ``attn`` and "fc2"
# under ``mlp``) are in ``_PARENT_ROLES``. The leaf of an expert view is its stacked parameter.
_LEAF_ROLES = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "qkv_proj": "qkv",  # Phi-3, CodeGen
    "query_key_value": "qkv",  # Falcon, BLOOM, GPT-NeoX, ChatGLM
    "W_pack": "qkv",  # Baichuan
    "Wqkv": "qkv",  # MPT, DBRX
    "wqkv": "qkv",  # InternLM2
    "c_attn": "qkv",  # GPT-2, GPT-BigCode
    "o_proj": "o",
    "out_proj": "o",  # OPT, GPT-J
    "gate_proj": "gate",
    "w1": "gate",  # Mixtral-style experts, InternLM2
    "up_proj": "up",
    "w3": "up",
    "gate_up_proj": "gate_up",  # Phi-3, stacked MoE experts
    "down_proj": "down",
    "w2": "down",
    "fc1": "fc1",
    "fc_in": "fc1",  # GPT-J
    "c_fc": "fc1",
    "dense_h_to_4h": "fc1",
    "fc2": "fc2",
    "fc_out": "fc2",
    "dense_4h_to_h": "fc2",
}
_ATTENTION_PARENTS = ("attn", "attention", "self_attn", "self_attention")
_PARENT_ROLES = {
    ("mlp", "c_proj"): "fc2",
    **{(parent, "c_proj"): "o" for parent in _ATTENTION_PARENTS},
    **{(parent, "dense"): "o" for parent in _ATTENTION_PARENTS},  # Phi, Falcon, BLOOM, NeoX
    **{(parent, "wo"): "o" for parent in _ATTENTION_PARENTS},  # InternLM2
}

# PEFT tuner layers keep the original layer as ``<name>.base_layer``; the adapter's own
# linears (``lora_A``...) live beside it and are never pruning targets.
ADAPTER_BASE_SUFFIX = ".base_layer"

ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "fc1", "fc2")
ATTENTION_ROLES = ("q", "k", "v", "qkv", "o")


def linear_role(name: str) -> str | None:
    """Role of a linear layer from its qualified name (``q``, ``down``, ``qkv``, ...), or None.

    Routers have no role. An expert view ``...experts.gate_up_proj.3`` has the role of its
    stacked parameter.
    """
    parts = name.removesuffix(ADAPTER_BASE_SUFFIX).split(".")
    if len(parts) > 1 and parts[-1].isdigit():
        parts = parts[:-1]
    if is_router(".".join(parts)):
        return None
    leaf = parts[-1]
    parent = parts[-2] if len(parts) > 1 else ""
    return _PARENT_ROLES.get((parent, leaf)) or _LEAF_ROLES.get(leaf)

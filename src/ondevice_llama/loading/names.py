"""One table from every checkpoint format's tensor names to ours.

Canonical names (per layer `i`): `layers.{i}.{input_norm,q_proj,k_proj,v_proj,o_proj,post_attention_norm,
gate_proj,up_proj,down_proj}`, plus `embed_tokens`, `norm` and `lm_head`. Every weight is in Hugging
Face layout: Linear weights are [out, in], and Q/K rows follow the rotate-half RoPE convention.
"""

from __future__ import annotations

import re

LAYER_TENSORS = ("input_norm", "q_proj", "k_proj", "v_proj", "o_proj", "post_attention_norm",
                 "gate_proj", "up_proj", "down_proj")
GLOBAL_TENSORS = ("embed_tokens", "norm", "lm_head")

# (Hugging Face name, GGUF name, canonical name); {i} stands for the layer index.
NAME_TABLE: tuple[tuple[str, str, str], ...] = (
    ("model.embed_tokens.weight", "token_embd.weight", "embed_tokens"),
    ("model.norm.weight", "output_norm.weight", "norm"),
    ("lm_head.weight", "output.weight", "lm_head"),
    ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", "layers.{i}.input_norm"),
    ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight", "layers.{i}.q_proj"),
    ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight", "layers.{i}.k_proj"),
    ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight", "layers.{i}.v_proj"),
    ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight", "layers.{i}.o_proj"),
    ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight",
     "layers.{i}.post_attention_norm"),
    ("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", "layers.{i}.gate_proj"),
    ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight", "layers.{i}.up_proj"),
    ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight", "layers.{i}.down_proj"),
)

# Tensors a Llama checkpoint may carry that hold no weights we need (derivable buffers).
IGNORED = re.compile(r"(rotary_emb\.inv_freq|rope_freqs\.weight)$")


def _compile(column: int) -> list[tuple[re.Pattern[str], str]]:
    rules = []
    for row in NAME_TABLE:
        pattern = re.escape(row[column]).replace(r"\{i\}", r"(?P<i>\d+)")
        rules.append((re.compile(pattern + "$"), row[2]))
    return rules


_HF_RULES = _compile(0)
_GGUF_RULES = _compile(1)


def _canonical(name: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in rules:
        match = pattern.match(name)
        if match:
            return target.format(i=match.group("i")) if "{i}" in target else target
    return None


def hf_to_canonical(name: str) -> str | None:
    """Our name for a Hugging Face tensor, or None if it is not a Llama weight we know."""
    return _canonical(name, _HF_RULES)


def gguf_to_canonical(name: str) -> str | None:
    """Our name for a GGUF tensor, or None if it is not a Llama weight we know."""
    return _canonical(name, _GGUF_RULES)


def canonical_to_hf(name: str) -> str:
    """The Hugging Face name of one of our tensors (for writing synthetic checkpoints)."""
    layer = re.match(r"layers\.(\d+)\.(\w+)$", name)
    for hf, _, ours in NAME_TABLE:
        if layer and ours == "layers.{i}." + layer.group(2):
            return hf.format(i=layer.group(1))
        if ours == name:
            return hf
    raise KeyError(name)


def expected_names(num_layers: int, tied: bool) -> list[str]:
    """Every canonical tensor a Llama checkpoint must hold."""
    names = ["embed_tokens", "norm"] + ([] if tied else ["lm_head"])
    names += [f"layers.{i}.{t}" for i in range(num_layers) for t in LAYER_TENSORS]
    return names

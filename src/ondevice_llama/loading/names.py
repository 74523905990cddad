"""Our tensors: one table of their shapes and roles, and one from every checkpoint format's names to ours.

Canonical names (per layer `i`): `layers.{i}.{input_norm,q_proj,k_proj,v_proj,o_proj,post_attention_norm,
gate_proj,up_proj,down_proj}`, plus `embed_tokens`, `norm` and `lm_head`. Every weight is in Hugging
Face layout: Linear weights are [out, in], and Q/K rows follow the rotate-half RoPE convention.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import LlamaConfig

# ---------------------------------------------------------------- shapes and roles

# Tensor -> its shape in named dimensions: vocab, hidden, intermediate, q (num_heads x head_dim) and kv
# (num_kv_heads x head_dim). Per-layer tensors in the order a layer uses them.
LAYER_SHAPES: dict[str, tuple[str, ...]] = {
    "input_norm": ("hidden",),
    "q_proj": ("q", "hidden"), "k_proj": ("kv", "hidden"), "v_proj": ("kv", "hidden"), "o_proj": ("hidden", "q"),
    "post_attention_norm": ("hidden",),
    "gate_proj": ("intermediate", "hidden"), "up_proj": ("intermediate", "hidden"),
    "down_proj": ("hidden", "intermediate"),
}
GLOBAL_SHAPES: dict[str, tuple[str, ...]] = {
    "embed_tokens": ("vocab", "hidden"), "norm": ("hidden",), "lm_head": ("vocab", "hidden"),
}
LAYER_TENSORS = tuple(LAYER_SHAPES)
GLOBAL_TENSORS = tuple(GLOBAL_SHAPES)
# Roles, by name (never by position in LAYER_TENSORS).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS  # every quantized Linear of a layer
NORMS = ("input_norm", "post_attention_norm")
assert set(PROJECTIONS + NORMS) == set(LAYER_TENSORS)


def is_norm(name: str) -> bool:
    """Whether canonical tensor `name` is an RMSNorm weight (a layer's two, or the final `norm`)."""
    return name == "norm" or name.rsplit(".", 1)[-1] in NORMS


def dimensions(config: LlamaConfig) -> dict[str, int]:
    """The named dimensions of the shape table, for `config`."""
    c = config
    return {"vocab": c.vocab_size, "hidden": c.hidden_size, "intermediate": c.intermediate_size,
            "q": c.num_heads * c.head_dim, "kv": c.num_kv_heads * c.head_dim}


def tensor_shape(config: LlamaConfig, name: str) -> tuple[int, ...]:
    """The shape of tensor `name` ("layers.3.q_proj", or just "q_proj"; "embed_tokens") of `config`."""
    tensor = name.rsplit(".", 1)[-1]
    dims = LAYER_SHAPES.get(tensor) or GLOBAL_SHAPES[tensor]
    size = dimensions(config)
    return tuple(size[d] for d in dims)


def tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape for every tensor of `config` (no `lm_head` when tied), in the order of
    transformers' state dict: the embedding, per layer its projections then its norms, the final norm,
    the LM head."""
    names = ["embed_tokens"] + [f"layers.{i}.{t}" for i in range(config.num_layers) for t in PROJECTIONS + NORMS]
    names += ["norm"] + ([] if config.tie_word_embeddings else ["lm_head"])
    return {name: tensor_shape(config, name) for name in names}


def num_parameters(config: LlamaConfig) -> int:
    """Weights in a checkpoint of `config` (a tied LM head counted once)."""
    return sum(math.prod(shape) for shape in tensor_shapes(config).values())


# ---------------------------------------------------------------- names in checkpoint formats

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

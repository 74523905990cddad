"""Layout rules of the on-device graph, as plain functions testable without a graph.

- Split-head attention (SHA): every query head and every key/value head gets its own projection.
- Linear as MatMul (or 1x1 Conv): activations [1, n, channels] (or NCHW [1, channels, 1, n]).
- Key cache stored transposed, [kv_heads, 1, head_dim, length], so Q @ K needs no transpose at run time;
  value cache as [kv_heads, 1, length, head_dim].

The graph's inputs and outputs follow the contract of Qualcomm's on-device LLM runtime (Genie, its `qnn-htp`
engine): exact tensor names, the KV input holding the C - N past slots and the KV output only the N new ones,
a [1, 1, N, C] additive mask whose last N columns are the new tokens, RoPE cos/sin [1, 1, N, head_dim / 2],
and a hidden state between parts that one part outputs and the next inputs under the same name. So a
compiled part runs on a phone unchanged, and our host runtime feeds it exactly as Genie does.
"""

from __future__ import annotations

import numpy as np

INPUT_IDS = "input_ids"  # [1, N] int32, first part
ATTENTION_MASK = "attention_mask"  # [1, 1, N, C] float32, 0 to attend, MASK_VALUE (adapt.mask) not to
POSITION_COS = "position_ids_cos"  # [1, 1, N, head_dim / 2] float32
POSITION_SIN = "position_ids_sin"
LOGITS = "logits"  # [1, N, vocab] float32 (prompt processor) or [1, 1, vocab], last part


def head_rows(weight: np.ndarray, head: int, head_dim: int) -> np.ndarray:
    """The [head_dim, in] block of a Q/K/V projection [heads * head_dim, in] that serves one head."""
    return weight[head * head_dim:(head + 1) * head_dim]


def conv_weight(weight: np.ndarray) -> np.ndarray:
    """Linear [out, in] -> 1x1 Conv [out, in, 1, 1]."""
    return np.ascontiguousarray(weight[:, :, None, None])


def matmul_weight(weight: np.ndarray) -> np.ndarray:
    """Linear [out, in] -> MatMul right operand [in, out]."""
    return np.ascontiguousarray(weight.T)


def past_capacity(context_length: int, sequence_length: int) -> int:
    """Cached slots a graph of sequence length n sees: its n new slots fill the context."""
    if sequence_length >= context_length:
        raise ValueError(f"sequence length {sequence_length} must be below context length {context_length}")
    return context_length - sequence_length


def key_cache_shape(kv_heads: int, head_dim: int, length: int) -> tuple[int, int, int, int]:
    return (kv_heads, 1, head_dim, length)


def value_cache_shape(kv_heads: int, head_dim: int, length: int) -> tuple[int, int, int, int]:
    return (kv_heads, 1, length, head_dim)


def mask_shape(n: int, context_length: int) -> tuple[int, int, int, int]:
    return (1, 1, n, context_length)


def rope_input_shape(n: int, head_dim: int) -> tuple[int, int, int, int]:
    return (1, 1, n, head_dim // 2)


def hidden_state_name(layer: int) -> str:
    """The residual stream entering `layer`: output of the part before it, input of the part that starts there."""
    return f"hidden_states_{layer}"


def past_key_name(layer: int) -> str:
    return f"past_key_{layer}_in"


def past_value_name(layer: int) -> str:
    return f"past_value_{layer}_in"


def new_key_name(layer: int) -> str:
    return f"past_key_{layer}_out"


def new_value_name(layer: int) -> str:
    return f"past_value_{layer}_out"


def present_key_name(layer: int) -> str:
    """The CPU target's in-place cache output (bound to the same buffer as `past_key_name`)."""
    return f"present_key_{layer}"


def present_value_name(layer: int) -> str:
    return f"present_value_{layer}"

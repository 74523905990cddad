"""Layout rules of the on-device graph, as plain functions testable without a graph.

- Split-head attention (SHA): every query head and every key/value head gets its own projection.
- Linear as 1x1 Conv: activations in NCHW as [1, channels, 1, n], weights as [out, in, 1, 1].
- Key cache stored transposed, [kv_heads, head_dim, length], so Q @ K needs no transpose at run time;
  value cache as [kv_heads, length, head_dim].
"""

from __future__ import annotations

import numpy as np


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


def key_cache_shape(kv_heads: int, head_dim: int, length: int) -> tuple[int, int, int]:
    return (kv_heads, head_dim, length)


def value_cache_shape(kv_heads: int, head_dim: int, length: int) -> tuple[int, int, int]:
    return (kv_heads, length, head_dim)


def past_key_name(layer: int) -> str:
    return f"past_key_{layer}"


def past_value_name(layer: int) -> str:
    return f"past_value_{layer}"


def new_key_name(layer: int) -> str:
    return f"new_key_{layer}"


def new_value_name(layer: int) -> str:
    return f"new_value_{layer}"


def present_key_name(layer: int) -> str:
    """The CPU target's in-place cache output (bound to the same buffer as `past_key_name`)."""
    return f"present_key_{layer}"


def present_value_name(layer: int) -> str:
    return f"present_value_{layer}"

"""The additive attention mask a static-shape graph takes as input.

A graph run of sequence length n sees `past_capacity = C - n` cached slots followed by its own n
new slots. Prompts shorter than n are left-padded, so the last row is always the last real token.
"""

from __future__ import annotations

import numpy as np

MASK_VALUE = -1e4  # exp(-1e4) is exactly 0 in float32 and float16 yet stays finite


def chunk_mask(past_capacity: int, n: int, past_len: int, valid: int) -> np.ndarray:
    """[1, 1, n, past_capacity + n] float32 mask for `valid` real tokens after `past_len` cached ones.

    Real rows attend to the cached prefix and causally to real new slots. Padding rows attend only
    to their own slot, which keeps softmax finite; their outputs are discarded.
    """
    if not 0 < valid <= n:
        raise ValueError(f"valid tokens must be in 1..{n}, got {valid}")
    if past_len > past_capacity:
        raise ValueError(f"{past_len} cached tokens exceed the graph's cache capacity {past_capacity}")
    mask = np.full((n, past_capacity + n), MASK_VALUE, dtype=np.float32)
    pad = n - valid
    mask[pad:, :past_len] = 0.0
    rows = np.arange(n)[:, None]
    cols = np.arange(n)[None, :]
    causal = (cols <= rows) & (cols >= pad)
    causal[:pad] = np.eye(n, dtype=bool)[:pad]
    mask[:, past_capacity:][causal] = 0.0
    return mask[None, None]

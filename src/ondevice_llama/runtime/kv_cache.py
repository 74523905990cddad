"""The host-side KV cache: preallocated per layer, addressed by position.

Graphs return only their new entries; the host writes them here and feeds slices back in. Keys are
stored transposed ([kv_heads, 1, head_dim, length]) exactly as the graphs read them, and in the graphs'
own dtype: integer codes for a quantized KV cache, which the host never needs to decode.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..adapt import layout
from ..config import LlamaConfig


class KVCache:
    def __init__(self, config: LlamaConfig, capacity: int, key_dtypes: Sequence[np.dtype] | None = None,
                 value_dtypes: Sequence[np.dtype] | None = None):
        """`key_dtypes` / `value_dtypes`: one per layer (default float32)."""
        kv, d, layers = config.num_kv_heads, config.head_dim, config.num_layers
        key_dtypes = key_dtypes or [np.float32] * layers
        value_dtypes = value_dtypes or [np.float32] * layers
        self.capacity = capacity
        self.keys = [np.zeros(layout.key_cache_shape(kv, d, capacity), t) for t in key_dtypes]
        self.values = [np.zeros(layout.value_cache_shape(kv, d, capacity), t) for t in value_dtypes]
        self.length = 0  # positions 0..length-1 hold valid entries

    def past(self, layer: int, slots: int) -> tuple[np.ndarray, np.ndarray]:
        """The first `slots` positions of one layer, contiguous, as a graph with that capacity takes them."""
        if slots == self.capacity:
            return self.keys[layer], self.values[layer]
        return (np.ascontiguousarray(self.keys[layer][..., :slots]),
                np.ascontiguousarray(self.values[layer][:, :, :slots]))

    def write(self, layer: int, new_key: np.ndarray, new_value: np.ndarray, valid: int) -> None:
        """Store the last `valid` new entries (left padding is dropped) at the current length.

        The entry of the context's very last position is not kept: no later token can attend to it.
        """
        end = min(self.length + valid, self.capacity)
        keep = end - self.length
        if keep <= 0:
            return
        first = new_key.shape[-1] - valid
        self.keys[layer][..., self.length:end] = new_key[..., first:first + keep]
        self.values[layer][:, :, self.length:end] = new_value[:, :, first:first + keep]

    def advance(self, valid: int) -> None:
        self.length += valid

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on (masked from then on, so no need to clear them)."""
        self.length = min(self.length, length)

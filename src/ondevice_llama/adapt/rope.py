"""RoPE tables in numpy: the graphs take cos/sin as inputs, so the runtime computes them too.

Arithmetic follows Hugging Face's float32 order (inv_freq in float32, angle = position * inv_freq
in float32) so that our graphs match the reference to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..config import LlamaConfig, RopeScaling


def _default(inv_freq: np.ndarray, scaling: RopeScaling) -> np.ndarray:
    return inv_freq


def _linear(inv_freq: np.ndarray, scaling: RopeScaling) -> np.ndarray:
    return (inv_freq / np.float32(scaling.factor)).astype(np.float32)


def _llama3(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
    """Llama 3.1: slow frequencies divided by `factor`, fast ones kept, a smooth ramp between."""
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


ROPE_SCALINGS: dict[str, Callable[[np.ndarray, RopeScaling], np.ndarray]] = {
    "default": _default, "linear": _linear, "llama3": _llama3,
}


def inv_freq(config: LlamaConfig) -> np.ndarray:
    """Rotation frequencies, one per pair of head dimensions: [head_dim // 2] float32."""
    d = config.head_dim
    exponents = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    base = (1.0 / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    return ROPE_SCALINGS[config.rope_scaling.rope_type](base, config.rope_scaling)


def rope_tables(config: LlamaConfig, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin for `positions` ([n] ints): each [1, n, head_dim // 2] float32, the graph inputs."""
    angles = positions.astype(np.float32)[:, None] * inv_freq(config)[None, :]
    return np.cos(angles)[None].astype(np.float32), np.sin(angles)[None].astype(np.float32)

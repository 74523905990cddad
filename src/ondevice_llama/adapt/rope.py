"""RoPE tables in numpy: the graphs take cos/sin as inputs, so the runtime computes them too.

One implementation for every stage: the torch reference, the exporter and the runtime all take their
tables from `rope_tables`. Arithmetic follows transformers' float32 order (inv_freq in float32, angle =
position * inv_freq in float32) so that our graphs match it to rounding. Rope types are the ones Llama
checkpoints use: default, linear, dynamic (NTK), llama3 and yarn (`modeling_rope_utils` in transformers).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..config import LlamaConfig, RopeScaling

F32 = np.float32


def _exponents(dim: int) -> np.ndarray:
    return np.arange(0, dim, 2, dtype=np.int64).astype(F32) / F32(dim)


def _base(theta: float, dim: int) -> np.ndarray:
    return (1.0 / (F32(theta) ** _exponents(dim))).astype(F32)


def _default(config: LlamaConfig, seq_len: int) -> np.ndarray:
    return _base(config.rope_theta, config.head_dim)


def _linear(config: LlamaConfig, seq_len: int) -> np.ndarray:
    return (_base(config.rope_theta, config.head_dim) / F32(config.rope_scaling.factor)).astype(F32)


def _dynamic(config: LlamaConfig, seq_len: int) -> np.ndarray:
    """NTK-aware: beyond the trained length the base grows with the sequence (equal to default within it)."""
    d, factor, trained = config.head_dim, config.rope_scaling.factor, config.max_position_embeddings
    seq_len = max(seq_len, trained)
    theta = config.rope_theta * ((factor * seq_len / trained) - (factor - 1)) ** (d / (d - 2))
    return _base(theta, d)


def _llama3(config: LlamaConfig, seq_len: int) -> np.ndarray:
    """Llama 3.1: slow frequencies divided by `factor`, fast ones kept, a smooth ramp between."""
    s, inv_freq = config.rope_scaling, _base(config.rope_theta, config.head_dim)
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(F32)


def _yarn(config: LlamaConfig, seq_len: int) -> np.ndarray:
    """YaRN: interpolate slow dimensions, extrapolate fast ones, a linear ramp (in rotations) between."""
    s, d, theta = config.rope_scaling, config.head_dim, config.rope_theta

    def correction_dim(rotations: float) -> float:
        return (d * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # as transformers: avoid dividing by zero
    ramp = np.clip((np.arange(d // 2, dtype=F32) - low) / (high - low), 0, 1).astype(F32)
    extrapolation = 1 - ramp
    pos_freqs = (F32(theta) ** _exponents(d)).astype(F32)
    interpolated, extrapolated = 1.0 / (F32(s.factor) * pos_freqs), 1.0 / pos_freqs
    return (interpolated * (1 - extrapolation) + extrapolated * extrapolation).astype(F32)


ROPE_FREQUENCIES: dict[str, Callable[[LlamaConfig, int], np.ndarray]] = {
    "default": _default, "linear": _linear, "dynamic": _dynamic, "llama3": _llama3, "yarn": _yarn,
}


def inv_freq(config: LlamaConfig, seq_len: int = 0) -> np.ndarray:
    """Rotation frequencies, one per pair of head dimensions: [head_dim // 2] float32.

    `seq_len` (the positions seen so far) matters only to dynamic scaling, and only beyond the trained length.
    """
    return ROPE_FREQUENCIES[config.rope_scaling.rope_type](config, seq_len)


def attention_scaling(scaling: RopeScaling) -> float:
    """The factor cos and sin are multiplied by: 1 except for yarn (0.1 ln(factor) + 1 unless given)."""
    if scaling.rope_type != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if scaling.mscale and scaling.mscale_all_dim:
        return mscale(scaling.factor, scaling.mscale) / mscale(scaling.factor, scaling.mscale_all_dim)
    return mscale(scaling.factor)


def rope_tables(config: LlamaConfig, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin for `positions` ([n] ints): each [1, n, head_dim // 2] float32, the graph inputs."""
    positions = np.asarray(positions)
    seq_len = int(positions.max()) + 1 if positions.size else 0
    angles = positions.astype(F32)[:, None] * inv_freq(config, seq_len)[None, :]
    scale = F32(attention_scaling(config.rope_scaling))
    return (np.cos(angles) * scale)[None].astype(F32), (np.sin(angles) * scale)[None].astype(F32)


def rotate(config: LlamaConfig, x: np.ndarray, position: int) -> np.ndarray:
    """`x` [..., head_dim] (already rotated to position 0, i.e. as computed) rotated on to `position`.

    RoPE makes attention depend on positions only through their difference, so a key moved by the same offset
    as every query gives the same scores: the attention sink is baked into the graphs at position -1, and a
    prompt's first token is at position 0, as Genie numbers them. The yarn cos/sin scale is not applied again.
    """
    angles = np.float32(position) * inv_freq(config)
    cos, sin = np.cos(angles).astype(F32), np.sin(angles).astype(F32)
    half = config.head_dim // 2
    x1, x2 = x[..., :half].astype(F32), x[..., half:].astype(F32)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(F32)

"""Pure weight quantizers on numpy arrays: choose parameters, quantize, dequantize.

Weights are [out, in]; quantization groups run along `in`, either whole rows (per output channel) or
blocks of `block_size`. Three modes, all dequantizing as (code - zero_point) * scale:

- symmetric: signed codes in [-2^(b-1), 2^(b-1) - 1], scale absmax / (2^(b-1) - 1), no zero point
  (GGUF Q8_0/Q4_0-like; what NPUs want for weights);
- asymmetric: unsigned codes in [0, 2^b - 1] with an integer zero point (the range always holds 0);
- affine: unsigned codes, scale (max - min) / (2^b - 1) and a float zero point -min / scale, i.e.
  w = scale * code + min, exactly GGUF's Q4_1, so a Q4_1 file round-trips losslessly.

Block scales may also be held on the grid of low-power block quantization (LPBQ, QNN's "blockwise expansion"):
per output channel, one float scale times an unsigned integer of `scale_bits` bits for each block
(`lpbq_scales`). QNN HTP runs int4 block weights in that form as integer arithmetic; other block scales it
runs with float16 activations, several 16-bit output steps off (benchmarks/htp_float_ops.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes [out, in] with one scale (and zero point) per group of `group_size` inputs."""

    codes: np.ndarray  # int8 (symmetric) or uint8, [out, in]
    scales: np.ndarray  # float32 [out, groups]
    zero_points: np.ndarray | None  # None (symmetric), uint8 (asymmetric) or float32 (affine), [out, groups]
    bits: int
    group_size: int
    max_error: float  # max |w - dequantize(quantize(w))|


def _groups(w: np.ndarray, group_size: int) -> np.ndarray:
    out, cols = w.shape
    if cols % group_size:
        raise ValueError(f"input size {cols} is not a multiple of the block size {group_size}")
    return w.reshape(out, cols // group_size, group_size)


MODES = ("symmetric", "asymmetric", "affine")


def choose_qparams(w: np.ndarray, bits: int, group_size: int, mode: str = "symmetric"
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale (and zero point) per group that cover the group's range; constant groups get a usable scale."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of {MODES}")
    g = _groups(w.astype(np.float32), group_size)
    if mode == "symmetric":
        qmax = 2 ** (bits - 1) - 1
        scales = np.abs(g).max(axis=-1) / qmax
        return np.where(scales > 0, scales, 1.0).astype(np.float32), None
    qmax = 2**bits - 1
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    if mode == "asymmetric":  # the range must hold 0 so that an integer zero point exists
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scales = ((hi - lo) / qmax).astype(np.float32)
    scales = np.where(scales > 0, scales, np.maximum(np.abs(lo), 1.0)).astype(np.float32)
    zero_points = (-lo / scales).astype(np.float32)
    if mode == "asymmetric":
        return scales, np.clip(np.round(zero_points), 0, qmax).astype(np.uint8)
    return scales, zero_points


def lpbq_unit(scales: np.ndarray, scale_bits: int) -> np.ndarray:
    """The LPBQ grid's unit per row of block scales [out, groups]: the largest / 2^scale_bits, [out, 1]. QNN
    derives the same per-channel scale."""
    return np.asarray(scales, np.float64).max(axis=-1, keepdims=True) / 2**scale_bits


def on_lpbq_grid(scales: np.ndarray, unit: np.ndarray, scale_bits: int) -> np.ndarray:
    """`scales` as the nearest multiples of `unit` (broadcast per row) by an integer in [1, 2^scale_bits]."""
    return np.clip(np.round(scales / unit), 1, 2**scale_bits) * unit


def lpbq_scales(scales: np.ndarray, scale_bits: int) -> np.ndarray:
    """Block scales [out, groups] on the LPBQ grid of their own rows (the largest stays exact)."""
    return on_lpbq_grid(scales, lpbq_unit(scales, scale_bits), scale_bits).astype(np.float32)


def quantize(w: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, group_size: int
             ) -> np.ndarray:
    """Round to nearest and clamp to the code range."""
    g = _groups(w.astype(np.float32), group_size) / scales[..., None]
    if zero_points is None:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return np.clip(np.round(g), lo, hi).astype(np.int8).reshape(w.shape)
    q = np.round(g + zero_points[..., None].astype(np.float32))  # = round(g) + zp for integer zero points
    return np.clip(q, 0, 2**bits - 1).astype(np.uint8).reshape(w.shape)


def dequantize(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, group_size: int
               ) -> np.ndarray:
    g = _groups(codes.astype(np.float32), group_size)
    if zero_points is not None:
        g = g - zero_points[..., None].astype(np.float32)  # affine: exact zero points are fractional
    return (g * scales[..., None]).reshape(codes.shape).astype(np.float32)


def quantize_weight(w: np.ndarray, bits: int, block_size: int | None = None, mode: str = "symmetric",
                    scale_bits: int | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of a [out, in] weight; `block_size` None means per output channel;
    `scale_bits`: symmetric block scales on the LPBQ grid (`lpbq_scales`)."""
    group = block_size or w.shape[1]
    scales, zero_points = choose_qparams(w, bits, group, mode)
    if scale_bits is not None and block_size is not None and mode == "symmetric":
        scales = lpbq_scales(scales, scale_bits)
    codes = quantize(w, scales, zero_points, bits, group)
    error = float(np.abs(dequantize(codes, scales, zero_points, group) - w).max())
    return QuantizedWeight(codes, scales, zero_points, bits, group, error)


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """Signed 4-bit codes, two per byte, the first in the low nibble (ONNX INT4 and our quantized checkpoints)."""
    flat = codes.reshape(-1).astype(np.int8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    nibbles = (flat & 0x0F).astype(np.uint8)
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `pack_int4`: int8 codes in [-8, 7] of the given shape."""
    codes = np.empty(packed.size * 2, np.int8)
    # (n ^ 8) - 8 maps nibbles 0..7 to 0..7 and 8..15 to -8..-1
    codes[0::2] = ((packed & 0x0F).astype(np.int8) ^ 8) - 8
    codes[1::2] = ((packed >> 4).astype(np.int8) ^ 8) - 8
    return codes[:int(np.prod(shape))].reshape(shape)

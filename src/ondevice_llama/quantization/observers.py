"""Activation observers and fake-quant: the taps that record each activation's calibration range
(`RangeObserver`), turn ranges into encodings (`encodings_from_ranges`) and quantize-dequantize
activations as the exported graph does (`fake_quant`, `FakeQuantTap`), plus the SQNR they are judged by."""

from __future__ import annotations

import numpy as np
import torch

from ..adapt.mask import MASK_VALUE
from .encodings import ActivationEncoding, is_kv_tap


def position_axis(x: torch.Tensor) -> int:
    """The sequence axis of every tap layout: [positions, vocab] logits, [batch, positions, channels]
    hidden states, [batch, heads, positions, ...] attention tensors."""
    return min(x.ndim - 2, 2)


def later_positions(x: torch.Tensor) -> torch.Tensor:
    """`x` without sequence position 0."""
    axis = position_axis(x)
    return x.narrow(axis, 1, x.shape[axis] - 1)


# Of an activation's calibration values, left out at each end of its range with 8-bit activations. 16-bit ones
# keep the whole range: the default model's rare massive activations (up to 25,000 in the late residual stream,
# at a few tokens past position 0) cost more clipped than in a coarser step (w8a16 RTN, 2,048 wikitext tokens:
# perplexity 31.12 and KL 0.044 clipped at 1e-5, 30.44 and 0.015 unclipped; float 30.22).
OUTLIER_FRACTION_8_BIT = 1e-5
_KEPT_EXTREMES = 512  # candidates kept per end; the range drops at most this many values


def _largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest of a flat tensor, descending. Chunk maxima bound the k-th largest from below, so only
    values above that bound go through topk (a full topk over attention scores takes a second)."""
    if values.numel() > 64 * k:
        chunk_maxima = values[: values.numel() // 4096 * 4096].view(-1, 4096).amax(dim=1)
        if chunk_maxima.numel() >= k:
            bound = torch.topk(chunk_maxima, k).values[-1]
            values = values[values >= bound]
    return torch.topk(values, min(k, values.numel())).values


class RangeObserver:
    """A tap that records each activation's range over the calibration data (masked attention scores left
    out), less its most extreme `outlier_fraction` at each end (for 8-bit activations, where a single token's
    massive activations would set a step that every other token pays for).

    skip_first: leave sequence position 0 out (the attention sink, which quantized graphs never run), but
    for the KV cache entries: the sink's keys and values sit in the same cache as every other position's.
    """

    def __init__(self, skip_first: bool = False, outlier_fraction: float = 0.0):
        self.skip_first, self.outlier_fraction = skip_first, outlier_fraction
        self._top: dict[str, torch.Tensor] = {}  # largest values seen, descending
        self._bottom: dict[str, torch.Tensor] = {}  # negated smallest values, descending
        self._count: dict[str, int] = {}

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        skip = self.skip_first and not is_kv_tap(name)
        values = (later_positions(x.detach()) if skip else x.detach()).reshape(-1).float()
        if name.endswith(".scores"):
            values = values[values > MASK_VALUE / 2]
        for kept, new in ((self._top, values), (self._bottom, -values)):
            if name in kept:
                new = torch.cat([kept[name], _largest(new, _KEPT_EXTREMES)])
            kept[name] = _largest(new, _KEPT_EXTREMES)
        self._count[name] = self._count.get(name, 0) + values.numel()
        return x

    @property
    def ranges(self) -> dict[str, tuple[float, float]]:
        ranges = {}
        for name, count in self._count.items():
            top, bottom = self._top[name], self._bottom[name]
            drop = min(int(count * self.outlier_fraction), len(top) - 1, len(bottom) - 1)
            ranges[name] = (-float(bottom[drop]), float(top[drop]))
        return ranges


SCORE_FLOOR = 20.0  # masked scores clamp this far below the largest: exp(-20) is negligible


def encodings_from_ranges(ranges: dict[str, tuple[float, float]], bits_for) -> dict[str, ActivationEncoding]:
    encodings = {}
    for name, (lo, hi) in ranges.items():
        bits = bits_for(name)
        if bits is None:
            continue
        if name.endswith(".scores"):
            lo = min(lo, hi - SCORE_FLOOR)  # room for the masked entries to saturate harmlessly
        encodings[name] = ActivationEncoding(bits, lo, hi)
    return encodings


def fake_quant(x: torch.Tensor, encoding: ActivationEncoding) -> torch.Tensor:
    """Quantize-dequantize as QuantizeLinear/DequantizeLinear do (round half to even, saturate)."""
    scale, zp = encoding.scale, encoding.zero_point
    q = torch.clamp(torch.round(x / scale) + zp, 0, 2**encoding.bits - 1)
    return ((q - zp) * scale).to(x.dtype)


class FakeQuantTap:
    """A tap that fake-quantizes every activation that has an encoding.

    float_first: keep sequence position 0 (the attention sink) in float, but for the KV cache entries
    (quantized in the cache like every position's); for forwards over whole
    sequences, which start at position 0.
    """

    def __init__(self, encodings: dict[str, ActivationEncoding], float_first: bool = False):
        self.encodings = encodings
        self.float_first = float_first

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        encoding = self.encodings.get(name)
        if encoding is None:
            return x
        quantized = fake_quant(x, encoding)
        if self.float_first and not is_kv_tap(name):
            axis = position_axis(x)
            quantized = torch.cat([x.narrow(axis, 0, 1), later_positions(quantized)], dim=axis)
        return quantized


def sqnr_db(reference: np.ndarray | torch.Tensor, approximation: np.ndarray | torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    ref, approx = np.asarray(reference, np.float64), np.asarray(approximation, np.float64)
    noise = np.sum((ref - approx) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref**2) / noise))

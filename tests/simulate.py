"""Simulated quantization: a tensor source whose weights went through quantize and dequantize.

The reference model built on it is the "simulated" model that an exported quantized graph must match;
both take their codes from the same quantizer, so any difference is the runtime's own arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ondevice_llama.loading import TensorSource
from ondevice_llama.quantization.quantizers import dequantize, quantize_weight


@dataclass(frozen=True)
class WeightScheme:
    bits: int
    block_size: int | None  # None: per output channel
    mode: str = "symmetric"  # symmetric | asymmetric | affine (see quantizers)


def fake_quantize(weight: np.ndarray, scheme: WeightScheme) -> np.ndarray:
    q = quantize_weight(weight, scheme.bits, scheme.block_size, scheme.mode)
    return dequantize(q.codes, q.scales, q.zero_points, q.group_size)


class FakeQuantSource:
    """Wraps a source: each 2-D weight comes back quantized by the scheme `recipe(name)` picks (None: float)."""

    def __init__(self, source: TensorSource, recipe: Callable[[str], WeightScheme | None]):
        self.source = source
        self.recipe = recipe

    def names(self) -> list[str]:
        return self.source.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(name)

    def get(self, name: str) -> np.ndarray:
        weight = self.source.get(name)
        scheme = self.recipe(name) if weight.ndim == 2 else None
        return weight if scheme is None else fake_quantize(weight, scheme)


def uniform_recipe(layers: WeightScheme | None, head: WeightScheme | None) -> Callable[[str], WeightScheme | None]:
    """One scheme for every projection, another for the embedding and LM head."""
    def recipe(name: str) -> WeightScheme | None:
        return head if name in ("embed_tokens", "lm_head") else layers
    return recipe

"""Activation encodings: asymmetric per-tensor ranges (written for NPU toolchains by export.encodings_file)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KV_TAPS = ("k_rope", "v_cache")  # what the KV cache holds: RoPE'd keys and values


def is_kv_tap(name: str) -> bool:
    """Taps whose values the KV cache holds (`KV_TAPS`)."""
    return name.endswith(tuple(f".{tap}" for tap in KV_TAPS))


@dataclass(frozen=True)
class ActivationEncoding:
    """Unsigned `bits`-bit codes covering [min, max]; the range always holds 0 so zero is exact."""

    bits: int
    min: float
    max: float

    @property
    def scale(self) -> float:
        lo, hi = min(self.min, 0.0), max(self.max, 0.0)
        return max((hi - lo) / (2**self.bits - 1), 1e-12)

    @property
    def zero_point(self) -> int:
        return int(np.clip(round(-min(self.min, 0.0) / self.scale), 0, 2**self.bits - 1))

    @property
    def dtype(self) -> np.dtype:
        """The unsigned integer type of the codes (QuantizeLinear's zero-point type)."""
        return np.dtype(np.uint16 if self.bits == 16 else np.uint8)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Codes as QuantizeLinear computes them: round half to even, saturate."""
        q = np.rint(np.asarray(x, np.float32) / np.float32(self.scale)) + self.zero_point
        return np.clip(q, 0, 2**self.bits - 1).astype(self.dtype)

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        return ((codes.astype(np.float32) - self.zero_point) * np.float32(self.scale)).astype(np.float32)

    def to_dict(self) -> dict:
        return {"bits": self.bits, "min": self.min, "max": self.max}

    @classmethod
    def from_dict(cls, data: dict) -> ActivationEncoding:
        return cls(int(data["bits"]), float(data["min"]), float(data["max"]))


def norm_weight_encoding(weight: np.ndarray) -> ActivationEncoding:
    """The 16-bit encoding of an RMSNorm weight whose norm output is quantized.

    QNN HTP runs such a norm as one quantized RmsNorm op when its weight is quantized too; left in float it
    becomes a chain of float16 ops whose outputs land several 16-bit steps away from float32's. The export
    holds these codes and the simulated model uses the same values, so both compute the same norm.
    """
    weight = np.asarray(weight, np.float32)
    return ActivationEncoding(16, float(weight.min()), float(weight.max()))


def quantized_norm_weight(weight: np.ndarray) -> np.ndarray:
    """`weight` through its `norm_weight_encoding` and back, as the exported graph holds it."""
    encoding = norm_weight_encoding(weight)
    return encoding.dequantize(encoding.quantize(weight)).reshape(np.shape(weight))

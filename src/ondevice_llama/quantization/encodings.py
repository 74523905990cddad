"""Activation encodings: asymmetric per-tensor ranges (written for NPU toolchains by export.encodings_file)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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

    def to_dict(self) -> dict:
        return {"bits": self.bits, "min": self.min, "max": self.max}

    @classmethod
    def from_dict(cls, data: dict) -> ActivationEncoding:
        return cls(int(data["bits"]), float(data["min"]), float(data["max"]))

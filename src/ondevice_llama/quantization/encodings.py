"""Activation encodings: asymmetric per-tensor ranges, in the form NPU toolchains (AIMET/QNN) consume."""

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

    def to_aimet(self) -> dict:
        """AIMET/QNN encoding entry: offset is minus the zero point; min/max are those the grid represents."""
        scale, zp = self.scale, self.zero_point
        return {"bitwidth": self.bits, "dtype": "int", "is_symmetric": "False", "scale": scale, "offset": -zp,
                "min": -zp * scale, "max": (2**self.bits - 1 - zp) * scale}

    def to_dict(self) -> dict:
        return {"bits": self.bits, "min": self.min, "max": self.max}

    @classmethod
    def from_dict(cls, data: dict) -> ActivationEncoding:
        return cls(int(data["bits"]), float(data["min"]), float(data["max"]))


def weight_param_encodings(scales: np.ndarray, bits: int) -> list[dict]:
    """AIMET param entries for symmetric weights: one per output channel (or per channel and block, row-major)."""
    qmax = 2 ** (bits - 1) - 1
    return [{"bitwidth": bits, "dtype": "int", "is_symmetric": "True", "scale": float(s), "offset": -(qmax + 1),
             "min": float(-(qmax + 1) * s), "max": float(qmax * s)} for s in scales.reshape(-1)]

"""What the runtime asks of an engine and its cache; `CpuEngine` and `NpuEngine` (on ONNX Runtime's CPU, or on
QNN HTP for a compiled folder) are the two that exist."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..manifest import Manifest


class Cache(Protocol):
    length: int  # positions 0..length-1 hold valid entries

    def advance(self, valid: int) -> None: ...

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on."""


class Engine(Protocol):
    manifest: Manifest

    def new_cache(self) -> Cache: ...

    def prefill(self, tokens: list[int], cache: Cache) -> np.ndarray:
        """Logits [positions, vocab] of a prompt after what `cache` holds (the last row is the next token's)."""

    def step(self, tokens: list[int], cache: Cache) -> np.ndarray:
        """One token generator run; logits [positions, vocab]."""

    def all_logits(self, tokens: list[int], cache: Cache) -> np.ndarray:
        """Every position's logits [len(tokens), vocab] (exports with all logits)."""

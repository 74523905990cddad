"""The one error type for unusable checkpoints: it always names the file."""

from __future__ import annotations

from pathlib import Path


class CheckpointError(ValueError):
    def __init__(self, path: Path | str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)

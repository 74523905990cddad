"""The one error type for unusable checkpoints: it always names the file."""

from __future__ import annotations

from ..files import FileError


class CheckpointError(FileError):
    """A checkpoint file (or folder) that cannot be used; the message starts with its path."""

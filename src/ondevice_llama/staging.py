"""Resumable work in a staging folder: finished parts recorded with the sha256 of their files.

A long job (compiling a 7B model part by part) writes into `.NAME.partial` beside its destination. Each
finished part is recorded in `progress.json` with the job's key (the identity of its inputs and options)
and the checksums of its files; a rerun with the same key verifies them and does only the rest. A record of
the wrong shape, another key or a changed file counts as not done.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .files import sha256_file

PROGRESS_FILE = "progress.json"


def staging_folder(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


class StagedParts:
    """The parts of one job finished in `staging`: index -> the record the job kept for it (`done`).

    `valid(index, record)`: whether a record read back still fits the job (a part planned differently does
    not); a record it rejects, or that raises, counts as not done.
    """

    def __init__(self, staging: Path, key: str, valid: Callable[[int, dict[str, Any]], bool] = lambda i, r: True):
        self.staging, self.key = staging, key
        self.done: dict[int, dict[str, Any]] = {}
        self._sums: dict[int, dict[str, str]] = {}
        for index, record, sums in self._read():
            try:
                fits = valid(index, record)
            except (KeyError, TypeError, ValueError, AttributeError):
                fits = False
            if fits and sums and all((staging / f).is_file() and sha256_file(staging / f) == d
                                     for f, d in sums.items()):
                self.done[index], self._sums[index] = record, sums

    @property
    def sha256(self) -> dict[str, str]:
        """file -> sha256 of every finished part's files."""
        return {f: d for sums in self._sums.values() for f, d in sums.items()}

    def _read(self) -> list[tuple[int, dict[str, Any], dict[str, str]]]:
        try:
            progress = json.loads((self.staging / PROGRESS_FILE).read_text())
            if progress["key"] != self.key:
                return []
            return [(int(e["index"]), dict(e["record"]), {str(f): str(d) for f, d in e["sha256"].items()})
                    for e in progress["parts"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return []

    def record(self, index: int, record: dict[str, Any], files: list[str], known: dict[str, str] | None = None) -> None:
        """Part `index` is finished: `record` (JSON) is what a rerun gets back, `files` what it verifies
        (`known`: their digests where already computed)."""
        known = known or {}
        self.done[index] = record
        self._sums[index] = {f: known.get(f) or sha256_file(self.staging / f) for f in files}
        entries = [{"index": i, "record": self.done[i], "sha256": self._sums[i]} for i in sorted(self.done)]
        tmp = self.staging / f"{PROGRESS_FILE}.tmp"
        tmp.write_text(json.dumps({"key": self.key, "parts": entries}, indent=1))
        tmp.replace(self.staging / PROGRESS_FILE)

    def finish(self) -> None:
        """The job is complete: the record goes, so the folder holds only the result."""
        (self.staging / PROGRESS_FILE).unlink(missing_ok=True)

"""Lazy, memory-mapped safetensors reading with numpy alone.

We parse the header ourselves instead of using `safetensors` so that bfloat16 checkpoints load
without torch, and so that a truncated file is caught before any tensor is read.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .errors import CheckpointError

DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """One .safetensors file: header parsed eagerly, tensor data mapped and read on demand."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(path, "too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8 or header_len > 100_000_000:
                raise CheckpointError(path, f"header length {header_len} exceeds the file size {size}")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(path, f"unreadable safetensors header ({e})") from None
        header.pop("__metadata__", None)
        for name, entry in header.items():
            if entry.get("dtype") not in DTYPES:
                raise CheckpointError(path, f"tensor {name} has unsupported dtype {entry.get('dtype')}")
        self.data_start = 8 + header_len
        self.entries: dict[str, dict] = header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end > size:
            raise CheckpointError(path, f"truncated: tensors need {self.data_start + end} bytes, "
                                        f"file has {size}")
        self._map: np.memmap | None = None

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def read_raw(self, name: str) -> np.ndarray:
        """The tensor in its stored dtype (bfloat16 as uint16), as a read-only view of the mapping."""
        entry = self.entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, stop = entry["data_offsets"]
        raw = self._map[self.data_start + start:self.data_start + stop]
        return raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32 (a fresh array; the mapping itself is never written)."""
        array = self.read_raw(name)
        if self.entries[name]["dtype"] == "BF16":
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array.astype(np.float32)


CODES = {np.dtype(v): k for k, v in DTYPES.items() if k != "BF16"}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write arrays as one safetensors file, tensor by tensor."""
    header, offset = {}, 0
    for name, array in tensors.items():
        header[name] = {"dtype": CODES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())

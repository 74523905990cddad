"""Lazy safetensors reading with numpy alone, in bounded host memory.

We parse the header ourselves instead of using `safetensors` so that bfloat16 checkpoints load
without torch, and so that a truncated file is caught before any tensor is read.

`read` copies a tensor out with positional reads into a fresh float32 array, converting in chunks, so
streaming a whole checkpoint costs one tensor of memory at a time: the file's pages go through the
page cache (reclaimable) and never into this process's resident set, as they would through a
long-lived memory map. `read_raw` does map the file, for zero-copy views of small tensors (quantized
codes); it is not the way to stream a whole model.
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
        """The tensor in its stored dtype (bfloat16 as uint16), as a read-only view of a memory map of the
        file. Pages it touches stay resident while the map lives (as long as this object): use `read`
        to stream many or large tensors."""
        entry = self.entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, stop = entry["data_offsets"]
        raw = self._map[self.data_start + start:self.data_start + stop]
        return raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def read(self, name: str) -> np.ndarray:
        """The tensor as a fresh float32 array, read from the file (not mapped), converted in chunks of
        at most `READ_CHUNK_BYTES`: peak memory is the result plus one chunk."""
        entry = self.entries[name]
        stored = np.dtype(DTYPES[entry["dtype"]])
        start = self.data_start + entry["data_offsets"][0]
        out = np.empty(entry["shape"], np.float32)
        flat = out.reshape(-1)
        if stored == np.float32:
            read_into(self.path, start, flat)
            return out
        step = max(1, READ_CHUNK_BYTES // stored.itemsize)
        with open(self.path, "rb", buffering=0) as f:
            for i in range(0, flat.size, step):
                chunk = np.empty(min(step, flat.size - i), stored)
                _read_exactly(f, self.path, start + i * stored.itemsize, chunk)
                if entry["dtype"] == "BF16":  # bfloat16 is float32's top half
                    np.left_shift(chunk, 16, out=flat[i:i + chunk.size].view(np.uint32), dtype=np.uint32)
                else:
                    flat[i:i + chunk.size] = chunk
        return out


READ_CHUNK_BYTES = 32 << 20


def read_into(path: Path, offset: int, array: np.ndarray) -> None:
    """Fill the contiguous `array` with the file's bytes from `offset` (no mapping, no extra copy)."""
    with open(path, "rb", buffering=0) as f:
        _read_exactly(f, path, offset, array)


def _read_exactly(f, path: Path, offset: int, array: np.ndarray) -> None:
    view = memoryview(array.reshape(-1).view(np.uint8))
    f.seek(offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:done + (1 << 30)])  # Linux reads at most ~2 GiB per call
        if not n:
            raise CheckpointError(path, f"truncated: wanted {len(view)} bytes at offset {offset}, got {done}")
        done += n


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

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
from typing import NamedTuple

import numpy as np

from ..files import json_type, parse_json
from .errors import CheckpointError

DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # what a model weight may be stored as
MAX_HEADER_BYTES = 100_000_000


class Entry(NamedTuple):
    """One tensor of the header, checked: its bytes [start, end) of the data hold exactly dtype x shape."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class SafetensorsFile:
    """One .safetensors file: header parsed and checked eagerly, tensor data read on demand.

    `dtypes` limits the stored dtypes accepted (a checkpoint's weights are floats: an integer dtype there would
    be read as numbers, not refused)."""

    def __init__(self, path: Path, dtypes: tuple[str, ...] = tuple(DTYPES)):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(path, "too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
                raise CheckpointError(path, f"header length {header_len} exceeds the file size {size}")
            header = parse_json(f.read(header_len), path, "safetensors header", CheckpointError)
        if not isinstance(header, dict):
            raise CheckpointError(path, f"the safetensors header must be a JSON object, not {json_type(header)}")
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(path, "__metadata__ must be an object of strings")
        self.data_start = 8 + header_len
        self.entries: dict[str, Entry] = {name: _entry(path, name, value, dtypes) for name, value in header.items()}
        _check_layout(path, self.entries, size - self.data_start)
        self._map: np.memmap | None = None

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def read_raw(self, name: str) -> np.ndarray:
        """The tensor in its stored dtype (bfloat16 as uint16), as a read-only view of a memory map of the
        file. Pages it touches stay resident while the map lives (as long as this object): use `read`
        to stream many or large tensors."""
        entry = self.entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._map[self.data_start + entry.start:self.data_start + entry.end]
        return raw.view(DTYPES[entry.dtype]).reshape(entry.shape)

    def read(self, name: str) -> np.ndarray:
        """The tensor as a fresh float32 array, read from the file (not mapped), converted in chunks of
        at most `READ_CHUNK_BYTES`: peak memory is the result plus one chunk."""
        entry = self.entries[name]
        stored = np.dtype(DTYPES[entry.dtype])
        start = self.data_start + entry.start
        out = np.empty(entry.shape, np.float32)
        flat = out.reshape(-1)
        if stored == np.float32:
            read_into(self.path, start, flat)
            return out
        step = max(1, READ_CHUNK_BYTES // stored.itemsize)
        with open(self.path, "rb", buffering=0) as f:
            for i in range(0, flat.size, step):
                chunk = np.empty(min(step, flat.size - i), stored)
                _read_exactly(f, self.path, start + i * stored.itemsize, chunk)
                if entry.dtype == "BF16":  # bfloat16 is float32's top half
                    np.left_shift(chunk, 16, out=flat[i:i + chunk.size].view(np.uint32), dtype=np.uint32)
                else:
                    flat[i:i + chunk.size] = chunk
        return out


READ_CHUNK_BYTES = 32 << 20


def _entry(path: Path, name: str, value: object, dtypes: tuple[str, ...]) -> Entry:
    """A header entry checked for types, and for a byte range exactly as long as its dtype and shape need."""
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(path, f"tensor {name}: an entry needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if dtype not in dtypes:
        raise CheckpointError(path, f"tensor {name} has unsupported dtype {dtype} (supported: {', '.join(dtypes)})")
    if not isinstance(shape, list) or not all(_whole(d) for d in shape):
        raise CheckpointError(path, f"tensor {name}: shape must be a list of non-negative integers, got {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_whole(o) for o in offsets):
        raise CheckpointError(path, f"tensor {name}: data_offsets must be two non-negative integers, got {offsets!r}")
    start, end = offsets
    need = int(np.prod(shape, dtype=object)) * np.dtype(DTYPES[dtype]).itemsize
    if end - start != need:
        raise CheckpointError(path, f"tensor {name}: data_offsets {offsets} hold {end - start} bytes, "
                                    f"{dtype} x {shape} needs {need}")
    return Entry(dtype, tuple(shape), start, end)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(path: Path, entries: dict[str, Entry], data_bytes: int) -> None:
    """Tensors tile the data exactly, in order, as safetensors requires: no overlap, no gap, nothing past the
    end (a truncated file) and nothing after the last one."""
    offset = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start != offset:
            problem = "overlaps the tensor before it" if entry.start < offset else f"leaves a gap after byte {offset}"
            raise CheckpointError(path, f"tensor {name}: data_offsets [{entry.start}, {entry.end}] {problem}")
        offset = entry.end
    if offset > data_bytes:
        raise CheckpointError(path, f"truncated: tensors need {offset} bytes of data, the file has {data_bytes}")
    if offset < data_bytes:
        raise CheckpointError(path, f"{data_bytes - offset} bytes after the last tensor (not a safetensors file)")


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

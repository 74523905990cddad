"""A checked GGUF reader: metadata as typed Python values, and a tensor table whose byte ranges are proven.

gguf-py's `GGUFReader` trusts a file's counts and offsets: a damaged count can make it loop for ever, and a
tensor whose type or offset was changed is handed out as garbage. Here every count is checked against the
bytes left, every string must be UTF-8, and each tensor's type, shape, alignment and place in the data are
checked: GGUF writers lay tensors out one after the other, each at the next aligned offset, so a changed type
(another byte count) or offset breaks that tiling and is refused. What stays undetectable without checksums
is a change to a type of the same size (F16/BF16, Q4_0/IQ4_NL) or to the data itself.

Errors are one-line `CheckpointError`s naming the file. The file is mapped only while the header is parsed.
"""

from __future__ import annotations

import math
import mmap
import struct
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from .errors import CheckpointError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
# GGUF value types: scalars by struct format, then strings and arrays.
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
INTS, FLOATS, BOOL = frozenset({0, 1, 2, 3, 4, 5, 10, 11}), frozenset({6, 12}), 7
# What a caller may ask a metadata value to be: kind -> (description, accepted value or item types).
KINDS = {
    "int": ("an integer", INTS), "float": ("a number", INTS | FLOATS), "bool": ("true or false", {BOOL}),
    "str": ("a string", {STRING}), "[int]": ("an array of integers", INTS),
    "[float]": ("an array of numbers", INTS | FLOATS), "[str]": ("an array of strings", {STRING}),
}
_REQUIRED = object()


class GGUFTensor(NamedTuple):
    name: str
    type: GGMLQuantizationType
    dims: tuple[int, ...]  # GGML order: dims[0] is the contiguous row length
    offset: int  # absolute, in the file
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order (the reverse of GGML's)."""
        return tuple(reversed(self.dims))


class _Cursor:
    """Reads forward through the mapped header; nothing is read past the end of the file."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def need(self, size: int, what: str) -> None:
        if size > len(self.buf) - self.pos:
            raise CheckpointError(self.path, f"truncated or damaged GGUF file: {what} runs past its end")

    def scalar(self, code: str, what: str) -> Any:
        size = struct.calcsize("<" + code)
        self.need(size, what)
        (value,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        size = self.scalar("Q", what)
        self.need(size, what)
        raw = self.buf[self.pos:self.pos + size]
        self.pos += size
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(self.path, f"{what} is not UTF-8 (byte {e.start})") from None

    def array(self, what: str) -> tuple[int, list]:
        item_type, count = self.scalar("I", what), self.scalar("Q", what)
        if item_type == STRING:
            self.need(count * 8, what)  # each string has at least its length
            return item_type, [self.string(what) for _ in range(count)]
        if item_type not in SCALARS:
            raise CheckpointError(self.path, f"{what}: unsupported array item type {item_type}")
        dtype = np.dtype("<" + SCALARS[item_type])
        self.need(count * dtype.itemsize, what)
        values = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
        self.pos += count * dtype.itemsize
        return item_type, values


class GGUFFile:
    """A GGUF file's metadata (`value`) and tensor table (`tensors`), checked; `read` dequantizes one tensor."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        if size < 24:
            raise CheckpointError(self.path, "too short to be a GGUF file")
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cursor = _Cursor(buf, self.path)
            self.metadata = self._header(cursor)
            self.alignment = self._alignment()
            infos = self._tensor_infos(cursor)
            data_start = _align(cursor.pos, self.alignment)
            self.tensors = {t.name: t for t in self._place(infos, data_start, size, buf)}

    # ---- parsing

    def _header(self, cursor: _Cursor) -> dict[str, tuple[int, int | None, Any]]:
        """key -> (value type, item type for arrays, value)."""
        if cursor.buf[:4] != MAGIC:
            raise CheckpointError(self.path, "not a GGUF file (no GGUF magic number)")
        cursor.pos = 4
        version = cursor.scalar("I", "the version")
        if version not in VERSIONS:
            raise CheckpointError(self.path, f"GGUF version {version} is not supported (only {VERSIONS}; "
                                             "big-endian files are not supported)")
        self._tensor_count, kv_count = cursor.scalar("Q", "the tensor count"), cursor.scalar("Q", "the key count")
        cursor.need(kv_count * 12, f"{kv_count} metadata entries")
        metadata = {}
        for _ in range(kv_count):
            key = cursor.string("a metadata key")
            if key in metadata:
                raise CheckpointError(self.path, f"metadata key {key} appears twice")
            value_type, what = cursor.scalar("I", f"metadata {key}"), f"metadata {key}"
            if value_type == STRING:
                metadata[key] = (STRING, None, cursor.string(what))
            elif value_type == ARRAY:
                metadata[key] = (ARRAY, *cursor.array(what))
            elif value_type in SCALARS:
                metadata[key] = (value_type, None, cursor.scalar(SCALARS[value_type], what))
            else:
                raise CheckpointError(self.path, f"{what} has unknown value type {value_type}")
        return metadata

    def _alignment(self) -> int:
        alignment = self.value("general.alignment", "int", DEFAULT_ALIGNMENT)
        if alignment <= 0 or alignment & (alignment - 1):
            raise CheckpointError(self.path, f"general.alignment must be a power of two, got {alignment}")
        return alignment

    def _tensor_infos(self, cursor: _Cursor) -> list[tuple[str, int, tuple[int, ...], int]]:
        cursor.need(self._tensor_count * 24, f"{self._tensor_count} tensor descriptions")
        infos = []
        for i in range(self._tensor_count):
            name = cursor.string(f"the name of tensor {i}")
            n_dims = cursor.scalar("I", f"tensor {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise CheckpointError(self.path, f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            cursor.need(n_dims * 8, f"tensor {name}")
            dims = tuple(cursor.scalar("Q", f"tensor {name}") for _ in range(n_dims))
            infos.append((name, cursor.scalar("I", f"tensor {name}"), dims, cursor.scalar("Q", f"tensor {name}")))
        return infos

    def _place(self, infos: list, data_start: int, size: int, buf: mmap.mmap) -> list[GGUFTensor]:
        """Tensors with checked types and shapes, which must tile the data as GGUF writers lay it out."""
        tensors = [self._tensor(name, code, dims, data_start + offset) for name, code, dims, offset in infos]
        if len({t.name for t in tensors}) != len(tensors):
            raise CheckpointError(self.path, "two tensors have the same name")
        if not tensors:  # a tokenizer-only file
            return tensors
        end = data_start
        for t in sorted(tensors, key=lambda t: t.offset):
            expected = _align(end, self.alignment)
            if t.offset != expected:
                problem = "overlaps the tensor before it" if t.offset < expected else "leaves a gap before it"
                raise CheckpointError(self.path, f"tensor {t.name} at offset {t.offset - data_start} {problem} "
                                                 f"(expected {expected - data_start}; a changed type or offset?)")
            end = t.offset + t.n_bytes
        tail = buf[end:end + self.alignment] if end <= size else b""
        if end > size:
            raise CheckpointError(self.path, f"truncated GGUF file: the tensors need {end} bytes, the file has {size}")
        if size not in (end, _align(end, self.alignment)) or any(tail):
            raise CheckpointError(self.path, f"{size - end} bytes after the last tensor, where at most its padding "
                                             f"may be (a changed type or size, or bytes added?)")
        return tensors

    def _tensor(self, name: str, code: int, dims: tuple[int, ...], offset: int) -> GGUFTensor:
        try:
            qtype = GGMLQuantizationType(code)
        except ValueError:
            raise CheckpointError(self.path, f"tensor {name} has unknown type {code}") from None
        if not _dequantizable(qtype):
            raise CheckpointError(self.path, f"tensor {name} has type {qtype.name}, which is not a weight type "
                                             f"we can read")
        block, type_size = GGML_QUANT_SIZES[qtype]
        if min(dims) < 1 or dims[0] % block:
            raise CheckpointError(self.path, f"tensor {name} of type {qtype.name} cannot have dimensions {dims}")
        if offset % self.alignment:
            raise CheckpointError(self.path, f"tensor {name} is not aligned to {self.alignment} bytes")
        return GGUFTensor(name, qtype, dims, offset, math.prod(dims) // block * type_size)

    # ---- access

    def value(self, key: str, kind: str, default: Any = _REQUIRED) -> Any:
        """Metadata `key` as `kind` ("int", "float", "bool", "str", "[int]", "[float]", "[str]"); `default` when
        absent (absent without a default is an error), and a one-line error when it has another type."""
        if key not in self.metadata:
            if default is _REQUIRED:
                raise CheckpointError(self.path, f"metadata {key} is missing")
            return default
        value_type, item_type, value = self.metadata[key]
        description, accepted = KINDS[kind]
        is_list = kind.startswith("[")
        if (value_type == ARRAY) != is_list or (item_type if is_list else value_type) not in accepted:
            raise CheckpointError(self.path, f"metadata {key} must be {description}")
        if kind in ("float", "[float]") and not all(math.isfinite(v) for v in (value if is_list else [value])):
            raise CheckpointError(self.path, f"metadata {key} must be finite")
        return float(value) if kind == "float" else value

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` dequantized to a fresh float32 array in numpy order, read from the file (not mapped)."""
        from .safetensors_reader import read_into

        t = self.tensors[name]
        rows = math.prod(t.dims[1:])
        raw = np.empty((rows, t.n_bytes // rows), np.uint8)
        read_into(self.path, t.offset, raw)
        try:
            array = np.array(quants.dequantize(raw, t.type), dtype=np.float32)  # a fresh copy
        except (ValueError, NotImplementedError) as e:
            raise CheckpointError(self.path, f"tensor {name}: cannot dequantize {t.type.name} ({e})") from None
        return array.reshape(t.shape)


def _align(offset: int, alignment: int) -> int:
    return -(-offset // alignment) * alignment


@cache
def _dequantizable(qtype: GGMLQuantizationType) -> bool:
    """Whether gguf-py dequantizes this type to floats (integer types are not weights and are refused)."""
    try:
        quants.dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except (NotImplementedError, ValueError, TypeError):
        return False
    return qtype.name not in ("I8", "I16", "I32", "I64", "F64")

"""QNN graph names that sort in part order, which Genie needs.

Genie orders the splits of a model by sorting graph names (not by the order of its context binaries), and
ONNX Runtime's QNN execution provider names each graph `QNN_QNN_<hash>_1_0`, where <hash> is the low 64 bits
of MurmurHash3 (x86, 128-bit, seed 0) of the model path exactly as the session was given it. Paths that differ
only in `./` and `//` segments open the same file but hash differently, so for part k we pick a spelling whose
hash starts with a prefix that sorts k-th. The compiler checks the names it gets, so a change in how ONNX
Runtime names graphs is an error, not a silently misordered bundle.
"""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

_M32 = 0xFFFFFFFF
_SEGMENTS = ("./", "/")  # both leave a path's meaning unchanged


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _M32


def _fmix(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def murmur3_x86_128(data: bytes, seed: int = 0) -> tuple[int, int, int, int]:
    """MurmurHash3_x86_128 (Austin Appleby's public-domain algorithm) as four 32-bit words h1..h4."""
    c1, c2, c3, c4 = 0x239B961B, 0xAB0E9789, 0x38B34AE5, 0xA1E38B93
    h1 = h2 = h3 = h4 = seed
    blocks = len(data) // 16
    for i in range(blocks):
        k1, k2, k3, k4 = struct.unpack_from("<4I", data, 16 * i)
        h1 ^= (_rotl((k1 * c1) & _M32, 15) * c2) & _M32
        h1 = (((_rotl(h1, 19) + h2) & _M32) * 5 + 0x561CCD1B) & _M32
        h2 ^= (_rotl((k2 * c2) & _M32, 16) * c3) & _M32
        h2 = (((_rotl(h2, 17) + h3) & _M32) * 5 + 0x0BCAA747) & _M32
        h3 ^= (_rotl((k3 * c3) & _M32, 17) * c4) & _M32
        h3 = (((_rotl(h3, 15) + h4) & _M32) * 5 + 0x96CD1C35) & _M32
        h4 ^= (_rotl((k4 * c4) & _M32, 18) * c1) & _M32
        h4 = (((_rotl(h4, 13) + h1) & _M32) * 5 + 0x32AC3B17) & _M32
    tail = data[16 * blocks:] + bytes(16)
    k1, k2, k3, k4 = struct.unpack("<4I", tail[:16])
    n = len(data) & 15
    if n > 12:
        h4 ^= (_rotl((k4 * c4) & _M32, 18) * c1) & _M32
    if n > 8:
        h3 ^= (_rotl((k3 * c3) & _M32, 17) * c4) & _M32
    if n > 4:
        h2 ^= (_rotl((k2 * c2) & _M32, 16) * c3) & _M32
    if n > 0:
        h1 ^= (_rotl((k1 * c1) & _M32, 15) * c2) & _M32
    h1, h2, h3, h4 = (h ^ len(data) for h in (h1, h2, h3, h4))
    h1 = (h1 + h2 + h3 + h4) & _M32
    h2, h3, h4 = (h2 + h1) & _M32, (h3 + h1) & _M32, (h4 + h1) & _M32
    h1, h2, h3, h4 = _fmix(h1), _fmix(h2), _fmix(h3), _fmix(h4)
    h1 = (h1 + h2 + h3 + h4) & _M32
    return h1, (h2 + h1) & _M32, (h3 + h1) & _M32, (h4 + h1) & _M32


def path_hash(path: str) -> int:
    """The number ONNX Runtime's QNN execution provider puts in the name of a graph loaded from `path`."""
    h1, h2, _, _ = murmur3_x86_128(path.encode())
    return h1 | (h2 << 32)


def rank_prefix(rank: int, ranks: int) -> str:
    """A decimal prefix per rank, all of one length, in sorting order: "1".."9", or "10".."98" beyond 9 ranks."""
    if ranks <= 9:
        return str(rank + 1)
    if ranks <= 89:
        return str(10 + rank)
    raise ValueError(f"at most 89 parts have graph names Genie orders, got {ranks}")


def _spellings(path: Path):
    """`path` spelled with ever more `./` and `//` segments before its file name."""
    folder, name = str(path.parent), path.name
    for count in range(1, 24):
        for code in range(2**count):
            extra = "".join(_SEGMENTS[(code >> bit) & 1] for bit in range(count))
            yield f"{folder}/{extra}{name}"


def ranked_path(path: Path, rank: int, ranks: int) -> str:
    """A spelling of `path` whose graph name sorts at `rank` of `ranks` (the plain spelling if there is one)."""
    prefix = rank_prefix(rank, ranks)
    for spelling in itertools.chain([str(path)], _spellings(path)):
        if str(path_hash(spelling)).startswith(prefix):
            return spelling
    raise ValueError(f"{path}: no spelling found whose graph name sorts at {rank + 1} of {ranks}")  # not reached


def sorts_in_order(names: list[str]) -> bool:
    return sorted(names) == list(names)

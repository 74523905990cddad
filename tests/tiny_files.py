"""Tiny model files written byte by byte, for the bad-input corpus and the header fuzzer.

`gguf_spec` + `gguf_bytes` write a GGUF file the way llama.cpp lays one out (metadata, tensor infos, tensors at
aligned offsets), with every field open to change; `edit_safetensors_header` rewrites a safetensors header in
place; `restamp` updates an export's manifest after a file was changed on purpose, so that a check deeper than
the checksums is reached.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
from tokenizers import pre_tokenizers

from ondevice_llama.config import LlamaConfig
from ondevice_llama.files import sha256_file
from ondevice_llama.loading.names import NAME_TABLE, hf_to_canonical
from ondevice_llama.loading.synthetic import BYTE_SPECIALS, CHATML_TEMPLATE, tensor_shapes

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALAR = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q", I64: "q",
           F64: "d"}
CONTROL, NORMAL = 3, 1

GGUF_CONFIG = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                          num_kv_heads=2, tie_word_embeddings=False, max_position_embeddings=256)


@dataclass
class Tensor:
    name: str
    dims: list[int]  # GGML order (row length first)
    type: int
    data: bytes
    offset: int | None = None  # None: the next aligned offset


@dataclass
class GGUFSpec:
    metadata: list[tuple[str, int, Any]]  # (key, value type, value); arrays: (key, ARRAY, (item type, values))
    tensors: list[Tensor] = field(default_factory=list)
    version: int = 3
    alignment: int = 32


def _value(kind: int, value: Any) -> bytes:
    if kind == STRING:
        raw = value if isinstance(value, bytes) else value.encode()
        return struct.pack("<Q", len(raw)) + raw
    if kind == ARRAY:
        item, values = value
        return struct.pack("<IQ", item, len(values)) + b"".join(_value(item, v) for v in values)
    return struct.pack("<" + _SCALAR[kind], value)


def gguf_bytes(spec: GGUFSpec) -> bytes:
    """The file: header, metadata, tensor infos, padding, then each tensor at its (aligned) offset."""
    head = b"GGUF" + struct.pack("<IQQ", spec.version, len(spec.tensors), len(spec.metadata))
    head += b"".join(_value(STRING, key) + struct.pack("<I", kind) + _value(kind, value)
                     for key, kind, value in spec.metadata)
    offsets, end = [], 0
    for t in spec.tensors:
        start = -(-end // spec.alignment) * spec.alignment if t.offset is None else t.offset
        offsets.append(start)
        end = start + len(t.data)
    for t, offset in zip(spec.tensors, offsets, strict=True):
        head += _value(STRING, t.name) + struct.pack("<I", len(t.dims)) + struct.pack(f"<{len(t.dims)}Q", *t.dims)
        head += struct.pack("<IQ", t.type, offset)
    head += b"\0" * (-len(head) % spec.alignment)
    data = bytearray(-(-end // spec.alignment) * spec.alignment if spec.tensors else 0)
    for t, offset in zip(spec.tensors, offsets, strict=True):
        data[offset:offset + len(t.data)] = t.data
    return head + bytes(data)


def _gguf_name(ours: str) -> str:
    for _, gguf_name, canonical in NAME_TABLE:
        if "{i}" in canonical and ours.startswith("layers."):
            layer, rest = ours.split(".")[1:]
            if canonical == "layers.{i}." + rest:
                return gguf_name.format(i=layer)
        elif canonical == ours:
            return gguf_name
    raise KeyError(ours)


def _tensor_type(name: str) -> GGMLQuantizationType:
    """Like the default model: Q8_0 embedding, Q4_1 projections, F32 norms."""
    if name.endswith("norm"):
        return GGMLQuantizationType.F32
    return GGMLQuantizationType.Q8_0 if name in ("embed_tokens", "lm_head") else GGMLQuantizationType.Q4_1


def gguf_spec(config: LlamaConfig = GGUF_CONFIG, seed: int = 0) -> GGUFSpec:
    """A complete tiny Llama GGUF with a byte-level (gpt2) tokenizer and ChatML, random weights."""
    rng = np.random.default_rng(seed)
    tensors = []
    for hf_name, shape in tensor_shapes(config).items():
        name = hf_to_canonical(hf_name)
        array = (1 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else 0.05 * rng.standard_normal(shape))
        qtype = _tensor_type(name)
        data = quants.quantize(array.astype(np.float32), qtype)
        tensors.append(Tensor(_gguf_name(name), list(reversed(shape)), int(qtype), data.tobytes()))
    c = config
    tokens = list(BYTE_SPECIALS) + sorted(pre_tokenizers.ByteLevel.alphabet())
    metadata = [
        ("general.architecture", STRING, "llama"), ("general.name", STRING, "tiny"),
        ("llama.block_count", U32, c.num_layers), ("llama.context_length", U32, c.max_position_embeddings),
        ("llama.embedding_length", U32, c.hidden_size), ("llama.feed_forward_length", U32, c.intermediate_size),
        ("llama.attention.head_count", U32, c.num_heads), ("llama.attention.head_count_kv", U32, c.num_kv_heads),
        ("llama.rope.freq_base", F32, c.rope_theta), ("llama.attention.layer_norm_rms_epsilon", F32, c.rms_norm_eps),
        ("llama.vocab_size", U32, c.vocab_size), ("llama.rope.dimension_count", U32, c.head_dim),
        ("tokenizer.ggml.model", STRING, "gpt2"), ("tokenizer.ggml.pre", STRING, "default"),
        ("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)),
        ("tokenizer.ggml.token_type", ARRAY, (I32, [CONTROL] * len(BYTE_SPECIALS) + [NORMAL] * 256)),
        ("tokenizer.ggml.merges", ARRAY, (STRING, [])),
        ("tokenizer.ggml.bos_token_id", U32, 1), ("tokenizer.ggml.eos_token_id", U32, 2),
        ("tokenizer.ggml.add_bos_token", BOOL, False), ("tokenizer.chat_template", STRING, CHATML_TEMPLATE),
    ]
    return GGUFSpec(metadata, tensors)


def write_gguf(path: Path, spec: GGUFSpec | None = None) -> Path:
    path.write_bytes(gguf_bytes(spec or gguf_spec()))
    return path


def set_metadata(spec: GGUFSpec, key: str, kind: int, value: Any) -> GGUFSpec:
    """`spec` with `key` replaced (or added)."""
    rows = [row for row in spec.metadata if row[0] != key] + [(key, kind, value)]
    return GGUFSpec(rows, spec.tensors, spec.version, spec.alignment)


def metadata_offset(spec: GGUFSpec, key: str) -> int:
    """Where the value of `key` starts in `gguf_bytes(spec)` (after its key and type)."""
    pos = 24
    for k, kind, value in spec.metadata:
        pos += len(_value(STRING, k)) + 4
        if k == key:
            return pos
        pos += len(_value(kind, value))
    raise KeyError(key)


def header_size(spec: GGUFSpec) -> int:
    """Bytes before the tensor data: what a header fuzzer mutates."""
    return len(gguf_bytes(GGUFSpec(spec.metadata, [Tensor(t.name, t.dims, t.type, b"") for t in spec.tensors],
                                   spec.version, spec.alignment)))


def tensor_info_region(spec: GGUFSpec) -> tuple[int, int]:
    """(start, end) of the tensor infos in `gguf_bytes(spec)`: names, dimensions, types and offsets."""
    start = 24 + sum(len(_value(STRING, k)) + 4 + len(_value(kind, v)) for k, kind, v in spec.metadata)
    infos = sum(len(_value(STRING, t.name)) + 4 + 8 * len(t.dims) + 12 for t in spec.tensors)
    return start, start + infos


def type_size(qtype: int, dims: list[int]) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    return int(np.prod(dims)) // block * size


# ---------------------------------------------------------------- safetensors


def read_safetensors_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_safetensors_raw(path: Path, header: Any, data: bytes, raw_header: bytes | None = None) -> None:
    blob = raw_header if raw_header is not None else json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def edit_safetensors_header(path: Path, edit) -> None:
    """Rewrite the header of `path` as `edit(header)` returns it (the data bytes are kept)."""
    header, data = read_safetensors_header(path)
    write_safetensors_raw(path, edit(header), data)


# ---------------------------------------------------------------- exports


def restamp(folder: Path, *files: str) -> None:
    """Record the current size and sha256 of `files` in the export's manifest (a deliberate change)."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    for file in files:
        manifest["files"][file] = {"size": (folder / file).stat().st_size, "sha256": sha256_file(folder / file)}
    path.write_text(json.dumps(manifest))

"""Bad input gives one clean line, never a traceback nor a wrong answer with exit 0.

A table-driven corpus of generated bad inputs (HF folders: config.json, tokenizer files, generation_config.json,
index files, safetensors headers; GGUF files; export folders; text files; CLI values), each run through the CLI
in process (or as a subprocess where marked). Every case must exit 2 with stderr exactly one line
`error: <file or option>: <what>` and leave nothing that looks complete behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from ondevice_llama.cli.main import main
from ondevice_llama.config import LlamaConfig
from ondevice_llama.export import ExportOptions, export_model
from ondevice_llama.loading import open_checkpoint
from ondevice_llama.loading.synthetic import write_synthetic_checkpoint

from .tiny_files import (
    ARRAY,
    F32,
    I32,
    STRING,
    U32,
    U64,
    GGUFSpec,
    Tensor,
    edit_safetensors_header,
    gguf_bytes,
    gguf_spec,
    metadata_offset,
    read_safetensors_header,
    restamp,
    set_metadata,
    write_safetensors_raw,
)

CONFIG = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, tie_word_embeddings=False, max_position_embeddings=256)
SMALL = ["--precision", "fp32", "--sequence-length", "8", "--context-length", "32", "--quiet"]


@dataclass(frozen=True)
class Good:
    """Intact inputs every case starts from (copied, then damaged)."""

    hf: Path
    sharded: Path
    gguf: Path
    npu: Path  # exported, fp32, 2 parts
    quantized: Path  # exported w4a16 with an attention sink and all logits
    text: Path


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Good:
    root = tmp_path_factory.mktemp("good")
    hf = write_synthetic_checkpoint(CONFIG, root / "hf", seed=0)
    sharded = write_synthetic_checkpoint(CONFIG, root / "sharded", seed=0, shard_bytes=200_000)
    gguf = root / "tiny.gguf"
    gguf.write_bytes(gguf_bytes(gguf_spec()))
    checkpoint = open_checkpoint(hf)
    npu = root / "npu"
    export_model(checkpoint, npu, ExportOptions(num_parts=2, sequence_length=8, context_length=32, precision="fp32"),
                 progress=False)
    quantized = root / "quantized"
    export_model(checkpoint, quantized, ExportOptions(num_parts=1, sequence_length=8, context_length=32,
                                                      precision="w4a16", algorithm="rtn", all_logits=True),
                 progress=False)
    text = root / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    return Good(hf, sharded, gguf, npu, quantized, text)


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable  # (good, tmp, monkeypatch) -> (argv, what the error line must start with)
    subprocess: bool = False


CASES: list[Case] = []


def case(id: str, subprocess: bool = False):
    def register(make: Callable) -> Callable:
        CASES.append(Case(id, make, subprocess))
        return make
    return register


def copy(source: Path, tmp: Path, name: str | None = None) -> Path:
    target = tmp / (name or source.name)
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copyfile(source, target)
    return target


def export_argv(checkpoint: Path, tmp: Path) -> list[str]:
    return ["export", "--checkpoint", str(checkpoint), "--out", str(tmp / "out"), *SMALL]


def chat_argv(model: Path) -> list[str]:
    return ["chat", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "2"]


# ---------------------------------------------------------------- HF folder: config.json

RAW_CONFIGS = {
    "list": b"[]", "number": b"5", "string": b'"llama"', "null": b"null", "invalid-json": b'{"model_type": ',
    "empty": b"", "not-utf8": b'{"model_type": "ll\xffama"}',
}
CONFIG_EDITS: dict[str, Callable[[dict], dict]] = {
    "hidden-null": lambda c: c | {"hidden_size": None},
    "hidden-string": lambda c: c | {"hidden_size": "64"},
    "hidden-fraction": lambda c: c | {"hidden_size": 64.7},
    "hidden-negative": lambda c: c | {"hidden_size": -64},
    "hidden-bool": lambda c: c | {"hidden_size": True},
    "hidden-infinite": lambda c: c | {"hidden_size": float("inf")},
    "hidden-nan": lambda c: c | {"hidden_size": float("nan")},
    "zero-heads-no-head-dim": lambda c: {k: v for k, v in c.items() if k != "head_dim"} | {"num_attention_heads": 0},
    "kv-heads-not-dividing": lambda c: c | {"num_key_value_heads": 3},
    "kv-heads-zero": lambda c: c | {"num_key_value_heads": 0},
    "head-dim-odd": lambda c: c | {"head_dim": 15},
    "vocab-missing": lambda c: {k: v for k, v in c.items() if k != "vocab_size"},
    "intermediate-missing": lambda c: {k: v for k, v in c.items() if k != "intermediate_size"},
    "layers-zero": lambda c: c | {"num_hidden_layers": 0},
    "eps-string": lambda c: c | {"rms_norm_eps": "small"},
    "eps-negative": lambda c: c | {"rms_norm_eps": -1e-5},
    "theta-zero": lambda c: c | {"rope_theta": 0},
    "rope-scaling-string": lambda c: c | {"rope_scaling": "linear"},
    "rope-type-unknown": lambda c: c | {"rope_scaling": {"rope_type": "su", "factor": 2.0}},
    "rope-factor-missing": lambda c: c | {"rope_scaling": {"rope_type": "linear"}},
    "rope-unknown-key": lambda c: c | {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "bogus": 1}},
    "rope-parameters-list": lambda c: c | {"rope_parameters": []},
    "partial-rotary": lambda c: c | {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
    "model-type-mistral": lambda c: c | {"model_type": "mistral"},
    "architectures-string": lambda c: c | {"architectures": "LlamaForCausalLM"},
    "architectures-other": lambda c: c | {"architectures": ["MistralForCausalLM"]},
    "attention-bias": lambda c: c | {"attention_bias": True},
    "tied-string": lambda c: c | {"tie_word_embeddings": "yes"},
    "max-positions-zero": lambda c: c | {"max_position_embeddings": 0},
}


def _config_case(edit) -> Callable:
    def make(good: Good, tmp: Path, patch) -> tuple[list[str], str]:
        folder = copy(good.hf, tmp)
        path = folder / "config.json"
        path.write_bytes(edit if isinstance(edit, bytes) else json.dumps(edit(json.loads(path.read_text()))).encode())
        return export_argv(folder, tmp), str(path)
    return make


for _id, _edit in {**RAW_CONFIGS, **CONFIG_EDITS}.items():
    case(f"config-{_id}")(_config_case(_edit))


@case("config-repeated-key")
def _(good, tmp, patch):
    folder = copy(good.hf, tmp)
    path = folder / "config.json"
    path.write_text(path.read_text().replace('"vocab_size": 300', '"vocab_size": 300, "vocab_size": 301'))
    return export_argv(folder, tmp), str(path)


@case("config-shape-mismatch")
def _(good, tmp, patch):
    folder = copy(good.hf, tmp)
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"intermediate_size": 96}))
    return export_argv(folder, tmp), str(folder)


@case("config-missing")
def _(good, tmp, patch):
    folder = copy(good.hf, tmp)
    (folder / "config.json").unlink()
    return export_argv(folder, tmp), str(folder)


# ---------------------------------------------------------------- HF folder: tokenizer and generation files

SIDE_FILES = {
    "tokenizer_config-list": ("tokenizer_config.json", b"[]"),
    "tokenizer_config-invalid": ("tokenizer_config.json", b"{"),
    "tokenizer_config-not-utf8": ("tokenizer_config.json", b'{"bos_token": "\xff"}'),
    "tokenizer_config-bos-number": ("tokenizer_config.json", b'{"bos_token": 5}'),
    "tokenizer_config-bos-content-number": ("tokenizer_config.json", b'{"bos_token": {"content": 5}}'),
    "tokenizer_config-add-bos-string": ("tokenizer_config.json", b'{"add_bos_token": "yes"}'),
    "tokenizer_config-template-number": ("tokenizer_config.json", b'{"chat_template": 5}'),
    "tokenizer_config-template-list": ("tokenizer_config.json", b'{"chat_template": [1, 2]}'),
    "generation-list": ("generation_config.json", b"[]"),
    "generation-invalid": ("generation_config.json", b"{,}"),
    "generation-not-utf8": ("generation_config.json", b'{"eos_token_id": "\xfe"}'),
    "generation-eos-string": ("generation_config.json", b'{"eos_token_id": "2"}'),
    "generation-eos-list-mixed": ("generation_config.json", b'{"eos_token_id": [2, "3"]}'),
    "generation-eos-negative": ("generation_config.json", b'{"eos_token_id": -1}'),
    "generation-eos-bool": ("generation_config.json", b'{"eos_token_id": true}'),
    "tokenizer-garbage": ("tokenizer.json", b"\x00\x01garbage"),
    "tokenizer-empty": ("tokenizer.json", b""),
    "tokenizer-list": ("tokenizer.json", b"[]"),
    "tokenizer-model-number": ("tokenizer.json", b'{"version": "1.0", "model": 5}'),
    "tokenizer-key-not-string": ("tokenizer.json", b'{"version": "1.0", "model": {"type": "BPE", "vocab": [1]}}'),
    "chat-template-jinja-not-utf8": ("chat_template.jinja", b"{{ \xff }}"),
    "chat-template-json-number": ("chat_template.json", b'{"chat_template": 7}'),
}


def _side_case(name: str, raw: bytes) -> Callable:
    def make(good: Good, tmp: Path, patch) -> tuple[list[str], str]:
        folder = copy(good.hf, tmp)
        if name in ("chat_template.json", "chat_template.jinja"):  # used only without a template in the config
            config = folder / "tokenizer_config.json"
            config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items()
                                          if k != "chat_template"}))
        (folder / name).write_bytes(raw)
        return export_argv(folder, tmp), str(folder / name)
    return make


for _id, (_name, _raw) in SIDE_FILES.items():
    case(_id)(_side_case(_name, _raw))


@case("tokenizer-truncated")
def _(good, tmp, patch):
    folder = copy(good.hf, tmp)
    path = folder / "tokenizer.json"
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    return export_argv(folder, tmp), str(path)


@case("tokenizer-ids-beyond-vocabulary")
def _(good, tmp, patch):
    folder = copy(good.hf, tmp)
    path = folder / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    tokenizer["model"]["vocab"] |= {f"extra{i}": 259 + i for i in range(100)}  # ids up to 358, vocab_size 300
    path.write_text(json.dumps(tokenizer))
    return export_argv(folder, tmp), str(folder)


@case("tokenizer-model-garbage")
def _(good, tmp, patch):
    folder = copy(good.hf, tmp)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes(b"\x0a\x05not a sentencepiece model")
    return export_argv(folder, tmp), str(folder / "tokenizer.model")


@case("tokenizer-none")
def _(good, tmp, patch):
    folder = copy(good.hf, tmp)
    (folder / "tokenizer.json").unlink()
    return export_argv(folder, tmp), str(folder)


# ---------------------------------------------------------------- HF folder: index files

INDEX_EDITS: dict[str, Callable[[dict], object]] = {
    "list": lambda i: [],
    "weight-map-list": lambda i: {"weight_map": []},
    "weight-map-empty": lambda i: {"weight_map": {}},
    "weight-map-missing": lambda i: {"metadata": i["metadata"]},
    "shard-number": lambda i: {"weight_map": {k: 5 for k in i["weight_map"]}},
    "shard-outside-folder": lambda i: {"weight_map": {k: "../" + v for k, v in i["weight_map"].items()}},
    "shard-missing": lambda i: {"weight_map": i["weight_map"]
                                | {"model.norm.weight": "model-00009-of-00009.safetensors"}},
    "wrong-shard": lambda i: {"weight_map": {k: sorted(set(i["weight_map"].values()))[0]
                                             for k in i["weight_map"]}},
}


def _index_case(edit, problem: str) -> Callable:
    def make(good: Good, tmp: Path, patch) -> tuple[list[str], str]:
        folder = copy(good.sharded, tmp)
        index = folder / "model.safetensors.index.json"
        index.write_text(json.dumps(edit(json.loads(index.read_text()))))
        return export_argv(folder, tmp), str(folder / problem)
    return make


for _id, _edit in INDEX_EDITS.items():
    _problem = "model-00009-of-00009.safetensors" if _id == "shard-missing" else "model.safetensors.index.json"
    case(f"index-{_id}")(_index_case(_edit, _problem))


@case("index-invalid-json")
def _(good, tmp, patch):
    folder = copy(good.sharded, tmp)
    (folder / "model.safetensors.index.json").write_bytes(b'{"weight_map": {')
    return export_argv(folder, tmp), str(folder / "model.safetensors.index.json")


@case("index-not-utf8")
def _(good, tmp, patch):
    folder = copy(good.sharded, tmp)
    (folder / "model.safetensors.index.json").write_bytes(b'{"weight_map": {"\xff": "a.safetensors"}}')
    return export_argv(folder, tmp), str(folder / "model.safetensors.index.json")


@case("index-tensor-in-two-shards")
def _(good, tmp, patch):
    folder = copy(good.sharded, tmp)
    shards = sorted(folder.glob("model-*.safetensors"))
    first, _ = read_safetensors_header(shards[0])
    name = next(k for k in first if k != "__metadata__")

    def add_twin(header: dict) -> dict:  # the last shard also claims a tensor of the first (an extra copy)
        end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
        return header | {name: first[name] | {"data_offsets": [end, end + first[name]["data_offsets"][1]
                                                                - first[name]["data_offsets"][0]]}}
    header, data = read_safetensors_header(shards[-1])
    twin = add_twin(header)
    extra = twin[name]["data_offsets"][1] - twin[name]["data_offsets"][0]
    write_safetensors_raw(shards[-1], twin, data + b"\0" * extra)
    return export_argv(folder, tmp), str(shards[-1])


# ---------------------------------------------------------------- HF folder: safetensors headers

def _first(header: dict) -> str:
    return sorted(k for k in header if k != "__metadata__")[0]


def _entry_edit(change: Callable[[dict], dict]) -> Callable[[dict], dict]:
    def edit(header: dict) -> dict:
        name = _first(header)
        return header | {name: change(dict(header[name]))}
    return edit


def _offsets(entry: dict) -> list[int]:
    return entry["data_offsets"]


HEADER_EDITS: dict[str, Callable[[dict], object]] = {
    "list": lambda h: [],
    "number": lambda h: 7,
    "string": lambda h: "header",
    "null": lambda h: None,
    "entry-not-object": _entry_edit(lambda e: [1, 2]),
    "no-data-offsets": _entry_edit(lambda e: {k: v for k, v in e.items() if k != "data_offsets"}),
    "no-shape": _entry_edit(lambda e: {k: v for k, v in e.items() if k != "shape"}),
    "no-dtype": _entry_edit(lambda e: {k: v for k, v in e.items() if k != "dtype"}),
    "extra-key": _entry_edit(lambda e: e | {"bias": True}),
    "dtype-fp8": _entry_edit(lambda e: e | {"dtype": "F8_E4M3"}),
    "dtype-int32": _entry_edit(lambda e: e | {"dtype": "I32"}),  # same size as F32: read as numbers, if allowed
    "dtype-f16": _entry_edit(lambda e: e | {"dtype": "F16"}),
    "dtype-number": _entry_edit(lambda e: e | {"dtype": 0}),
    "offsets-negative": _entry_edit(lambda e: e | {"data_offsets": [-4, _offsets(e)[1] - 4]}),
    "offsets-reversed": _entry_edit(lambda e: e | {"data_offsets": _offsets(e)[::-1]}),
    "offsets-one": _entry_edit(lambda e: e | {"data_offsets": _offsets(e)[:1]}),
    "offsets-strings": _entry_edit(lambda e: e | {"data_offsets": [str(o) for o in _offsets(e)]}),
    "offsets-fraction": _entry_edit(lambda e: e | {"data_offsets": [0.5, _offsets(e)[1] + 0.5]}),
    "offsets-shifted": _entry_edit(lambda e: e | {"data_offsets": [o + 4 for o in _offsets(e)]}),
    "offsets-beyond-file": _entry_edit(lambda e: e | {"data_offsets": [o + 10**9 for o in _offsets(e)]}),
    "shape-negative": _entry_edit(lambda e: e | {"shape": [-e["shape"][0], *e["shape"][1:]]}),
    "shape-string": _entry_edit(lambda e: e | {"shape": "64"}),
    "shape-fraction": _entry_edit(lambda e: e | {"shape": [float(d) for d in e["shape"]]}),
    "shape-swapped-size": _entry_edit(lambda e: e | {"shape": [d * 2 for d in e["shape"]]}),
    "metadata-list": lambda h: h | {"__metadata__": []},
    "metadata-number-values": lambda h: h | {"__metadata__": {"format": 1}},
}


def _header_case(edit) -> Callable:
    def make(good: Good, tmp: Path, patch) -> tuple[list[str], str]:
        folder = copy(good.hf, tmp)
        edit_safetensors_header(folder / "model.safetensors", edit)
        return export_argv(folder, tmp), str(folder / "model.safetensors")
    return make


for _id, _edit in HEADER_EDITS.items():
    case(f"safetensors-{_id}")(_header_case(_edit))


def _raw_safetensors_case(damage: Callable[[bytes], bytes]) -> Callable:
    def make(good: Good, tmp: Path, patch) -> tuple[list[str], str]:
        folder = copy(good.hf, tmp)
        path = folder / "model.safetensors"
        path.write_bytes(damage(path.read_bytes()))
        return export_argv(folder, tmp), str(path)
    return make


RAW_SAFETENSORS = {
    "empty": lambda raw: b"",
    "short": lambda raw: raw[:5],
    "header-length-huge": lambda raw: struct.pack("<Q", 2**62) + raw[8:],
    "header-length-short": lambda raw: struct.pack("<Q", 10) + raw[8:],
    "header-not-utf8": lambda raw: raw[:8] + b"\xff" + raw[9:],
    "truncated": lambda raw: raw[:len(raw) - 100],
    "trailing-bytes": lambda raw: raw + b"\0" * 64,
    "repeated-key": lambda raw: _repeat_key(raw),
}


def _repeat_key(raw: bytes) -> bytes:
    (length,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + length].decode().rstrip()
    name = _first(json.loads(header))
    key = json.dumps(name)
    at = header.index(key)
    entry_end = header.index("}", at) + 1
    doubled = header[:entry_end] + ", " + header[at:entry_end] + header[entry_end:]
    blob = doubled.encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + raw[8 + length:]


for _id, _damage in RAW_SAFETENSORS.items():
    case(f"safetensors-{_id}")(_raw_safetensors_case(_damage))


# ---------------------------------------------------------------- GGUF files

def _gguf_case(make_bytes: Callable[[GGUFSpec], bytes]) -> Callable:
    def make(good: Good, tmp: Path, patch) -> tuple[list[str], str]:
        path = tmp / "model.gguf"
        path.write_bytes(make_bytes(gguf_spec()))
        return export_argv(path, tmp), str(path)
    return make


def _patch(spec: GGUFSpec, at: int, raw: bytes) -> bytes:
    data = bytearray(gguf_bytes(spec))
    data[at:at + len(raw)] = raw
    return bytes(data)


def _tensors(spec: GGUFSpec, change: Callable[[list[Tensor]], list[Tensor]]) -> GGUFSpec:
    return GGUFSpec(spec.metadata, change([replace(t) for t in spec.tensors]), spec.version, spec.alignment)


def _retype(name: str, qtype: int) -> Callable[[list[Tensor]], list[Tensor]]:
    return lambda ts: [replace(t, type=qtype) if t.name == name else t for t in ts]


def _token_list(spec: GGUFSpec) -> list:
    return next(v for k, _, v in spec.metadata if k == "tokenizer.ggml.tokens")[1]


GGUF_CASES: dict[str, Callable[[GGUFSpec], bytes]] = {
    "empty": lambda s: b"",
    "magic": lambda s: b"GGUX" + gguf_bytes(s)[4:],
    "version-1": lambda s: gguf_bytes(replace(s, version=1)),
    "version-99": lambda s: gguf_bytes(replace(s, version=99)),
    "big-endian": lambda s: _patch(s, 4, struct.pack(">I", 3)),
    "truncated-metadata": lambda s: gguf_bytes(s)[:300],
    "truncated-data": lambda s: gguf_bytes(s)[:-200],
    "trailing-bytes": lambda s: gguf_bytes(s) + b"\0" * 100,
    "kv-count-huge": lambda s: _patch(s, 16, struct.pack("<Q", 2**60)),
    "tensor-count-huge": lambda s: _patch(s, 8, struct.pack("<Q", 2**60)),
    "tensor-count-one-more": lambda s: _patch(s, 8, struct.pack("<Q", len(s.tensors) + 1)),
    "string-length-huge": lambda s: _patch(s, metadata_offset(s, "general.name"), struct.pack("<Q", 2**50)),
    "array-count-huge": lambda s: _patch(s, metadata_offset(s, "tokenizer.ggml.token_type") + 4,
                                         struct.pack("<Q", 2**58)),
    "value-type-unknown": lambda s: _patch(s, metadata_offset(s, "general.name") - 4, struct.pack("<I", 99)),
    "array-nested": lambda s: _patch(s, metadata_offset(s, "tokenizer.ggml.merges"), struct.pack("<I", ARRAY)),
    "type-changed-f16": lambda s: gguf_bytes(_tensors(s, _retype("output_norm.weight", 1))),
    "type-changed-int32": lambda s: gguf_bytes(_tensors(s, _retype("output_norm.weight", 26))),  # I32, F32's size
    "type-unknown": lambda s: gguf_bytes(_tensors(s, _retype("output_norm.weight", 99))),
    "type-changed-q8": lambda s: gguf_bytes(_tensors(s, _retype("blk.0.attn_q.weight", 8))),
    "misaligned-offset": lambda s: gguf_bytes(_tensors(s, lambda ts: _shift(ts, 1, 4))),
    "overlapping-offset": lambda s: gguf_bytes(_tensors(s, lambda ts: _shift(ts, 1, -32))),
    "no-dims": lambda s: gguf_bytes(_tensors(s, lambda ts: [replace(ts[0], dims=[])] + ts[1:])),
    "zero-dim": lambda s: gguf_bytes(_tensors(s, lambda ts: [replace(ts[0], dims=[0, *ts[0].dims[1:]])] + ts[1:])),
    "duplicate-tensor": lambda s: gguf_bytes(_tensors(s, lambda ts: ts + [replace(ts[-1])])),
    "arch-gpt2": lambda s: gguf_bytes(set_metadata(s, "general.architecture", STRING, "gpt2")),
    "arch-missing": lambda s: gguf_bytes(GGUFSpec([m for m in s.metadata if m[0] != "general.architecture"],
                                                  s.tensors)),
    "head-count-float": lambda s: gguf_bytes(set_metadata(s, "llama.attention.head_count", F32, 4.0)),
    "block-count-string": lambda s: gguf_bytes(set_metadata(s, "llama.block_count", STRING, "2")),
    "block-count-missing": lambda s: gguf_bytes(GGUFSpec([m for m in s.metadata if m[0] != "llama.block_count"],
                                                         s.tensors)),
    "eps-nan": lambda s: gguf_bytes(set_metadata(s, "llama.attention.layer_norm_rms_epsilon", F32, float("nan"))),
    "hidden-mismatch": lambda s: gguf_bytes(set_metadata(s, "llama.embedding_length", U32, 32)),
    "alignment-3": lambda s: gguf_bytes(set_metadata(s, "general.alignment", U32, 3)),
    "name-not-utf8": lambda s: gguf_bytes(set_metadata(s, "general.name", STRING, b"tiny\xff")),
    "token-not-utf8": lambda s: gguf_bytes(set_metadata(s, "tokenizer.ggml.tokens", ARRAY,
                                                        (STRING, [*_token_list(s)[:-1], b"\xfe\xff"]))),
    "key-not-utf8": lambda s: gguf_bytes(GGUFSpec(s.metadata + [(b"general.\xff", STRING, "x")], s.tensors)),
    "duplicate-key": lambda s: gguf_bytes(GGUFSpec(s.metadata + [s.metadata[1]], s.tensors)),
    "token-types-short": lambda s: gguf_bytes(set_metadata(s, "tokenizer.ggml.token_type", ARRAY, (I32, [1] * 10))),
    "merges-unknown-tokens": lambda s: gguf_bytes(set_metadata(s, "tokenizer.ggml.merges", ARRAY,
                                                               (STRING, ["zzz qqq"]))),
    "merges-not-pairs": lambda s: gguf_bytes(set_metadata(s, "tokenizer.ggml.merges", ARRAY, (STRING, ["abc"]))),
    "tokens-beyond-vocabulary": lambda s: gguf_bytes(set_metadata(set_metadata(
        s, "tokenizer.ggml.tokens", ARRAY, (STRING, _token_list(s) + [f"<x{i}>" for i in range(60)])),
        "tokenizer.ggml.token_type", ARRAY, (I32, [3] * 3 + [1] * 316))),
    "tokenizer-bert": lambda s: gguf_bytes(set_metadata(s, "tokenizer.ggml.model", STRING, "bert")),
    "pre-tokenizer-unknown": lambda s: gguf_bytes(set_metadata(s, "tokenizer.ggml.pre", STRING, "qwen9")),
    "rope-scaling-unknown": lambda s: gguf_bytes(set_metadata(s, "llama.rope.scaling.type", STRING, "su")),
    "missing-tensor": lambda s: gguf_bytes(_tensors(s, lambda ts: [t for t in ts if t.name != "blk.1.ffn_up.weight"])),
    "unknown-tensor": lambda s: gguf_bytes(_tensors(s, lambda ts: [replace(ts[-1], name="blk.0.attn_q.bias")]
                                                    + ts[:-1])),
    "vocab-size-u64-huge": lambda s: gguf_bytes(set_metadata(s, "llama.vocab_size", U64, 2**40)),
}


def _shift(tensors: list[Tensor], index: int, by: int) -> list[Tensor]:
    """Tensor `index` moved by `by` bytes from where a writer would put it (the others keep their places)."""
    offsets, end = [], 0
    for t in tensors:
        start = -(-end // 32) * 32
        offsets.append(start)
        end = start + len(t.data)
    return [replace(t, offset=o + (by if i == index else 0)) for i, (t, o) in enumerate(zip(tensors, offsets,
                                                                                                strict=True))]


for _id, _make in GGUF_CASES.items():
    case(f"gguf-{_id}")(_gguf_case(_make))


# ---------------------------------------------------------------- export folders

def _manifest_case(edit, problem: str = "manifest.json") -> Callable:
    def make(good: Good, tmp: Path, patch) -> tuple[list[str], str]:
        folder = copy(good.npu, tmp)
        path = folder / "manifest.json"
        path.write_bytes(edit if isinstance(edit, bytes) else json.dumps(edit(json.loads(path.read_text()))).encode())
        return chat_argv(folder), str(folder / problem)
    return make


def _part(m: dict, number: int, **changes) -> dict:
    parts = [dict(p) for p in m["parts"]]
    parts[number] |= changes
    return m | {"parts": parts}


MANIFEST_EDITS = {
    "list": b"[]", "invalid-json": b'{"format": ', "not-utf8": b'{"format": "\xff"}', "empty": b"",
    "parts-empty": lambda m: m | {"parts": []},
    "parts-not-list": lambda m: m | {"parts": 5},
    "format-version-1": lambda m: m | {"format_version": 1},
    "format-other": lambda m: m | {"format": "onnx"},
    "context-length-edited": lambda m: m | {"context_length": 64},
    "context-length-negative": lambda m: m | {"context_length": -5},
    "sequence-length-edited": lambda m: m | {"sequence_length": 4},
    "sequence-length-string": lambda m: m | {"sequence_length": "8"},
    "layers-gap": lambda m: _part(m, 1, first_layer=2),
    "layers-short": lambda m: _part(m, 1, end_layer=1),
    "part-index": lambda m: _part(m, 1, index=0),
    "graphs-missing": lambda m: _part(m, 0, graphs={}),
    "target-gpu": lambda m: m | {"target": "gpu"},
    "use-conv-string": lambda m: m | {"use_conv": "false"},
    "files-missing": lambda m: {k: v for k, v in m.items() if k != "files"},
    "size-record-wrong": lambda m: m | {"files": m["files"] | {"tokenizer.json": m["files"]["tokenizer.json"]
                                                              | {"size": 1}}},
    "checksum-record-short": lambda m: m | {"files": m["files"] | {"tokenizer.json": {"size": 1, "sha256": "ab"}}},
    "file-outside-folder": lambda m: m | {"tokenizer_file": "../tokenizer.json"},
    "config-hidden-string": lambda m: m | {"config": m["config"] | {"hidden_size": "64"}},
    "eos-ids-string": lambda m: m | {"special_tokens": m["special_tokens"] | {"eos_ids": "2"}},
}
for _id, _edit in MANIFEST_EDITS.items():
    case(f"export-manifest-{_id}")(_manifest_case(_edit, "tokenizer.json" if _id == "size-record-wrong"
                                                  else "manifest.json"))


@case("export-size-record-wrong-names-the-file")
def _(good, tmp, patch):
    folder = copy(good.npu, tmp)
    (folder / "weights_part2.bin").write_bytes((folder / "weights_part2.bin").read_bytes()[:-8])
    return chat_argv(folder), str(folder / "weights_part2.bin")


def _damage_case(file: str, damage: Callable[[bytes], bytes], model: str = "npu", argv=chat_argv) -> Callable:
    def make(good: Good, tmp: Path, patch) -> tuple[list[str], str]:
        folder = copy(getattr(good, model), tmp)
        path = folder / file
        path.write_bytes(damage(path.read_bytes()))
        return argv(folder), str(path)
    return make


def _overwrite(raw: bytes, at: int, size: int) -> bytes:
    return raw[:at] + bytes((b ^ 0x5A) for b in raw[at:at + size]) + raw[at + size:]


DAMAGES = {
    "onnx-truncated": ("prompt_processor_part1.onnx", lambda raw: raw[:len(raw) // 2]),
    "onnx-garbage-same-size": ("token_generator_part2.onnx", lambda raw: b"\x07" * len(raw)),
    "weights-truncated": ("weights_part1.bin", lambda raw: raw[:1000]),
    "weights-4k-overwritten": ("weights_part1.bin", lambda raw: _overwrite(raw, 8192, 4096)),
    "weights-one-byte": ("weights_part2.bin", lambda raw: _overwrite(raw, len(raw) // 2, 1)),
    "tokenizer-garbage-same-size": ("tokenizer.json", lambda raw: b" " * len(raw)),
    "encodings-truncated": ("encodings_part1.json", lambda raw: raw[:-10]),
}
for _id, (_file, _damage) in DAMAGES.items():
    case(f"export-{_id}")(_damage_case(_file, _damage, "quantized" if "encodings" in _file else "npu"))
case("export-sink-garbage")(_damage_case("attention_sink.npz", lambda raw: b"PK" + b"\0" * (len(raw) - 2),
                                         "quantized"))
case("bench-weights-overwritten")(_damage_case("weights_part1.bin", lambda raw: _overwrite(raw, 0, 64), "npu",
                                               lambda f: ["bench", "--model", str(f), "--repetitions", "1",
                                                          "--prompt-lengths", "8", "--quiet"]))


@case("evaluate-weights-overwritten")
def _(good, tmp, patch):
    folder = copy(good.quantized, tmp)
    path = folder / "weights_part1.bin"
    path.write_bytes(_overwrite(path.read_bytes(), 100, 100))
    return ["evaluate", "--model", str(folder), "--text", str(good.text), "--no-float", "--quiet"], str(path)


def _restamped_sink(good: Good, tmp: Path, change) -> tuple[Path, Path]:
    """A quantized export whose sink file was replaced (and the manifest updated, as if exported so)."""
    import numpy as np

    folder = copy(good.quantized, tmp)
    path = folder / "attention_sink.npz"
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    change(arrays)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    restamp(folder, "attention_sink.npz")
    return folder, path


@case("export-sink-logits-length")
def _(good, tmp, patch):
    folder, path = _restamped_sink(good, tmp, lambda a: a.update(logits=a["logits"][:-5]))
    return ["evaluate", "--model", str(folder), "--text", str(good.text), "--no-float", "--quiet"], str(path)


@case("export-sink-keys-shape")
def _(good, tmp, patch):
    folder, path = _restamped_sink(good, tmp, lambda a: a.update(keys=a["keys"][:1]))
    return chat_argv(folder), str(path)


@case("export-sink-not-npz-restamped")
def _(good, tmp, patch):
    folder = copy(good.quantized, tmp)
    (folder / "attention_sink.npz").write_bytes(b"PK\x03\x04 not a zip")
    restamp(folder, "attention_sink.npz")
    return chat_argv(folder), str(folder / "attention_sink.npz")


@case("export-graph-swapped-restamped")
def _(good, tmp, patch):
    folder = copy(good.npu, tmp)
    shutil.copyfile(folder / "token_generator_part1.onnx", folder / "prompt_processor_part1.onnx")
    restamp(folder, "prompt_processor_part1.onnx")
    return chat_argv(folder), str(folder / "prompt_processor_part1.onnx")


@case("export-onnx-damaged-after-first-use")
def _(good, tmp, patch):
    """Checked and remembered as intact, then damaged in place with its size and mtime kept: ONNX Runtime's own
    failure to load it is still one line naming it."""
    folder = copy(good.npu, tmp)
    patch.setenv("ONDEVICE_LLAMA_CACHE", str(tmp / "cache"))
    assert main(chat_argv(folder)) == 0
    path = folder / "token_generator_part1.onnx"
    stat = path.stat()
    path.write_bytes(b"\x07" * stat.st_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return chat_argv(folder), str(path)


@case("export-file-deleted")
def _(good, tmp, patch):
    folder = copy(good.npu, tmp)
    (folder / "weights_part2.bin").unlink()
    return chat_argv(folder), str(folder / "manifest.json")


@case("export-not-a-folder")
def _(good, tmp, patch):
    return chat_argv(tmp / "nowhere"), str(tmp / "nowhere")


@case("evaluate-without-all-logits")
def _(good, tmp, patch):
    """A cpu export made without --all-logits (npu prompt processors always return every position's logits)."""
    cpu = tmp / "cpu"
    export_model(open_checkpoint(good.hf), cpu, ExportOptions(target="cpu", context_length=32), progress=False)
    return ["evaluate", "--model", str(cpu), "--text", str(good.text), "--quiet"], str(cpu)


@case("export-cpu-prefill-graph-in-one-part-only")
def _(good, tmp, patch):
    """A cpu export whose parts disagree on having a prefill graph: the engine runs a prompt through every part."""
    cpu = tmp / "cpu"
    export_model(open_checkpoint(good.hf), cpu, ExportOptions(target="cpu", context_length=32, num_parts=2),
                 progress=False)
    path = cpu / "manifest.json"
    m = json.loads(path.read_text())
    path.write_text(json.dumps(_part(m, 1, graphs={"decoder": m["parts"][1]["graphs"]["decoder"]})))
    return chat_argv(cpu), str(path)


# ---------------------------------------------------------------- text files

def _text_case(raw: bytes | None, argv: Callable[[Good, Path], list[str]]) -> Callable:
    def make(good: Good, tmp: Path, patch) -> tuple[list[str], str]:
        path = tmp / "text.txt"
        if raw is not None:
            path.write_bytes(raw)
        return argv(good, path), str(path)
    return make


def _evaluate(good: Good, path: Path) -> list[str]:
    return ["evaluate", "--model", str(good.quantized), "--text", str(path), "--no-float", "--quiet"]


def _calibrate(good: Good, path: Path) -> list[str]:
    return ["export", "--checkpoint", str(good.hf), "--out", str(path.parent / "out"), "--precision", "w4a16",
            "--algorithm", "rtn", "--calibration-file", str(path), "--sequence-length", "8", "--context-length", "32",
            "--quiet"]


def _recipe(good: Good, path: Path) -> list[str]:
    return ["quantize", "--checkpoint", str(good.hf), "--out", str(path.parent / "out"), "--recipe", str(path),
            "--quiet"]


TEXT_CASES = {
    "evaluate-text-missing": (None, _evaluate),
    "evaluate-text-not-utf8": (b"caf\xe9 au lait", _evaluate),
    "evaluate-text-empty": (b"", _evaluate),
    "evaluate-text-blank": (b" \n\t\n", _evaluate),
    "evaluate-text-one-token": (b"a", _evaluate),
    "calibration-not-utf8": (b"\xff\xfe" * 100, _calibrate),
    "calibration-missing": (None, _calibrate),
    "calibration-too-short": (b"short", _calibrate),
    "recipe-not-json": (b"weight_bits = 4", _recipe),
    "recipe-not-utf8": (b'{"format": "\xff"}', _recipe),
    "recipe-list": (b"[]", _recipe),
    "recipe-other-format": (b'{"format": "other", "format_version": 1}', _recipe),
    "recipe-bad-bits": (b'{"format": "ondevice-llama-recipe", "format_version": 1, "weight_bits": 3}', _recipe),
    "recipe-bad-overrides": (b'{"format": "ondevice-llama-recipe", "format_version": 1, '
                             b'"overrides": {"layers.0.q_proj": "8"}}', _recipe),
    "recipe-unknown-key": (b'{"format": "ondevice-llama-recipe", "format_version": 1, "bits": 4}', _recipe),
    "recipe-missing": (None, _recipe),
}
for _id, (_raw, _argv) in TEXT_CASES.items():
    case(_id)(_text_case(_raw, _argv))


@case("evaluate-text-is-folder")
def _(good, tmp, patch):
    return _evaluate(good, tmp), str(tmp)


@case("synthesize-config-not-utf8")
def _(good, tmp, patch):
    path = tmp / "config.json"
    path.write_bytes(b'{"hidden_size": "\xff"}')
    return ["synthesize", "--config", str(path), "--out", str(tmp / "out"), "--quiet"], str(path)


@case("synthesize-config-list")
def _(good, tmp, patch):
    path = tmp / "config.json"
    path.write_bytes(b"[]")
    return ["synthesize", "--config", str(path), "--out", str(tmp / "out"), "--quiet"], str(path)


@case("synthesize-tokenizer-garbage")
def _(good, tmp, patch):
    path = tmp / "tokenizer.json"
    path.write_bytes(b"{garbage")
    return ["synthesize", "--config", str(good.hf / "config.json"), "--out", str(tmp / "out"), "--tokenizer",
            str(path), "--quiet"], str(path)


# ---------------------------------------------------------------- CLI values

def _option_case(argv: Callable[[Good, Path], list[str]], option: str) -> Callable:
    def make(good: Good, tmp: Path, patch) -> tuple[list[str], str]:
        return argv(good, tmp), option
    return make


def _export_with(*extra: str) -> Callable[[Good, Path], list[str]]:
    return lambda good, tmp: ["export", "--checkpoint", str(good.hf), "--out", str(tmp / "out"), "--precision",
                              "fp32", "--quiet", *extra]


def _chat_with(*extra: str) -> Callable[[Good, Path], list[str]]:
    return lambda good, tmp: ["chat", "--model", str(good.npu), "--prompt", "hi", *extra]


OPTION_CASES = {
    "num-parts-0": (_export_with("--num-parts", "0"), "--num-parts"),
    "num-parts-too-many": (_export_with("--num-parts", "3", "--sequence-length", "8", "--context-length", "32"),
                           "--num-parts"),
    "num-parts-fraction": (_export_with("--num-parts", "1.5"), "--num-parts"),
    "context-length-0": (_export_with("--context-length", "0"), "--context-length"),
    "context-length-negative": (_export_with("--context-length", "-5"), "--context-length"),
    "context-length-beyond-model": (_export_with("--context-length", "1000"), "--context-length"),
    "context-not-above-sequence": (_export_with("--context-length", "8", "--sequence-length", "8"),
                                   "--context-length"),
    "sequence-length-0": (_export_with("--sequence-length", "0"), "--sequence-length"),
    "block-size-48": (_export_with("--block-size", "48"), "--block-size"),
    "precision-w3": (_export_with("--precision", "w3", "--context-length", "32"), "--precision"),
    "target-gpu": (_export_with("--target", "gpu"), "--target"),
    "kv-bits-4": (_export_with("--kv-bits", "4"), "--kv-bits"),
    "cpu-weights-nf4": (_export_with("--target", "cpu", "--cpu-weights", "nf4"), "--cpu-weights"),
    "cpu-weights-on-npu": (_export_with("--cpu-weights", "symmetric"), "--cpu-weights"),
    "int8-down-proj-on-npu": (_export_with("--int8-down-proj"), "--int8-down-proj"),
    "prefill-accuracy-level-on-npu": (_export_with("--prefill-accuracy-level", "0"), "--prefill-accuracy-level"),
    "temperature-nan": (_chat_with("--temperature", "nan"), "--temperature"),
    "temperature-inf": (_chat_with("--temperature", "inf"), "--temperature"),
    "temperature-negative": (_chat_with("--temperature", "-1"), "--temperature"),
    "temperature-word": (_chat_with("--temperature", "warm"), "--temperature"),
    "top-p-0": (_chat_with("--top-p", "0"), "--top-p"),
    "top-p-above-1": (_chat_with("--top-p", "1.5"), "--top-p"),
    "top-p-nan": (_chat_with("--top-p", "nan"), "--top-p"),
    "top-k-negative": (_chat_with("--top-k", "-1"), "--top-k"),
    "seed-negative": (_chat_with("--seed", "-1"), "--seed"),
    "max-new-tokens-negative": (_chat_with("--max-new-tokens", "-5"), "--max-new-tokens"),
    "max-new-tokens-0": (_chat_with("--max-new-tokens", "0"), "--max-new-tokens"),
    "threads-negative": (_chat_with("--threads", "-1"), "--threads"),
    "threads-0": (_chat_with("--threads", "0"), "--threads"),
    "prompt-beyond-context": (_chat_with("--prompt", "word " * 100), "--prompt"),
    "chat-model-and-checkpoint": (lambda good, tmp: ["chat", "--model", str(good.npu), "--checkpoint",
                                                     str(good.hf)], "--checkpoint"),
    "bench-threads-negative": (lambda good, tmp: ["bench", "--model", str(good.npu), "--threads", "-1"], "--threads"),
    "bench-repetitions-0": (lambda good, tmp: ["bench", "--model", str(good.npu), "--repetitions", "0"],
                            "--repetitions"),
    "bench-prompt-lengths-word": (lambda good, tmp: ["bench", "--model", str(good.npu), "--prompt-lengths", "a,b"],
                                  "--prompt-lengths"),
    "evaluate-max-tokens-1": (lambda good, tmp: ["evaluate", "--model", str(good.quantized), "--text",
                                                 str(good.text), "--max-tokens", "1"], "--max-tokens"),
    "evaluate-context-length-1": (lambda good, tmp: ["evaluate", "--model", str(good.quantized), "--text",
                                                     str(good.text), "--context-length", "1"], "--context-length"),
    "synthesize-layers-beyond-config": (lambda good, tmp: ["synthesize", "--config", str(good.hf / "config.json"),
                                                           "--out", str(tmp / "out"), "--layers", "99"], "--layers"),
    "synthesize-layers-0": (lambda good, tmp: ["synthesize", "--config", str(good.hf / "config.json"), "--out",
                                               str(tmp / "out"), "--layers", "0"], "--layers"),
    "synthesize-seed-negative": (lambda good, tmp: ["synthesize", "--config", str(good.hf / "config.json"),
                                                    "--out", str(tmp / "out"), "--seed", "-1"], "--seed"),
    "analyze-budget-nan": (lambda good, tmp: ["analyze", "--checkpoint", str(good.hf), "--out",
                                              str(tmp / "r.json"), "--budget", "nan"], "--budget"),
    "missing-required-out": (lambda good, tmp: ["export", "--checkpoint", str(good.hf)], "the following arguments"),
}
for _id, (_argv, _option) in OPTION_CASES.items():
    case(f"option-{_id}")(_option_case(_argv, _option))


@case("export-out-is-a-file")
def _(good, tmp, patch):
    (tmp / "out").write_text("mine")
    return export_argv(good.hf, tmp), str(tmp / "out")


@case("export-disk-full")
def _(good, tmp, patch):
    """A full disk (ENOSPC names no file) is reported naming the folder being written."""
    from ondevice_llama.export import exporter

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    patch.setattr(exporter.onnx, "save_model", full)
    return export_argv(good.hf, tmp), str((tmp / "out").parent.resolve() / "out")


def _chat_checkpoint_with(file: str, content: str) -> Callable:
    """chat --checkpoint on a copy of the good HF folder whose `file` holds `content`."""
    def make(good: Good, tmp: Path, patch) -> tuple[list[str], str]:
        folder = copy(good.hf, tmp)
        (folder / file).write_text(content)
        patch.setenv("ONDEVICE_LLAMA_CACHE", str(tmp / "cache"))
        return ["chat", "--checkpoint", str(folder), "--prompt", "hi", "--context-length", "32"], str(folder / file)
    return make


case("chat-checkpoint-bad-config")(_chat_checkpoint_with("config.json", "[]"))
case("chat-checkpoint-bad-tokenizer")(_chat_checkpoint_with(
    "tokenizer.json", '{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": "b"}}}'))


def _quantized_dir_case(content: bytes | None) -> Callable:
    def make(good: Good, tmp: Path, patch) -> tuple[list[str], str]:
        folder = tmp / "q"
        folder.mkdir()
        if content is not None:
            (folder / "quantization.json").write_bytes(content)
        argv = ["export", "--checkpoint", str(good.hf), "--out", str(tmp / "out"), "--precision", "w4a16",
                "--quantized", str(folder), "--sequence-length", "8", "--context-length", "32", "--quiet"]
        return argv, str(folder / "quantization.json")
    return make


QUANTIZED_DIRS = {
    "empty": None, "list": b"[]", "not-utf8": b'{"format": "\xff"}',
    "malformed": b'{"format": "ondevice-llama-quantized", "format_version": 4, "config": {"hidden_size": "64"}}',
}
for _id, _content in QUANTIZED_DIRS.items():
    case(f"quantized-dir-{_id}")(_quantized_dir_case(_content))


@case("quantized-dir-weights-outside")
def _(good, tmp, patch):
    """A real quantized checkpoint whose index points a weight outside its folder."""
    source = Path(json.loads((good.quantized / "manifest.json").read_text())["extra"]["quantization"]
                  ["quantized_checkpoint"])
    folder = copy(source, tmp, "q")
    meta = json.loads((folder / "quantization.json").read_text())
    first = next(iter(meta["weights"]))
    meta["weights"][first]["file"] = "../" + meta["weights"][first]["file"]
    (folder / "quantization.json").write_text(json.dumps(meta))
    argv = ["export", "--checkpoint", str(good.hf), "--out", str(tmp / "out"), "--precision", "w4a16",
            "--quantized", str(folder), "--sequence-length", "8", "--context-length", "32", "--quiet"]
    return argv, str(folder / "quantization.json")


@case("process-config-list", subprocess=True)
def _(good, tmp, patch):
    return _config_case(b"[]")(good, tmp, patch)


@case("process-onnx-garbage", subprocess=True)
def _(good, tmp, patch):
    return _damage_case("token_generator_part1.onnx", lambda raw: b"\x07" * len(raw))(good, tmp, patch)


@case("process-temperature-nan", subprocess=True)
def _(good, tmp, patch):
    return _chat_with("--temperature", "nan")(good, tmp), "--temperature"


@case("process-gguf-type-changed", subprocess=True)
def _(good, tmp, patch):
    return _gguf_case(GGUF_CASES["type-changed-int32"])(good, tmp, patch)


# ---------------------------------------------------------------- the test


def run_cli(argv: list[str], in_process: bool, capfd, env_cache: Path) -> tuple[int, str, str]:
    if in_process:
        code = main(argv)
        out, err = capfd.readouterr()
        return code, out, err
    env = os.environ | {"ONDEVICE_LLAMA_CACHE": str(env_cache)}
    done = subprocess.run([sys.executable, "-m", "ondevice_llama.cli.main", *argv], capture_output=True, text=True,
                          env=env, timeout=300)
    return done.returncode, done.stdout, done.stderr


def assert_nothing_complete(argv: list[str], tmp: Path) -> None:
    """No folder that looks finished where the command wrote, and no staging folder left beside it."""
    if "--out" in argv:
        out = Path(argv[argv.index("--out") + 1])
        if out.is_dir():
            assert not {"manifest.json", "quantization.json", "synthetic.json"} & {p.name for p in out.iterdir()}
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    exports = tmp / "cache" / "exports"
    if exports.is_dir():
        for folder in exports.iterdir():
            assert not folder.name.startswith(".") and not (folder / "manifest.json").exists(), folder


def test_the_corpus_is_large_and_its_names_unique():
    assert len(CASES) >= 100
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line(case, good, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("ONDEVICE_LLAMA_CACHE", str(tmp_path / "cache"))
    argv, name = case.make(good, tmp_path, monkeypatch)
    capfd.readouterr()
    code, out, err = run_cli(argv, not case.subprocess, capfd, tmp_path / "cache")
    lines = err.splitlines()
    assert "Traceback" not in err, err
    assert code == 2, (code, out, err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {name}"), lines[0]
    assert_nothing_complete(argv, tmp_path)

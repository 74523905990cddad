"""Loading: exact tensor values from every format, lazy reads, and one-line errors naming the file."""

from __future__ import annotations

import json
import shutil
import struct
from collections import Counter
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest

from ondevice_llama.config import LlamaConfig
from ondevice_llama.export import plan_parts
from ondevice_llama.export.graph import Graph, WeightFile
from ondevice_llama.export.llama_graph import GraphOptions, build_part_graph
from ondevice_llama.loading import CheckpointError, default_checkpoint_path, open_checkpoint
from ondevice_llama.loading.names import LAYER_TENSORS
from ondevice_llama.loading.safetensors_reader import SafetensorsFile
from ondevice_llama.loading.synthetic import write_synthetic_checkpoint

TINY = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=4, num_heads=4,
                   num_kv_heads=2, tie_word_embeddings=True)


def write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """A safetensors file written by hand: name -> (dtype code, array whose raw bytes are stored)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (code, array) in tensors.items():
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())


def read_all(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of a float32 safetensors file, ready for `write_safetensors`."""
    file = SafetensorsFile(path)
    return {name: ("F32", file.read(name)) for name in file.names()}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_synthetic_checkpoint(TINY, tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


def fresh_copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


# ---------------------------------------------------------------- safetensors


def test_safetensors_float_dtypes_read_back_exactly(tmp_path):
    rng = np.random.default_rng(1)
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    f16 = rng.standard_normal((7,)).astype(np.float16)
    wide = rng.standard_normal((4, 6)).astype(np.float32)
    bf16_bits = (wide.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 is float32's top half
    truncated = (bf16_bits.astype(np.uint32) << 16).view(np.float32)
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"a": ("F32", f32), "b": ("F16", f16), "c": ("BF16", bf16_bits)})

    file = SafetensorsFile(path)
    assert file.names() == ["a", "b", "c"]  # __metadata__ is not a tensor
    assert file.shape("c") == (4, 6)
    for name, want in (("a", f32), ("b", f16.astype(np.float32)), ("c", truncated)):
        got = file.read(name)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(truncated, wide)  # the check above really exercised bf16 decoding


def test_safetensors_bf16_matches_torch(tmp_path):
    """bfloat16 written by torch (round-to-nearest, not truncation) decodes to torch's own float values."""
    torch = pytest.importorskip("torch")
    values = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    write_safetensors(tmp_path / "x.safetensors", {"w": ("BF16", values.view(torch.int16).numpy().view(np.uint16))})
    got = SafetensorsFile(tmp_path / "x.safetensors").read("w")
    np.testing.assert_array_equal(got, values.float().numpy())


def test_sharded_checkpoint_equals_unsharded(tmp_path):
    whole = write_synthetic_checkpoint(TINY, tmp_path / "whole", seed=3)
    sharded = write_synthetic_checkpoint(TINY, tmp_path / "sharded", seed=3, shard_bytes=40_000)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) >= 3 and (sharded / "model.safetensors.index.json").exists()
    assert not (sharded / "model.safetensors").exists()

    a, b = open_checkpoint(whole), open_checkpoint(sharded)
    assert a.config == b.config == TINY
    assert sorted(a.tensors.names()) == sorted(b.tensors.names())
    for name in a.tensors.names():
        np.testing.assert_array_equal(a.tensors.get(name), b.tensors.get(name), err_msg=name)


def test_float16_checkpoint_loads_as_float32(tmp_path):
    a = open_checkpoint(write_synthetic_checkpoint(TINY, tmp_path / "f32", seed=5))
    b = open_checkpoint(write_synthetic_checkpoint(TINY, tmp_path / "f16", seed=5, dtype=np.float16))
    got = b.tensors.get("layers.1.o_proj")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, a.tensors.get("layers.1.o_proj").astype(np.float16).astype(np.float32))


# ---------------------------------------------------------------- laziness


class RecordingSource:
    """A tensor source that records every `get`."""

    def __init__(self, inner):
        self.inner = inner
        self.reads: list[str] = []

    def names(self):
        return self.inner.names()

    def shape(self, name):
        return self.inner.shape(name)

    def get(self, name):
        self.reads.append(name)
        return self.inner.get(name)


@pytest.mark.parametrize("tied", [True, False])
def test_building_one_part_reads_only_its_tensors_once(tmp_path, tied):
    """Part 2 of 2 must not touch layers 0-1 (so a 7B part fits in memory), nor re-read a weight per head."""
    config = replace(TINY, tie_word_embeddings=tied)
    checkpoint = open_checkpoint(write_synthetic_checkpoint(config, tmp_path / "ckpt"))
    source = RecordingSource(checkpoint.tensors)
    weights = WeightFile(tmp_path / "w.bin")
    try:
        graph = Graph("part2", weights)
        build_part_graph(graph, config, source, plan_parts(4, 2)[1], GraphOptions(8, 32))
    finally:
        weights.close()

    head = "embed_tokens" if tied else "lm_head"
    expected = {f"layers.{i}.{t}" for i in (2, 3) for t in LAYER_TENSORS} | {"norm", head}
    assert set(source.reads) == expected
    repeated = {name: n for name, n in Counter(source.reads).items() if n > 1}
    assert not repeated, f"read more than once: {repeated}"
    assert graph.nodes and (tmp_path / "w.bin").stat().st_size > 0


# ---------------------------------------------------------------- the default GGUF


@pytest.fixture(scope="module")
def default_checkpoint():
    try:
        path = default_checkpoint_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return open_checkpoint(path)


@pytest.fixture(scope="module")
def default_reader(default_checkpoint) -> dict:
    """The default GGUF's tensors as gguf's own reader sees them (our reference), by GGUF name."""
    return {t.name: t for t in gguf.GGUFReader(default_checkpoint.path).tensors}


def test_default_gguf_config_is_smollm2_135m(default_checkpoint):
    c = default_checkpoint.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.intermediate_size, c.vocab_size) == (
        30, 576, 9, 3, 1536, 49152)
    assert c.head_dim == 64
    assert c.tie_word_embeddings
    assert c.rope_theta == 100000.0
    assert c.rope_scaling.rope_type == "default"
    assert "lm_head" not in default_checkpoint.tensors.names()


def reference_unpermute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' `LlamaTensorProcessor._reverse_permute_weights` (inverse of llama.cpp's `permute`)."""
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


@pytest.mark.parametrize(("ours", "theirs", "heads"), [("layers.0.q_proj", "blk.0.attn_q.weight", 9),
                                                       ("layers.7.k_proj", "blk.7.attn_k.weight", 3)])
def test_default_gguf_q_k_match_transformers_dequantization(default_checkpoint, default_reader, ours, theirs,
                                                            heads):
    """Q/K come back dequantized and in Hugging Face's rotate-half row order (k_proj with the KV head count)."""
    tensor = default_reader[theirs]
    assert tensor.tensor_type != gguf.GGMLQuantizationType.F32  # it really is quantized
    raw = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    want = reference_unpermute(raw, heads)

    got = default_checkpoint.tensors.get(ours)
    assert got.dtype == np.float32 and got.shape == raw.shape == (heads * 64, 576)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, raw)  # the un-permutation was applied

    try:
        from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    except ImportError:
        return
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    np.testing.assert_array_equal(got, processor.process(raw, theirs).weights)


def test_default_gguf_plain_tensors_are_not_permuted(default_checkpoint, default_reader):
    tensor = default_reader["blk.3.ffn_down.weight"]
    raw = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    np.testing.assert_array_equal(default_checkpoint.tensors.get("layers.3.down_proj"), raw)
    assert raw.shape == (576, 1536)


# ---------------------------------------------------------------- errors


def assert_checkpoint_error(path: Path | str, offending: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{offending}: "), message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_path(tmp_path):
    assert_checkpoint_error(tmp_path / "nope", tmp_path / "nope", "no such file")


def test_not_a_llama_config(tiny_checkpoint, tmp_path):
    folder = fresh_copy(tiny_checkpoint, tmp_path)
    hf = json.loads((folder / "config.json").read_text())
    hf |= {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(hf))
    assert_checkpoint_error(folder, folder / "config.json", "mistral")


def test_config_not_json(tiny_checkpoint, tmp_path):
    folder = fresh_copy(tiny_checkpoint, tmp_path)
    (folder / "config.json").write_text('{"model_type": "llama",\n  oops')
    assert_checkpoint_error(folder, folder / "config.json", "JSON")


def test_truncated_safetensors(tiny_checkpoint, tmp_path):
    folder = fresh_copy(tiny_checkpoint, tmp_path)
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    assert_checkpoint_error(folder, file, "truncated")


def test_index_names_missing_shard(tmp_path):
    folder = write_synthetic_checkpoint(TINY, tmp_path / "sharded", shard_bytes=40_000)
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.unlink()
    assert_checkpoint_error(folder, shard, "missing shard")


def test_missing_tensor(tiny_checkpoint, tmp_path):
    folder = fresh_copy(tiny_checkpoint, tmp_path)
    tensors = read_all(folder / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    write_safetensors(folder / "model.safetensors", tensors)
    assert_checkpoint_error(folder, folder, "layers.2.up_proj")


def test_tensor_with_wrong_shape(tiny_checkpoint, tmp_path):
    folder = fresh_copy(tiny_checkpoint, tmp_path)
    tensors = read_all(folder / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = ("F32", np.zeros((48, 64), np.float32))
    write_safetensors(folder / "model.safetensors", tensors)
    assert_checkpoint_error(folder, folder, "layers.1.k_proj", "(48, 64)", "(32, 64)")


def test_unknown_tensor_name(tiny_checkpoint, tmp_path):
    """A stray weight means a variant we would silently mis-export (e.g. biases), so it is refused."""
    folder = fresh_copy(tiny_checkpoint, tmp_path)
    tensors = read_all(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = ("F32", np.zeros(64, np.float32))
    write_safetensors(folder / "model.safetensors", tensors)
    assert_checkpoint_error(folder, folder / "model.safetensors", "q_proj.bias")


def test_unsupported_dtype_is_refused_at_open(tiny_checkpoint, tmp_path):
    folder = fresh_copy(tiny_checkpoint, tmp_path)
    tensors = read_all(folder / "model.safetensors")
    tensors["model.layers.3.mlp.down_proj.weight"] = ("F8_E4M3", np.zeros((64, 96), np.uint8))
    write_safetensors(folder / "model.safetensors", tensors)
    assert_checkpoint_error(folder, folder / "model.safetensors", "F8_E4M3")


@pytest.mark.parametrize("cut", ["1MB", "half"])
def test_truncated_gguf(tmp_path, cut):
    """Cut inside the metadata (1 MB) or inside the tensor data (half): both are caught at open time."""
    try:
        source = default_checkpoint_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    size = 1 << 20 if cut == "1MB" else source.stat().st_size // 2
    path = tmp_path / "cut.gguf"
    with open(source, "rb") as f:
        path.write_bytes(f.read(size))
    assert_checkpoint_error(path, path, "GGUF")


def test_gguf_of_another_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_checkpoint_error(path, path, "gpt2")


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0" * 16)
    assert_checkpoint_error(path, path)

"""Synthetic checkpoints: real layouts and configs, loadable, honest about bad input; written in bounded memory."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ondevice_llama.cli.main import main
from ondevice_llama.config import LlamaConfig, RopeScaling
from ondevice_llama.loading import open_checkpoint, synthetic
from ondevice_llama.loading.names import num_parameters
from ondevice_llama.loading.synthetic import (
    GB,
    LLAMA2_CHAT_TEMPLATE,
    PRESET_FILES,
    PRESETS,
    PresetFiles,
    checkpoint_bytes,
    plan_shards,
    synthesize,
    tensor_shapes,
    write_synthetic_checkpoint,
)

LLAMA2_MODEL = Path(__file__).resolve().parents[2] / "shared/data/llama2-tokenizer/tokenizer.model"

# Llama-3.2-like at toy widths: GQA, tied embeddings, llama3 rope scaling, bfloat16, small shards.
TINY_PRESET = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                          num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=500000.0,
                          rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192), max_position_embeddings=131072,
                          tie_word_embeddings=True)
TINY_FILES = PresetFiles("bfloat16", 100_000, 1, 2)


@pytest.fixture
def tiny_preset(monkeypatch):
    monkeypatch.setitem(PRESETS, "tiny-test", TINY_PRESET)
    monkeypatch.setitem(PRESET_FILES, "tiny-test", TINY_FILES)
    return "tiny-test"


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def test_presets_are_the_real_models():
    llama2 = PRESETS["llama-2-7b-chat"]
    assert num_parameters(llama2) == 6_738_415_616  # Llama-2-7B
    shapes = tensor_shapes(llama2)
    shards = plan_shards(shapes, 2, PRESET_FILES["llama-2-7b-chat"].shard_bytes)
    sizes = [sum(int(np.prod(shapes[n])) * 2 for n in names) for names in shards]
    assert sizes == [9_976_545_280, 3_500_285_952]  # the real shards' tensor bytes (files: 9.98 GB + 3.50 GB)
    assert "model.layers.23.mlp.down_proj.weight" in shards[0]
    assert "model.layers.24.self_attn.q_proj.weight" in shards[1]
    assert checkpoint_bytes(llama2, "float16") == sum(sizes)
    assert num_parameters(PRESETS["llama-3.2-1b"]) == 1_235_814_400
    assert num_parameters(PRESETS["llama-3.2-3b"]) == 3_212_749_824
    assert num_parameters(PRESETS["tinyllama-1.1b"]) == 1_100_048_384
    three = PRESETS["llama-3.2-3b"]
    assert len(plan_shards(tensor_shapes(three), 2, PRESET_FILES["llama-3.2-3b"].shard_bytes)) == 2  # like the real one
    for name, config in PRESETS.items():
        assert LlamaConfig.from_hf(config.to_hf()) == config, name


def test_preset_with_fewer_layers_writes_a_loadable_sharded_checkpoint(tiny_preset, tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["synthesize", "--config", tiny_preset, "--out", str(out), "--layers", "2", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("synthesized tiny-test: 2 layers")
    expected = replace(TINY_PRESET, num_layers=2)

    hf = json.loads((out / "config.json").read_text())
    assert LlamaConfig.from_hf(hf) == expected and hf["torch_dtype"] == "bfloat16"
    checkpoint = open_checkpoint(out)
    assert checkpoint.config == expected

    shapes = tensor_shapes(expected)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    count = len(files)
    assert count >= 3 and files == [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
    assert set(index["weight_map"]) == set(shapes) and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(int(np.prod(s)) for s in shapes.values()) * 2
    for file in files:
        header = safetensors_header(out / file)
        assert header.pop("__metadata__") == {"format": "pt"}
        assert {n for n, f in index["weight_map"].items() if f == file} == set(header)
        for name, entry in header.items():
            assert entry["dtype"] == "BF16" and tuple(entry["shape"]) == shapes[name]
        data = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
        assert data <= TINY_FILES.shard_bytes or len(header) == 1

    embed = checkpoint.tensors.get("embed_tokens")
    assert embed.dtype == np.float32 and embed.shape == (512, 64)
    assert np.all((embed.view(np.uint32) & 0xFFFF) == 0)  # really bfloat16 values
    assert abs(embed.std() - 0.02) < 0.002 and abs(checkpoint.tensors.get("norm").mean() - 1) < 0.05
    assert abs(checkpoint.tensors.get("layers.1.down_proj").std() - 128**-0.5) < 0.01


def test_full_preset_config_round_trips_exactly(tiny_preset, tmp_path):
    result = synthesize(tiny_preset, tmp_path / "m", dtype="float16")
    assert result.config == TINY_PRESET and result.dtype == "float16"
    hf = json.loads((tmp_path / "m/config.json").read_text())
    assert LlamaConfig.from_hf(hf) == TINY_PRESET and hf["torch_dtype"] == "float16"
    assert {e["dtype"] for f in result.shard_files for n, e in safetensors_header(tmp_path / "m" / f).items()
            if n != "__metadata__"} == {"F16"}


def test_values_do_not_depend_on_depth_dtype_or_sharding(tmp_path):
    a = open_checkpoint(write_synthetic_checkpoint(TINY_PRESET, tmp_path / "a", seed=7))
    b = open_checkpoint(write_synthetic_checkpoint(replace(TINY_PRESET, num_layers=2), tmp_path / "b", seed=7,
                                                   dtype="bfloat16", shard_bytes=50_000))
    c = open_checkpoint(write_synthetic_checkpoint(TINY_PRESET, tmp_path / "c", seed=8))
    for name in ("embed_tokens", "layers.1.q_proj", "layers.0.input_norm"):
        x = a.tensors.get(name)
        np.testing.assert_allclose(b.tensors.get(name), x, rtol=2**-8, atol=0)  # bfloat16 rounding of the same
        assert not np.array_equal(c.tensors.get(name), x)


def test_reference_model_output_is_sane(tmp_path):
    torch = pytest.importorskip("torch")
    from ondevice_llama.model.reference import load_reference

    config = replace(TINY_PRESET, hidden_size=256, num_heads=8, num_kv_heads=2, head_dim=32, intermediate_size=688)
    model = load_reference(open_checkpoint(write_synthetic_checkpoint(config, tmp_path / "m")))
    with torch.no_grad():
        logits = model(torch.arange(16)[None])
    assert torch.isfinite(logits).all() and 0.1 < logits.std() < 10


def test_sentencepiece_tokenizer_gets_llama2_ids_and_template(tmp_path, monkeypatch):
    if not LLAMA2_MODEL.is_file():
        pytest.skip(f"shared Llama-2 tokenizer.model not found at {LLAMA2_MODEL}")
    from ondevice_llama.chat_format import format_chat

    config = replace(PRESETS["llama-2-7b-chat"], hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                     num_kv_heads=2, head_dim=16)
    monkeypatch.setitem(PRESETS, "small-llama2", config)
    monkeypatch.setitem(PRESET_FILES, "small-llama2", PRESET_FILES["llama-2-7b-chat"])
    synthesize("small-llama2", tmp_path / "m", tokenizer=LLAMA2_MODEL)
    assert (tmp_path / "m/tokenizer.model").read_bytes() == LLAMA2_MODEL.read_bytes()
    generation = json.loads((tmp_path / "m/generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2}
    checkpoint = open_checkpoint(tmp_path / "m")
    special = checkpoint.special_tokens
    assert (special.bos_id, special.eos_ids, special.add_bos) == (1, (2,), True)
    assert checkpoint.chat_template == LLAMA2_CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2+2?"}]
    with_template = format_chat(checkpoint.tokenizer, messages, special, checkpoint.chat_template)
    assert with_template == format_chat(checkpoint.tokenizer, messages, special, None)  # Meta's own format


def test_byte_tokenizer_without_tokenizer_option(tiny_preset, tmp_path):
    synthesize(tiny_preset, tmp_path / "m", layers=1)
    checkpoint = open_checkpoint(tmp_path / "m")
    assert checkpoint.tokenizer.decode(checkpoint.tokenizer.encode("héllo").ids) == "héllo"
    assert checkpoint.special_tokens.eos_ids == (2,) and checkpoint.chat_template.startswith("{% for message")


def test_tokenizer_too_large_for_the_vocabulary_is_refused_cleanly(tmp_path):
    if not LLAMA2_MODEL.is_file():
        pytest.skip(f"shared Llama-2 tokenizer.model not found at {LLAMA2_MODEL}")
    with pytest.raises(ValueError, match="32000 tokens do not fit the model's vocab_size 512"):
        synthesize(TINY_PRESET, tmp_path / "m", tokenizer=LLAMA2_MODEL)
    assert list(tmp_path.iterdir()) == []  # no staging folder left behind


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1
    return captured.err


def test_bad_input_gives_one_line_errors(tiny_preset, tmp_path, capsys):
    out = str(tmp_path / "m")
    assert "unknown --config preset 'llama-9'" in one_line_error(capsys, ["synthesize", "--config", "llama-9",
                                                                          "--out", out])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/notes.txt").write_text("mine")
    err = one_line_error(capsys, ["synthesize", "--config", tiny_preset, "--out", str(tmp_path / "busy")])
    assert "busy: exists, is not empty and is not a synthetic checkpoint" in err
    (tmp_path / "bad.model").write_bytes(b"not a model")
    err = one_line_error(capsys, ["synthesize", "--config", tiny_preset, "--out", out,
                                  "--tokenizer", str(tmp_path / "bad.model")])
    assert "bad.model: not a readable SentencePiece tokenizer.model (--tokenizer)" in err
    assert "no such file (--tokenizer)" in one_line_error(
        capsys, ["synthesize", "--config", tiny_preset, "--out", out, "--tokenizer", str(tmp_path / "none.json")])
    assert "--layers: must be at least 1" in one_line_error(
        capsys, ["synthesize", "--config", tiny_preset, "--out", out, "--layers", "0"])
    assert not (tmp_path / "m").exists() and (tmp_path / "busy/notes.txt").exists()


def test_an_earlier_synthetic_checkpoint_is_replaced(tiny_preset, tmp_path):
    synthesize(tiny_preset, tmp_path / "m", layers=2, seed=1)
    synthesize(tiny_preset, tmp_path / "m", layers=1, seed=2)
    assert open_checkpoint(tmp_path / "m").config.num_layers == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_disk_space_is_checked_first(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic.shutil, "disk_usage", lambda _: type("U", (), {"free": 10**6})())
    with pytest.raises(ValueError, match=r"needs 13\.48 GB.*0\.00 GB free"):
        synthesize("llama-2-7b-chat", tmp_path / "big")
    assert list(tmp_path.iterdir()) == []


def test_writing_stays_in_bounded_memory(tmp_path, monkeypatch):
    """Generation works in chunks: a checkpoint several times the chunk size costs about one chunk."""
    from ondevice_llama.memory import PeakRssSampler

    monkeypatch.setattr(synthetic, "CHUNK_ELEMENTS", 1 << 20)
    config = replace(TINY_PRESET, vocab_size=16000, hidden_size=1024, tie_word_embeddings=False, num_layers=1)
    assert checkpoint_bytes(config) > 120 * 2**20
    synthesize(TINY_PRESET, tmp_path / "warm", layers=1)  # imports
    with PeakRssSampler(interval=0.01) as sampler:
        synthesize(config, tmp_path / "m", dtype="float32", shard_bytes=GB)
    assert sampler.growth_bytes < 32 * 2**20, sampler.growth_bytes

"""Layer-by-layer quantization: GPTQ against round-to-nearest, recipes and the reusable quantized checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ondevice_llama.loading import open_checkpoint
from ondevice_llama.model import build_reference, load_reference
from ondevice_llama.model.reference import GLOBAL_TAPS, LAYER_TAPS
from ondevice_llama.quantization import dequantize, quantize_weight
from ondevice_llama.quantization.calibration import builtin_sequences, pack_sequences
from ondevice_llama.quantization.gptq import gptq_quantize
from ondevice_llama.quantization.observers import FakeQuantTap, sqnr_db
from ondevice_llama.quantization.quantize_model import quantize_model
from ondevice_llama.quantization.quantized_checkpoint import QuantizedModel, QuantizedSource
from ondevice_llama.quantization.recipe import Recipe
from ondevice_llama.quantization.rotation import checkpoint_for


@pytest.mark.parametrize("block_size", [None, 32])
def test_gptq_beats_round_to_nearest_on_layer_output(block_size):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    x = (rng.standard_normal((2048, 256)) @ rng.standard_normal((256, 256)) * 0.1).astype(np.float32)
    gptq = gptq_quantize(w, torch.from_numpy(x.T @ x).double(), 4, block_size)
    rtn = quantize_weight(w, 4, block_size)
    assert gptq.codes.min() >= -8 and gptq.codes.max() <= 7
    error = {name: np.linalg.norm(x @ dequantize(q.codes, q.scales, None, q.group_size).T - x @ w.T)
             for name, q in (("gptq", gptq), ("rtn", rtn))}
    assert error["gptq"] < 0.85 * error["rtn"]


def test_recipe_round_trip_and_errors(tmp_path):
    recipe = Recipe.from_precision("w4a16", block_size=64, overrides={"layers.0.down_proj": 8})
    assert recipe.bits_for("layers.0.down_proj") == 8 and recipe.bits_for("layers.1.q_proj") == 4
    assert recipe.bits_for("lm_head") == 8 and recipe.activation_bits_for("layers.0.k_rope") == 16
    recipe.save(tmp_path / "r.json")
    assert Recipe.load(tmp_path / "r.json") == recipe
    (tmp_path / "bad.json").write_text('{"format": "x"}')
    with pytest.raises(ValueError, match="bad.json"):
        Recipe.load(tmp_path / "bad.json")
    with pytest.raises(ValueError):
        Recipe(block_size=48)


def test_quantize_model_end_to_end(tiny_checkpoints, tmp_path):
    """Every weight and every tap gets quantized; the saved checkpoint reloads identically; w8a16 stays close."""
    checkpoint = open_checkpoint(tiny_checkpoints["gqa_tied"])
    calibration = pack_sequences(builtin_sequences(checkpoint, generated=False), 64)
    quantized = quantize_model(checkpoint, Recipe.from_precision("w8a16", block_size=32), calibration,
                               progress=False)
    rotated = checkpoint_for(checkpoint, quantized.recipe)  # the default recipe rotates: an untied head too
    c = rotated.config
    assert set(quantized.weights) == {n for n in rotated.tensors.names() if n != "norm" and "norm" not in n}
    assert "lm_head" in quantized.weights and quantized.config == c
    taps = {f"layers.{i}.{t}" for i in range(c.num_layers) for t in LAYER_TAPS} | set(GLOBAL_TAPS)
    assert set(quantized.activations) == taps
    quantized.save(tmp_path / "q")
    again = QuantizedModel.load(tmp_path / "q")
    assert again.activations == quantized.activations and again.recipe == quantized.recipe
    np.testing.assert_array_equal(again.weights["layers.1.q_proj"].codes, quantized.weights["layers.1.q_proj"].codes)
    tokens = torch.randint(0, c.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    simulated = build_reference(c, QuantizedSource(rotated.tensors, again))
    simulated.set_tap(FakeQuantTap(again.activations))
    with torch.no_grad():
        assert sqnr_db(load_reference(checkpoint)(tokens), simulated(tokens)) > 25


def test_quantize_model_streams_to_disk_identically(tiny_checkpoints, tmp_path):
    """With `out`, layers are written as they are quantized (4-bit codes packed) and read back unchanged."""
    checkpoint = open_checkpoint(tiny_checkpoints["mha_untied"])
    calibration = pack_sequences(builtin_sequences(checkpoint, generated=False), 32)
    recipe = Recipe.from_precision("w4a16", block_size=32, algorithm="rtn", overrides={"layers.1.up_proj": 8})
    in_memory = quantize_model(checkpoint, recipe, calibration, progress=False)
    on_disk = quantize_model(checkpoint, recipe, calibration, progress=False, out=tmp_path / "q")
    files = sorted(p.name for p in (tmp_path / "q").iterdir())
    layers = [f"layer_{i:03d}.safetensors" for i in range(checkpoint.config.num_layers)]
    assert files == ["head.safetensors", *layers, "quantization.json"]
    assert set(on_disk.weights) == set(in_memory.weights)
    for name, q in in_memory.weights.items():
        np.testing.assert_array_equal(on_disk.weights[name].codes, q.codes)
        np.testing.assert_array_equal(on_disk.weights[name].scales, q.scales)
        assert on_disk.weights[name].bits == q.bits
    assert on_disk.weights["layers.1.up_proj"].bits == 8 and on_disk.weights["layers.1.q_proj"].bits == 4
    assert on_disk.activations == in_memory.activations


def test_asymmetric_calibration_tracks_the_float_model(tiny_checkpoints):
    """GPTQ with asymmetric calibration (each layer's error measured against the float model's outputs, not the
    float layer's on quantized inputs) ends nearer the float model on its own calibration set than plain GPTQ,
    with other codes; its recipe is recorded."""
    checkpoint = open_checkpoint(tiny_checkpoints["gqa_tied"])
    calibration = pack_sequences(builtin_sequences(checkpoint, generated=False), 64)
    reference = load_reference(checkpoint)
    sqnr, codes = {}, {}
    for asymmetric in (0.0, 0.5):
        recipe = Recipe.from_precision("w4a16", block_size=32, rotation=None, asymmetric_calibration=asymmetric)
        quantized = quantize_model(checkpoint, recipe, calibration, progress=False)
        assert quantized.recipe.asymmetric_calibration == asymmetric
        simulated = build_reference(checkpoint.config, QuantizedSource(checkpoint.tensors, quantized))
        simulated.set_tap(FakeQuantTap(quantized.activations))
        with torch.no_grad():
            sqnr[asymmetric] = sqnr_db(reference(calibration), simulated(calibration))
        codes[asymmetric] = quantized.weights["layers.3.down_proj"].codes
    assert not np.array_equal(codes[0.0], codes[0.5])
    assert sqnr[0.5] > sqnr[0.0] + 2, sqnr

"""Offline rotations (quantization.rotation): orthogonal matrices, equal float logits, smaller 4-bit errors, and a
rotated quantized export that still matches its simulated model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ondevice_llama.config import LlamaConfig
from ondevice_llama.evaluation import evaluate, exported_logits, simulated_logits
from ondevice_llama.export import ExportOptions, export_model
from ondevice_llama.loading import open_checkpoint
from ondevice_llama.loading.synthetic import write_synthetic_checkpoint
from ondevice_llama.model import build_reference
from ondevice_llama.quantization.quantized_checkpoint import QuantizedModel
from ondevice_llama.quantization.quantizers import dequantize, quantize_weight
from ondevice_llama.quantization.recipe import Recipe, rotation_option
from ondevice_llama.quantization.rotation import RotatedSource, checkpoint_for, hadamard, orthogonal, rotate_checkpoint


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 44, 60, 64, 72, 576, 960])
def test_hadamard_orders(n):
    h = hadamard(n)
    assert h is not None and set(np.unique(h)) <= {-1, 1}
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))


def test_orthogonal_is_seeded_and_falls_back_where_no_hadamard_is_built():
    assert hadamard(18) is None and hadamard(9) is None
    for n in (18, 64):
        q = orthogonal(n, 3)
        np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)
        np.testing.assert_array_equal(q, orthogonal(n, 3))
        assert not np.array_equal(q, orthogonal(n, 4))
    assert np.allclose(np.abs(orthogonal(64, 0)), 1 / 8)  # a signed Hadamard matrix


def _logits(checkpoint, tokens) -> np.ndarray:
    model = build_reference(checkpoint.config, checkpoint.tensors, torch.float64)
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0].numpy()


# hidden 48 has a Hadamard matrix (12 x 4); hidden 36 too; 18 has none here (the random orthogonal fallback).
@pytest.mark.parametrize(("hidden", "heads", "kv_heads", "tied"), [(48, 4, 2, True), (36, 3, 3, False),
                                                                  (72, 4, 1, True), (18, 1, 1, False)])
def test_rotation_leaves_float_logits_unchanged(tmp_path, hidden, heads, kv_heads, tied):
    config = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=2,
                         num_heads=heads, num_kv_heads=kv_heads, tie_word_embeddings=tied, max_position_embeddings=64)
    checkpoint = open_checkpoint(write_synthetic_checkpoint(config, tmp_path / "m", seed=1))
    rotated = rotate_checkpoint(checkpoint)
    assert not rotated.config.tie_word_embeddings and "lm_head" in rotated.tensors.names()
    assert rotate_checkpoint(rotated) is rotated  # not rotated twice
    for norm in ("norm", "layers.0.input_norm", "layers.1.post_attention_norm"):
        np.testing.assert_array_equal(rotated.tensors.get(norm), 1.0)  # folded into the projections
    assert not np.allclose(rotated.tensors.get("layers.0.v_proj"), checkpoint.tensors.get("layers.0.v_proj"))
    tokens = list(np.random.default_rng(0).integers(0, config.vocab_size, 24))
    expected = _logits(checkpoint, tokens)
    np.testing.assert_allclose(_logits(rotated, tokens), expected, atol=1e-5 * np.abs(expected).max())


def test_rotation_shrinks_4_bit_error_of_a_weight_with_outlier_inputs():
    """A weight with outlier input columns in many blocks (as folded norm weights make them): in the rotated
    basis its block-32 round-to-nearest output error is about half (1.8x smaller here)."""
    rng = np.random.default_rng(0)
    n = 576
    w = rng.standard_normal((256, n)) * 0.02
    w[:, ::48] *= 30  # an outlier input column in every third block
    x = rng.standard_normal((512, n))
    q = orthogonal(n, 0)

    def error(weight: np.ndarray, inputs: np.ndarray) -> float:
        qw = quantize_weight(weight.astype(np.float32), 4, 32)
        approx = dequantize(qw.codes, qw.scales, None, 32).astype(np.float64)
        np.testing.assert_allclose(approx, weight, atol=qw.max_error * 1.0001)  # the round trip's own bound
        return float(np.linalg.norm(inputs @ (approx - weight).T))

    plain, rotated = error(w, x), error(w @ q, x @ q)  # (x Q)(W Q)^T = x W^T
    np.testing.assert_allclose((x @ q) @ (w @ q).T, x @ w.T, atol=1e-10)
    assert rotated < plain / 1.5


def test_recipes_name_their_rotation():
    assert rotation_option(None) == {} and rotation_option("none") == {"rotation": None}
    assert Recipe().rotation == "hadamard" and Recipe(algorithm="rtn").rotation is None  # "auto"
    assert Recipe.from_dict({"weight_bits": 4}).rotation is None  # a recipe saved before rotations
    recipe = Recipe(**rotation_option("hadamard"))
    assert "hadamard rotation" in recipe.describe() and Recipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(ValueError, match="rotation"):
        Recipe(rotation="givens")
    with pytest.raises(ValueError, match="--rotation"):
        rotation_option("givens")


def test_rotated_export_matches_its_simulated_model(tiny_checkpoints, tmp_path):
    """The exported QDQ graphs of a rotated quantization are the rotated model's, with an untied head, and
    match the simulated model as unrotated ones do."""
    checkpoint = open_checkpoint(tiny_checkpoints["gqa_tied"])
    options = ExportOptions(num_parts=2, sequence_length=8, context_length=64, all_logits=True, precision="w4a16",
                            block_size=32, rotation="hadamard")
    manifest = export_model(checkpoint, tmp_path / "rot", options, progress=False)
    quantized = QuantizedModel.load(manifest.extra["quantization"]["quantized_checkpoint"])
    assert quantized.recipe.rotation == "hadamard" and "lm_head" in quantized.weights
    assert not manifest.config.tie_word_embeddings
    assert isinstance(checkpoint_for(checkpoint, quantized.recipe).tensors, RotatedSource)
    tokens = list(np.random.default_rng(0).integers(0, checkpoint.config.vocab_size, 3 * 64))
    sources = {"simulated": simulated_logits(checkpoint, quantized), "exported": exported_logits(tmp_path / "rot")}
    report = evaluate(sources, tokens, 64, reference="simulated", progress=False,
                      bos=checkpoint.special_tokens.bos_id)
    exported = report.sources["exported"]
    assert exported.top1_agreement >= 0.99 and exported.kl_to_reference < 1e-4

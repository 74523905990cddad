"""The built-in calibration set: the model's own text, generated once (seeded) and cached."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ondevice_llama.adapt.mask import MASK_VALUE
from ondevice_llama.loading import open_checkpoint
from ondevice_llama.model import build_reference, load_reference
from ondevice_llama.quantization import calibration
from ondevice_llama.quantization.calibration import (
    Generation,
    builtin_sequences,
    generated_sequences,
    handwritten_sequences,
    pack_sequences,
    seed_prompt_ids,
)
from ondevice_llama.quantization.encodings import ActivationEncoding, is_kv_tap
from ondevice_llama.quantization.observers import FakeQuantTap, RangeObserver
from ondevice_llama.quantization.quantize_model import quantize_model
from ondevice_llama.quantization.quantized_checkpoint import QuantizedSource
from ondevice_llama.quantization.recipe import Recipe

SHORT = Generation(length=14, batch=5)
PROMPTS = (("chat", "What is 2 + 2?"), ("text", "Once upon a time"), ("text", "def main():\n"),
           ("chat", "Name a colour."), ("text", "The"))


@pytest.fixture(autouse=True)
def few_prompts(monkeypatch):
    monkeypatch.setattr(calibration, "SEED_PROMPTS", PROMPTS)  # keeps generation fast


def test_decoder_steps_match_the_reference(tiny_checkpoints):
    """Generation's one-token steps for a batch (the reference through a sliced cache) give the full forward."""
    checkpoint = open_checkpoint(tiny_checkpoints["gqa_tied"])
    model = load_reference(checkpoint)
    tokens = torch.randint(0, checkpoint.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(12, batch=3, sliced=True)
        steps = torch.stack([model(tokens[:, t:t + 1], torch.tensor([t]))[:, 0] for t in range(12)], dim=1)
        torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


def test_generated_text_is_seeded_cached_and_starts_with_the_prompts(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("ONDEVICE_LLAMA_CACHE", str(tmp_path))
    checkpoint = open_checkpoint(tiny_checkpoints["gqa_tied"])
    first = generated_sequences(checkpoint, SHORT, progress=False)
    prompts = seed_prompt_ids(checkpoint)
    assert len(first) == len(prompts) and {len(s) for s in first} == {SHORT.length}
    for sequence, prompt in zip(first, prompts, strict=True):
        assert sequence[:len(prompt)] == prompt[:SHORT.length]
    assert len({tuple(s) for s in first}) == len(first)
    assert max(max(s) for s in first) < checkpoint.config.vocab_size
    cached = list((tmp_path / "calibration").glob("*.npy"))
    assert len(cached) == 1 and cached[0].name.startswith(checkpoint.name.replace(" ", "-"))

    def fail(*_args, **_kwargs):
        raise AssertionError("generated again instead of read from the cache")

    real = calibration.generate_sequences
    monkeypatch.setattr(calibration, "generate_sequences", fail)
    assert generated_sequences(checkpoint, SHORT, progress=False) == first
    monkeypatch.setattr(calibration, "generate_sequences", real)
    fresh = generated_sequences(checkpoint, SHORT, cache=False, progress=False)
    assert fresh == first  # the same seed gives the same text
    other = generated_sequences(checkpoint, Generation(length=14, batch=5, seed=1), cache=False, progress=False)
    assert other != first


def test_builtin_set_is_handwritten_then_generated(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("ONDEVICE_LLAMA_CACHE", str(tmp_path))
    checkpoint = open_checkpoint(tiny_checkpoints["gqa_tied"])
    handwritten = handwritten_sequences(checkpoint)
    assert builtin_sequences(checkpoint, generated=False) == handwritten
    monkeypatch.setattr(calibration, "generated_sequences",
                        lambda ck, progress=True: generated_sequences(ck, SHORT, progress=progress))
    sequences = builtin_sequences(checkpoint, progress=False)
    assert sequences[:len(handwritten)] == handwritten
    assert np.asarray(sequences[len(handwritten):]).shape == (len(seed_prompt_ids(checkpoint)), SHORT.length)


def test_rows_start_with_the_sink_token_once():
    rows = pack_sequences([[1, 5, 6, 7], [1, 8, 9], [10, 11, 12, 13, 14]], 4, first_token=1)
    assert rows.tolist() == [[1, 5, 6, 7], [1, 8, 9, 10], [1, 11, 12, 13]]  # the short tail is dropped
    assert pack_sequences([[5]], 4, first_token=1).tolist() == [[1, 5, 5, 5]]  # too little text: repeated


def test_range_observer_leaves_out_position_zero_and_rare_outliers():
    x = torch.linspace(-2, 3, 4 * 50 * 60).reshape(4, 50, 60)
    x[:, 0, 7] = 5000.0  # position 0 of every row: the attention sink's massive activation
    skipping = RangeObserver(skip_first=True)
    skipping("layers.0.mlp_input", x)
    lo, hi = skipping.ranges["layers.0.mlp_input"]
    assert lo == pytest.approx(-2, abs=0.05) and hi == pytest.approx(3, abs=0.05)
    plain = RangeObserver()
    plain("layers.0.mlp_input", x)
    assert plain.ranges["layers.0.mlp_input"][1] == 5000.0  # 4 of 12,000 values: more than 1e-5 of them
    big = torch.randn(2, 1000, 200)
    big[1, 500, 3] = 1e4  # one value in 400,000: a rare second sink, kept by default (16-bit activations)...
    whole = RangeObserver()
    whole("x", big)
    assert whole.ranges["x"][1] == 1e4
    observer = RangeObserver(outlier_fraction=1e-5)  # ...and left out for 8-bit ones
    observer("x", big)
    observer("x", big * 0.5)  # ranges merge over calls
    lo, hi = observer.ranges["x"]
    assert 3 < hi < 6 and -6 < lo < -3
    scores = torch.full((1, 2, 4, 4), MASK_VALUE)
    scores[..., 0] = torch.tensor([0.5, -1.0, 2.0, 1.0])
    observer("layers.0.scores", scores)
    assert observer.ranges["layers.0.scores"] == (-1.0, 2.0)  # masked entries left out


@pytest.mark.parametrize("shape", [(5, 7), (2, 5, 7), (2, 3, 5, 7)])
def test_fake_quant_keeps_position_zero_in_float(shape):
    x = torch.randn(shape) * 3
    encoding = ActivationEncoding(8, -1.0, 1.0)
    out = FakeQuantTap({"t": encoding}, float_first=True)("t", x)
    all_quantized = FakeQuantTap({"t": encoding})("t", x)
    first = (slice(None),) * max(0, len(shape) - 2) + (slice(0, 1),)
    later = (slice(None),) * max(0, len(shape) - 2) + (slice(1, None),)
    torch.testing.assert_close(out[first], x[first], rtol=0, atol=0)
    torch.testing.assert_close(out[later], all_quantized[later], rtol=0, atol=0)


def test_recorded_sink_is_position_zero_of_the_simulated_model(tiny_checkpoints):
    """The sink's keys, values and logits (kept from the calibration pass) are what the simulated model
    computes at position 0, where it keeps activations in float but for the KV cache entries."""
    checkpoint = open_checkpoint(tiny_checkpoints["gqa_tied"])
    sink = checkpoint.special_tokens.bos_id
    calibration = pack_sequences(handwritten_sequences(checkpoint), 32, first_token=sink)
    quantized = quantize_model(checkpoint, Recipe.from_precision("w4a16", block_size=32, algorithm="rtn"),
                               calibration, progress=False, sink_token=sink)
    c = checkpoint.config
    assert quantized.recipe.rotation is None  # RTN: not rotated, so the checkpoint's own tensors are the model's
    recorded = {}

    def tap(name, x):
        out = FakeQuantTap(quantized.activations, float_first=True)(name, x)
        if is_kv_tap(name):
            recorded[name] = out  # position 0 too is quantized as the KV cache holds it
        return out

    model = build_reference(c, QuantizedSource(checkpoint.tensors, quantized), torch.float32)
    model.set_tap(tap)
    with torch.no_grad():
        logits = model(torch.tensor([[sink, 5, 6]]))[0, 0]
    s = quantized.attention_sink
    assert s.token == sink and s.keys.shape == (c.num_layers, c.num_kv_heads, c.head_dim)
    for layer in range(c.num_layers):
        for tap, ours, theirs in (("k_rope", s.keys[layer], recorded[f"layers.{layer}.k_rope"][0, :, 0]),
                                  ("v_cache", s.values[layer].reshape(-1), recorded[f"layers.{layer}.v_cache"][0, 0])):
            step = quantized.activations[f"layers.{layer}.{tap}"].scale
            np.testing.assert_allclose(ours, theirs, atol=1.01 * step)  # a float rounding may flip one step
            assert np.abs(ours - theirs.numpy()).mean() < 0.05 * step
    np.testing.assert_allclose(s.logits, logits, atol=1e-4)
    with pytest.raises(ValueError, match="attention sink token"):
        quantize_model(checkpoint, Recipe.from_precision("w4a16", algorithm="rtn"), calibration[:, 1:],
                       progress=False, sink_token=sink)

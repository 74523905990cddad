"""The built-in calibration set: the model's own text, generated once (seeded) and cached."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ondevice_llama.loading import open_checkpoint
from ondevice_llama.model import load_reference
from ondevice_llama.quantization import calibration
from ondevice_llama.quantization.calibration import (
    Generation,
    _Decoder,
    builtin_sequences,
    generated_sequences,
    handwritten_sequences,
    seed_prompt_ids,
)

SHORT = Generation(length=14, batch=5)
PROMPTS = (("chat", "What is 2 + 2?"), ("text", "Once upon a time"), ("text", "def main():\n"),
           ("chat", "Name a colour."), ("text", "The"))


@pytest.fixture(autouse=True)
def few_prompts(monkeypatch):
    monkeypatch.setattr(calibration, "SEED_PROMPTS", PROMPTS)  # keeps generation fast


def test_decoder_steps_match_the_reference(tiny_checkpoints):
    checkpoint = open_checkpoint(tiny_checkpoints["gqa_tied"])
    model = load_reference(checkpoint)
    tokens = torch.randint(0, checkpoint.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    decoder = _Decoder(model, 3, 12)
    steps = torch.stack([decoder.step(tokens[:, t], t) for t in range(12)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(steps, model(tokens), rtol=1e-4, atol=1e-4)


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

"""The exported on-device graphs (SHA, 1x1 Conv or MatMul, parts, chunked prefill) match the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ondevice_llama.adapt.mask import MASK_VALUE, chunk_mask
from ondevice_llama.adapt.rope import rope_tables
from ondevice_llama.export import ExportOptions, export_model
from ondevice_llama.loading import open_checkpoint
from ondevice_llama.model import load_reference
from ondevice_llama.model.reference import rope_cos_sin
from ondevice_llama.runtime import ExportedModel

N, C = 8, 40
TOLERANCE = 1e-4  # max |difference| / max |logits|


def test_chunk_mask_hand_computed():
    """2 cached tokens, graph of n=3 with 2 real tokens (left-padded), capacity 4: rows are (pad, t2, t3)."""
    allowed = chunk_mask(past_capacity=4, n=3, past_len=2, valid=2)[0, 0] == 0
    expected = np.array([
        # past0 past1 past2 past3 | new0 new1 new2
        [0, 0, 0, 0, 1, 0, 0],  # padding row sees only itself
        [1, 1, 0, 0, 0, 1, 0],  # first real token: cache + itself
        [1, 1, 0, 0, 0, 1, 1],  # second real token: cache + both real tokens
    ], dtype=bool)
    np.testing.assert_array_equal(allowed, expected)
    assert chunk_mask(4, 3, 2, 2).min() == np.float32(MASK_VALUE)


def test_rope_tables_match_reference(tiny_checkpoints):
    config = open_checkpoint(tiny_checkpoints["gqa_tied"]).config
    positions = np.array([0, 1, 7, 100, 255])
    cos, sin = rope_tables(config, positions)
    ref_cos, ref_sin = rope_cos_sin(config, torch.from_numpy(positions))
    half = config.head_dim // 2
    np.testing.assert_allclose(cos[0], ref_cos[:, :half].numpy(), rtol=0, atol=1e-6)  # cos() may differ by 1 ulp
    np.testing.assert_allclose(sin[0], ref_sin[:, half:].numpy(), rtol=0, atol=1e-6)


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.fixture(scope="module")
def references(tiny_checkpoints):
    return {name: load_reference(open_checkpoint(path)) for name, path in tiny_checkpoints.items()}


@pytest.mark.parametrize("name", ["mha_untied", "gqa_tied"])
@pytest.mark.parametrize("use_conv", [True, False], ids=["conv", "matmul"])
@pytest.mark.parametrize("num_parts", [1, 2, 4])
def test_exported_parts_match_reference(tiny_checkpoints, references, tmp_path, name, use_conv, num_parts):
    """Chunked, left-padded prefill (21 tokens = 8 + 8 + 5) then decode, against one uncached forward."""
    checkpoint = open_checkpoint(tiny_checkpoints[name])
    options = ExportOptions(num_parts=num_parts, sequence_length=N, context_length=C, use_conv=use_conv,
                            precision="fp32")
    export_model(checkpoint, tmp_path / "export", options, progress=False)
    model = ExportedModel(tmp_path / "export")
    tokens = torch.randint(0, checkpoint.config.vocab_size, (30,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = references[name](tokens[None])[0].numpy()
    cache = model.new_cache()
    logits = [model.prefill(tokens[:21].tolist(), cache)]
    logits += [model.decode(int(t), cache) for t in tokens[21:]]
    assert cache.length == 30
    assert relative_error(np.stack(logits), expected[20:]) <= TOLERANCE


def test_all_logits_and_token_generator_fallback(tiny_checkpoints, references, tmp_path):
    """All-position logits for evaluation; prompts past the prompt processor's capacity go token by token."""
    checkpoint = open_checkpoint(tiny_checkpoints["gqa_tied"])
    options = ExportOptions(num_parts=2, sequence_length=N, context_length=C, all_logits=True, precision="fp32")
    export_model(checkpoint, tmp_path / "export", options, progress=False)
    model = ExportedModel(tmp_path / "export")
    tokens = torch.randint(0, 300, (C,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = references["gqa_tied"](tokens[None])[0].numpy()
    cache = model.new_cache()
    first = model.engine.run_graphs("prompt_processor", tokens[:5].tolist(), cache)  # one left-padded chunk
    assert first.shape == (N, 300)
    assert relative_error(first[N - 5:], expected[:5]) <= TOLERANCE
    model.prefill(tokens[5:34].tolist(), cache)  # 34 > C - N = 32: the tail goes through the token generator
    last = model.prefill(tokens[34:].tolist(), cache)
    assert cache.length == C
    assert relative_error(last, expected[-1]) <= TOLERANCE

"""Our reference model must match transformers' LlamaForCausalLM on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ondevice_llama.loading import open_checkpoint
from ondevice_llama.model import load_reference

TOLERANCE = 1e-4  # max |logits difference| / max |logits|, fp32


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


@pytest.mark.parametrize("name", ["mha_untied", "gqa_tied"])
def test_tiny_configs_match_transformers(tiny_checkpoints, name):
    from transformers import LlamaForCausalLM

    checkpoint = open_checkpoint(tiny_checkpoints[name])
    ours = load_reference(checkpoint)
    theirs = LlamaForCausalLM.from_pretrained(tiny_checkpoints[name], dtype=torch.float32).eval()
    tokens = torch.randint(0, checkpoint.config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(ours(tokens), theirs(tokens).logits) <= TOLERANCE


def test_default_model_matches_transformers(default_checkpoint, hf_default_model):
    ours = load_reference(default_checkpoint)
    ids = default_checkpoint.tokenizer.encode("The capital of France is Paris. The Eiffel Tower stands").ids
    tokens = torch.tensor([ids])
    with torch.no_grad():
        error = relative_error(ours(tokens), hf_default_model(tokens).logits)
    assert error <= TOLERANCE


def test_cached_decode_matches_full_forward(tiny_checkpoints):
    """Prefill then one token at a time through the KV cache gives the uncached logits."""
    model = load_reference(open_checkpoint(tiny_checkpoints["gqa_tied"]))
    tokens = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(64)
        steps = [model(tokens[:, :25], torch.arange(25))]
        steps += [model(tokens[:, t:t + 1], torch.tensor([t])) for t in range(25, 40)]
    np.testing.assert_allclose(torch.cat(steps, 1).numpy(), full.numpy(), rtol=0, atol=1e-4)

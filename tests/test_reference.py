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


# transformers 5 writes `rope_parameters` (theta inside it); older configs have top-level rope_theta/rope_scaling.
ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 100000.0},
    "linear": {"rope_type": "linear", "rope_theta": 50000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 20000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "rope_theta": 123456.0, "factor": 4.0, "original_max_position_embeddings": 64},
}


def _save_pretrained_llama(folder, tokenizer_from, rope_parameters: dict, tie: bool) -> None:
    """A tiny random Llama written by the installed transformers' save_pretrained, with our byte tokenizer."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=tie, rope_parameters=dict(rope_parameters))
    LlamaForCausalLM(config).save_pretrained(folder)
    for file in tokenizer_from.glob("tokenizer*"):
        shutil.copy(file, folder / file.name)


@pytest.mark.parametrize("rope", list(ROPE_PARAMETERS))
def test_save_pretrained_folders_match_transformers(tiny_checkpoints, tmp_path, rope):
    """The rope theta and scaling of a current transformers config are read, not silently defaulted."""
    import json

    from transformers import LlamaForCausalLM

    folder = tmp_path / rope
    _save_pretrained_llama(folder, tiny_checkpoints["gqa_tied"], ROPE_PARAMETERS[rope], tie=rope == "llama3")
    written = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" in written and "rope_theta" not in written  # the new form is what we test
    checkpoint = open_checkpoint(folder)
    assert checkpoint.config.rope_theta == ROPE_PARAMETERS[rope]["rope_theta"]
    assert checkpoint.config.rope_scaling.rope_type == rope
    theirs = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = torch.randint(0, 300, (1, 300), generator=torch.Generator().manual_seed(0))  # past 256: dynamic scales
    with torch.no_grad():
        assert relative_error(load_reference(checkpoint)(tokens), theirs(tokens).logits) <= TOLERANCE


def test_legacy_rope_scaling_form_is_read_too():
    from ondevice_llama.config import LlamaConfig

    base = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 256}
    legacy = LlamaConfig.from_hf(base | {"rope_theta": 500000.0, "rope_scaling": {
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}})
    new = LlamaConfig.from_hf(base | {"rope_parameters": dict(ROPE_PARAMETERS["llama3"])})
    assert legacy == new and legacy.rope_theta == 500000.0


@pytest.mark.parametrize(("rope", "message"), [
    ({"rope_type": "longrope", "rope_theta": 1e4}, "unsupported rope type 'longrope'"),
    ({"rope_type": "linear", "rope_theta": 1e4}, "factor must be a number"),
    ({"rope_type": "default", "rope_theta": 1e4, "factor": 2.0}, "does not take factor"),
    ({"rope_type": "default", "rope_theta": "big"}, "rope_theta must be a number"),
    ({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_unknown_or_incomplete_rope_is_refused(rope, message):
    from ondevice_llama.config import LlamaConfig

    base = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4}
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf(base | {"rope_parameters": rope})

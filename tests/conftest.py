"""Shared fixtures: tiny random Llama checkpoints for speed, the real default model where it matters."""

from __future__ import annotations

from pathlib import Path

import pytest

from ondevice_llama.config import LlamaConfig, RopeScaling
from ondevice_llama.loading import default_checkpoint_path, open_checkpoint
from ondevice_llama.loading.synthetic import write_synthetic_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared"

# (b) Llama-2 style: multi-head attention, untied embeddings.
TINY_MHA = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_layers=4, num_heads=4,
                       num_kv_heads=4, rms_norm_eps=1e-5, max_position_embeddings=256)
# (c) SmolLM2 / Llama-3 style: grouped-query attention, tied embeddings, Llama-3.1 rope scaling.
TINY_GQA = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=4, num_heads=4,
                       num_kv_heads=2, tie_word_embeddings=True, rope_theta=500000.0,
                       rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64), max_position_embeddings=256)
TINY_CONFIGS = {"mha_untied": TINY_MHA, "gqa_tied": TINY_GQA}


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Cached exports and quantized checkpoints go to a temporary folder, never the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ONDEVICE_LLAMA_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: write_synthetic_checkpoint(cfg, root / name, seed=i)
            for i, (name, cfg) in enumerate(TINY_CONFIGS.items())}


@pytest.fixture(scope="session")
def default_path() -> Path:
    return default_checkpoint_path()


@pytest.fixture(scope="session")
def default_checkpoint(default_path):
    return open_checkpoint(default_path)


@pytest.fixture(scope="session")
def hf_default_model(default_path):
    """transformers' own reading of the default GGUF (about 40 s): the independent reference."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_path.parent, gguf_file=default_path.name,
                                                 dtype=torch.float32)
    return model.eval()

"""The attention sink: the first token of every sequence, computed once in float and shipped as K/V.

Llama-family models park "massive activations" (Sun et al., 2024) in the residual stream of the first
position: in the default model one channel reaches about 23,700 there from layer 11 on, while no other
position exceeds a few hundred. A per-tensor 16-bit encoding that covers it has a step of about 0.46,
coarse enough that float rounding noise flips whole steps and the quantized graph no longer follows its
own simulation. Like PrefixQuant (Chen et al., 2024), quantized exports therefore never run position 0:
every sequence starts with one fixed token (the model's BOS) whose keys, values and logits were computed
at quantization time with float activations (its keys and values then quantized like every KV cache entry),
and activation encodings are calibrated on the other positions.

The exporter bakes the keys and values into every layer's attention (`export.llama_graph`), so a runtime on
the device (ours or Genie) never sees the sink: it only drops the prompt's leading BOS. The logits stay in
this file for the one prediction the graphs cannot make, the token after the sink alone.

Numpy only: the runtime loads it without torch.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .adapt.rope import rotate
from .config import LlamaConfig
from .quantization.encodings import ActivationEncoding

SINK_FILE = "attention_sink.npz"
SINK_POSITION = -1  # where the graphs hold the sink: one position before a prompt's first token


@dataclass(frozen=True)
class AttentionSink:
    token: int
    keys: np.ndarray  # [layers, kv_heads, head_dim], position 0 (where RoPE is the identity)
    values: np.ndarray  # [layers, kv_heads, head_dim]
    logits: np.ndarray  # [vocab]: what the model predicts after the sink alone

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, token=np.int64(self.token), keys=self.keys.astype(np.float32),
                     values=self.values.astype(np.float32), logits=self.logits.astype(np.float32))

    @classmethod
    def load(cls, path: Path, shape: tuple[int, int, int] | None = None, vocab_size: int | None = None
             ) -> AttentionSink:
        """`shape`: the (layers, kv_heads, head_dim) the model needs, and `vocab_size` its logits, checked when
        given; anything but a sink file is a one-line ValueError naming it."""
        try:
            with np.load(path, allow_pickle=False) as data:
                sink = cls(int(data["token"]), data["keys"], data["values"], data["logits"])
        except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: not an attention sink file ({type(e).__name__}: {e})") from None
        arrays = (sink.keys, sink.values, sink.logits)
        if not all(a.dtype == np.float32 for a in arrays) or sink.keys.ndim != 3 or sink.logits.ndim != 1:
            raise ValueError(f"{path}: not an attention sink file (float32 keys, values and logits expected)")
        if shape is not None and not sink.keys.shape == sink.values.shape == tuple(shape):
            raise ValueError(f"{path}: keys {sink.keys.shape} and values {sink.values.shape}, the model needs {shape}")
        if vocab_size is not None and sink.logits.shape != (vocab_size,):
            raise ValueError(f"{path}: {sink.logits.shape[0]} logits, the model has {vocab_size} tokens")
        if vocab_size is not None and not 0 <= sink.token < vocab_size:
            raise ValueError(f"{path}: sink token {sink.token} is not in the model's {vocab_size} tokens")
        return sink

    def cache_entries(self, config: LlamaConfig, layer: int, key_encoding: ActivationEncoding | None,
                      value_encoding: ActivationEncoding | None) -> tuple[np.ndarray, np.ndarray]:
        """The sink's key [kv_heads, head_dim, 1] (moved to `SINK_POSITION`) and value [kv_heads, 1, head_dim] as the
        KV cache holds them: codes of its encodings, or float where the cache is not quantized. The exported
        graphs and the simulated model take these same entries."""
        key = rotate(config, self.keys[layer], SINK_POSITION)[:, :, None]
        value = self.values[layer].astype(np.float32)[:, None, :]
        return (key if key_encoding is None else key_encoding.quantize(key),
                value if value_encoding is None else value_encoding.quantize(value))

    def without_sink(self, tokens: list[int]) -> list[int]:
        """`tokens` as graphs holding the sink run them: a leading sink token dropped."""
        return list(tokens[1:]) if tokens[:1] == [self.token] else list(tokens)

    def with_sink(self, tokens: list[int]) -> list[int]:
        """`tokens` as the model sees them: starting with the sink token."""
        return list(tokens) if tokens[:1] == [self.token] else [self.token, *tokens]

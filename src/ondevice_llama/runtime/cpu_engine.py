"""The CPU target's engine: dynamic-length decoder graphs, KV cache updated in place.

GroupQueryAttention reads and writes one context-long BNSH buffer per layer when its past and present
are bound to the same OrtValue, so a decode step copies no cache at all. A part may have a second graph for
prompts (`prefill`, the same graph computing in float): it binds the same buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..adapt import layout
from ..config import LlamaConfig
from ..manifest import DECODER, PREFILL, Manifest

# A prompt runs in chunks whose float activations stay under this. ONNX Runtime's arena keeps what a run needed:
# a 4-layer model of Llama-2-7B's widths (0.9 GB of weights, 1.0 GB RSS loaded) stood at 4.1 GB after four
# 1,024-token prompts run whole, and at 1.8 GB in this rule's chunks of 192 (benchmarks/prefill_memory.py).
ACTIVATION_BUDGET = 64 * 2**20
CHUNK_MULTIPLE = 64


def prefill_chunk_length(config: LlamaConfig, context_length: int) -> int:
    """Tokens per prefill run: as many as keep one run's float32 activations (the MLP's, the attention scores
    over the whole context, a few hidden states) under ACTIVATION_BUDGET, a multiple of CHUNK_MULTIPLE."""
    per_token = 4 * (3 * config.intermediate_size + 4 * config.hidden_size + config.num_heads * context_length)
    return max(CHUNK_MULTIPLE, ACTIVATION_BUDGET // per_token // CHUNK_MULTIPLE * CHUNK_MULTIPLE)


class CpuKVCache:
    def __init__(self, num_layers: int, shape: tuple[int, ...]):
        self._arrays = [np.zeros(shape, np.float32) for _ in range(2 * num_layers)]
        self.keys = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._arrays[0::2]]
        self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._arrays[1::2]]
        self.length = 0
        self.bindings: dict[str, list[ort.IOBinding]] = {}  # graph kind -> one per part, made on first use

    def advance(self, valid: int) -> None:
        self.length += valid

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on: attention reads only up to the current length."""
        self.length = min(self.length, length)


class CpuEngine:
    def __init__(self, folder: Path, manifest: Manifest, open_session: Callable[..., ort.InferenceSession]):
        """`open_session(path, graph_manifest)`: a session for one graph, checked against its manifest entry."""
        self.manifest = manifest
        self.chunk_length = prefill_chunk_length(manifest.config, manifest.context_length)
        self.sessions = {kind: [open_session(folder / part.graphs[kind].file, part.graphs[kind])
                                for part in manifest.parts] for kind in manifest.parts[0].graphs}

    def new_cache(self) -> CpuKVCache:
        c = self.manifest.config
        return CpuKVCache(c.num_layers, (1, c.num_kv_heads, self.manifest.context_length, c.head_dim))

    def _bindings(self, kind: str, cache: CpuKVCache) -> list[ort.IOBinding]:
        """One IOBinding per part and graph kind with the cache bound once; each run rebinds only the small
        inputs."""
        if kind not in cache.bindings:
            cache.bindings[kind] = []
            for part, session in zip(self.manifest.parts, self.sessions[kind], strict=True):
                binding = session.io_binding()
                for layer in part.layers:
                    binding.bind_ortvalue_input(layout.past_key_name(layer), cache.keys[layer])
                    binding.bind_ortvalue_output(layout.present_key_name(layer), cache.keys[layer])
                    binding.bind_ortvalue_input(layout.past_value_name(layer), cache.values[layer])
                    binding.bind_ortvalue_output(layout.present_value_name(layer), cache.values[layer])
                cache.bindings[kind].append(binding)
        return cache.bindings[kind]

    def run(self, kind: str, tokens: list[int], cache: CpuKVCache) -> np.ndarray:
        """Any number of tokens in one run of each part's `kind` graph; returns logits [positions, vocab]."""
        total = cache.length + len(tokens)
        seqlens_k = np.array([total - 1], np.int32)
        total_length = np.array(total, np.int32)
        hidden: np.ndarray = np.array([tokens], np.int64)
        last = len(self.manifest.parts) - 1
        for part, session, binding in zip(self.manifest.parts, self.sessions[kind], self._bindings(kind, cache),
                                          strict=True):
            binding.bind_cpu_input("input_ids" if part.index == 0 else "hidden_in", hidden)
            binding.bind_cpu_input("seqlens_k", seqlens_k)
            binding.bind_cpu_input("total_sequence_length", total_length)
            binding.bind_output("logits" if part.index == last else "hidden_out")
            session.run_with_iobinding(binding)
            hidden = binding.get_outputs()[-1].numpy()
        cache.advance(len(tokens))
        return hidden[0]

    def step(self, tokens: list[int], cache: CpuKVCache) -> np.ndarray:
        return self.run(DECODER, tokens, cache)

    def prefill(self, tokens: list[int], cache: CpuKVCache) -> np.ndarray:
        """The prompt in chunks of `chunk_length`, on the prefill graphs where the export has them; returns the
        last chunk's logits."""
        kind = PREFILL if PREFILL in self.sessions else DECODER
        for start in range(0, max(len(tokens), 1), self.chunk_length):
            logits = self.run(kind, tokens[start:start + self.chunk_length], cache)
        return logits

    all_logits = step  # the decoder returns every position's logits when exported with them

"""The NPU target's engine: static-shape graphs, the prompt processor (AR-N) in chunks, the token generator
(AR-1) per token, fed exactly as Qualcomm's on-device runtime (Genie) feeds them (`adapt.layout`).

The same engine runs an export on ONNX Runtime's CPU and a compiled folder's context binaries on QNN HTP:
only the sessions differ.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..adapt import layout
from ..adapt.mask import chunk_mask
from ..adapt.rope import rope_tables
from ..manifest import GRAPH_KINDS, PROMPT_PROCESSOR, TOKEN_GENERATOR, GraphManifest, Manifest
from .kv_cache import KVCache


class ContextFullError(RuntimeError):
    """The static context length is reached; nothing more fits in the KV cache."""


class NpuEngine:
    def __init__(self, folder: Path, manifest: Manifest, open_session: Callable[..., object]):
        """`open_session(path, graph_manifest)`: an ONNX Runtime session for one graph (CPU, or QNN HTP), checked
        against its manifest entry."""
        self.manifest = manifest
        self.config = manifest.config
        self.sessions: dict[str, list] = {kind: [open_session(folder / part.graphs[kind].file, part.graphs[kind])
                                                 for part in manifest.parts] for kind in GRAPH_KINDS}

    def new_cache(self) -> KVCache:
        """A cache as long as the token generator's past (the longest any graph reads), in the graphs' KV dtypes."""
        specs = {spec.name: spec for part in self.manifest.parts for spec in part.graphs[TOKEN_GENERATOR].inputs}
        layers = range(self.config.num_layers)
        return KVCache(self.config, layout.past_capacity(self.manifest.context_length, 1),
                       [np.dtype(specs[layout.past_key_name(i)].dtype) for i in layers],
                       [np.dtype(specs[layout.past_value_name(i)].dtype) for i in layers])

    def _graph(self, kind: str, part: int) -> GraphManifest:
        return self.manifest.parts[part].graphs[kind]

    def inputs(self, kind: str, tokens: list[int], cache: KVCache) -> list[dict[str, np.ndarray]]:
        """Each part's graph inputs for one step of `kind` on `tokens` (left-padded to the graph's sequence
        length) after what `cache` holds; a later part's hidden-state input is left for `run_graphs` to add."""
        c, n = self.config, self._graph(kind, 0).sequence_length
        valid = len(tokens)
        past_len = cache.length
        capacity = layout.past_capacity(self.manifest.context_length, n)
        if not 0 < valid <= n:
            raise ValueError(f"{kind} takes 1..{n} tokens, got {valid}")
        if past_len > capacity:
            raise ContextFullError(f"{past_len} cached tokens do not fit the {kind}'s capacity {capacity}")
        pad = n - valid
        ids = np.zeros((1, n), np.int32)
        ids[0, pad:] = tokens
        positions = np.zeros(n, np.int64)
        positions[pad:] = np.arange(past_len, past_len + valid)
        cos, sin = rope_tables(c, positions)
        rope_shape = layout.rope_input_shape(n, c.head_dim)
        common = {layout.POSITION_COS: cos.reshape(rope_shape), layout.POSITION_SIN: sin.reshape(rope_shape),
                  layout.ATTENTION_MASK: chunk_mask(capacity, n, past_len, valid)}
        feeds = []
        for part in self.manifest.parts:
            part_feeds = dict(common) | ({layout.INPUT_IDS: ids} if part.first_layer == 0 else {})
            for layer in part.layers:
                part_feeds[layout.past_key_name(layer)], part_feeds[layout.past_value_name(layer)] = \
                    cache.past(layer, capacity)
            feeds.append(part_feeds)
        return feeds

    def run_graphs(self, kind: str, tokens: list[int], cache: KVCache) -> np.ndarray:
        """One step of one graph kind over every part; returns its logits [positions, vocab].

        `tokens` (at most the graph's sequence length) are left-padded; the new K/V of the real tokens
        go into `cache` at its current length.
        """
        valid = len(tokens)
        hidden: np.ndarray | None = None
        parts = zip(self.manifest.parts, self.sessions[kind], self.inputs(kind, tokens, cache), strict=True)
        for part, session, feeds in parts:
            if part.first_layer != 0:
                feeds[layout.hidden_state_name(part.first_layer)] = hidden
            names = [o.name for o in self._graph(kind, part.index).outputs]
            outputs = dict(zip(names, session.run(names, feeds), strict=True))
            for layer in part.layers:
                cache.write(layer, outputs[layout.new_key_name(layer)], outputs[layout.new_value_name(layer)], valid)
            hidden = outputs.get(layout.hidden_state_name(part.end_layer), outputs.get(layout.LOGITS))
        cache.advance(valid)
        return hidden[0]

    def prefill(self, tokens: list[int], cache: KVCache) -> np.ndarray:
        """Full chunks of N through the prompt processor, a shorter last chunk left-padded; once the prompt
        processor's cache capacity (C - N) is reached, the rest token by token. Returns the last logits."""
        n = self.manifest.sequence_length
        pp_capacity = layout.past_capacity(self.manifest.context_length, n)
        i = 0
        while i < len(tokens):
            if cache.length <= pp_capacity and len(tokens) - i > 1:
                chunk = tokens[i:i + n]
                logits = self.run_graphs(PROMPT_PROCESSOR, chunk, cache)
            else:
                chunk = tokens[i:i + 1]
                logits = self.run_graphs(TOKEN_GENERATOR, chunk, cache)
            i += len(chunk)
        return logits

    def step(self, tokens: list[int], cache: KVCache) -> np.ndarray:
        return self.run_graphs(TOKEN_GENERATOR, tokens, cache)

    def all_logits(self, tokens: list[int], cache: KVCache) -> np.ndarray:
        """Every position's logits: prompt-processor chunks ending at multiples of N (so that the last one
        of a full context still finds its past within the graph's C - N slots), left padding dropped."""
        n = self.manifest.sequence_length
        pieces, i = [], 0
        while i < len(tokens):
            chunk = tokens[i:i + n - cache.length % n]
            pieces.append(self.run_graphs(PROMPT_PROCESSOR, chunk, cache)[n - len(chunk):])
            i += len(chunk)
        return np.concatenate(pieces)

"""Run an exported folder with ONNX Runtime: prompt processor for prefill, token generator per token.

State is plain data: the manifest, one InferenceSession per part and graph kind, and a host KV cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from ..adapt import layout
from ..adapt.mask import chunk_mask
from ..adapt.rope import rope_tables
from ..manifest import GraphManifest, Manifest, load_manifest, verify_checksums
from .attention_sink import AttentionSink
from .cpu_engine import CpuEngine
from .kv_cache import KVCache
from .sessions import open_session

PROMPT_PROCESSOR = "prompt_processor"
TOKEN_GENERATOR = "token_generator"


class ContextFullError(RuntimeError):
    """The static context length is reached; nothing more fits in the KV cache."""


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # Quantized npu graphs on the CPU: where ONNX Runtime fuses DequantizeLinear + MatMul into MatMulNBits,
    # keep float arithmetic (its default, int8, would no longer match the simulated model).
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return options


class ExportedModel:
    """An exported folder ready to run: manifest, tokenizer and the engine for its target."""

    def __init__(self, folder: Path | str, threads: int | None = None, providers: list[str] | None = None):
        self.folder = Path(folder)
        self.manifest: Manifest = load_manifest(self.folder)
        verify_checksums(self.folder, self.manifest)
        self.config = self.manifest.config
        self.tokenizer = Tokenizer.from_file(str(self.folder / self.manifest.tokenizer_file))
        engine = CpuEngine if self.manifest.target == "cpu" else NpuEngine
        self.engine = engine(self.folder, self.manifest, session_options(threads),
                             providers or ["CPUExecutionProvider"])
        sink_file = self.manifest.attention_sink_file
        c = self.config
        self.attention_sink = (AttentionSink.load(self.folder / sink_file, (c.num_layers, c.num_kv_heads, c.head_dim),
                                                  c.vocab_size) if sink_file else None)
        # Tokens every cache starts with: the attention sink's, precomputed (empty without one).
        self.prefix: list[int] = [self.attention_sink.token] if self.attention_sink else []

    def with_prefix(self, tokens: list[int]) -> list[int]:
        """`tokens` as this model runs them: after the attention sink's token, when it has one."""
        return self.attention_sink.with_sink(tokens) if self.attention_sink else list(tokens)

    @property
    def context_length(self) -> int:
        return self.manifest.context_length

    @property
    def sequence_length(self) -> int:
        return self.manifest.sequence_length

    def new_cache(self):
        """An empty cache, or one holding the attention sink's K/V at position 0."""
        cache = self.engine.new_cache()
        sink = self.attention_sink
        if sink is not None:
            for layer in range(self.config.num_layers):
                cache.write(layer, sink.keys[layer][:, :, None], sink.values[layer][:, None, :], 1)
            cache.advance(1)
        return cache

    def reset_cache(self, cache) -> None:
        """Back to what `new_cache` gives: empty, or the attention sink alone."""
        cache.truncate(len(self.prefix))

    def prefill(self, tokens: list[int], cache) -> np.ndarray:
        """Process a prompt after what `cache` holds; returns the last token's logits [vocab]."""
        if not tokens:
            raise ValueError("prefill needs at least one token")
        if cache.length + len(tokens) > self.context_length:
            raise ContextFullError(f"{cache.length + len(tokens)} tokens exceed the context length "
                                   f"{self.context_length}")
        return self.engine.prefill(tokens, cache)[-1]

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits of every position of `tokens` from a fresh cache ([len, vocab]); needs an --all-logits export."""
        if not self.manifest.all_logits:
            raise ValueError(f"{self.folder}: exported without --all-logits; export again with it to evaluate")
        ids = self.with_prefix(tokens)
        if len(ids) > self.context_length:
            raise ContextFullError(f"{len(ids)} tokens exceed the context length {self.context_length}")
        rows = [self.attention_sink.logits[None]] if self.attention_sink else []
        if len(ids) > len(self.prefix):
            rows.append(self.engine.all_logits(ids[len(self.prefix):], self.new_cache()))
        return np.concatenate(rows)[len(ids) - len(tokens):]

    def decode(self, token: int, cache) -> np.ndarray:
        """One token through the token generator; returns its logits [vocab]."""
        if cache.length >= self.context_length:
            raise ContextFullError(f"the context length {self.context_length} is reached")
        return self.engine.step([token], cache)[-1]


class NpuEngine:
    """Static-shape graphs: the prompt processor (AR-N) in chunks, the token generator (AR-1) per token."""

    def __init__(self, folder: Path, manifest: Manifest, options: ort.SessionOptions, providers: list[str]):
        self.manifest = manifest
        self.config = manifest.config
        self.sessions: dict[str, list[ort.InferenceSession]] = {
            kind: [open_session(folder / part.graphs[kind].file, options, providers, part.graphs[kind])
                   for part in manifest.parts]
            for kind in (PROMPT_PROCESSOR, TOKEN_GENERATOR)
        }

    @property
    def context_length(self) -> int:
        return self.manifest.context_length

    @property
    def sequence_length(self) -> int:
        return self.manifest.sequence_length

    def new_cache(self) -> KVCache:
        """A cache as long as the token generator's past: the longest any graph reads."""
        return KVCache(self.config, layout.past_capacity(self.context_length, 1))

    def _graph(self, kind: str, part: int) -> GraphManifest:
        return self.manifest.parts[part].graphs[kind]

    def run_graphs(self, kind: str, tokens: list[int], cache: KVCache) -> np.ndarray:
        """One step of one graph kind over every part; returns its logits [positions, vocab].

        `tokens` (at most the graph's sequence length) are left-padded; the new K/V of the real tokens
        go into `cache` at its current length.
        """
        n = self._graph(kind, 0).sequence_length
        valid = len(tokens)
        past_len = cache.length
        capacity = layout.past_capacity(self.context_length, n)
        if not 0 < valid <= n:
            raise ValueError(f"{kind} takes 1..{n} tokens, got {valid}")
        if past_len > capacity:
            raise ContextFullError(f"{past_len} cached tokens do not fit the {kind}'s capacity {capacity}")
        pad = n - valid
        ids = np.zeros((1, n), np.int32)
        ids[0, pad:] = tokens
        positions = np.zeros(n, np.int64)
        positions[pad:] = np.arange(past_len, past_len + valid)
        cos, sin = rope_tables(self.config, positions)
        common = {"position_cos": cos, "position_sin": sin,
                  "attention_mask": chunk_mask(capacity, n, past_len, valid)}
        hidden: np.ndarray = ids
        for part, session in zip(self.manifest.parts, self.sessions[kind], strict=True):
            feeds = dict(common)
            feeds["input_ids" if part.index == 0 else "hidden_in"] = hidden
            for layer in part.layers:
                feeds[layout.past_key_name(layer)], feeds[layout.past_value_name(layer)] = cache.past(layer, capacity)
            names = [o.name for o in self._graph(kind, part.index).outputs]
            outputs = dict(zip(names, session.run(names, feeds), strict=True))
            for layer in part.layers:
                cache.write(layer, outputs[layout.new_key_name(layer)], outputs[layout.new_value_name(layer)], valid)
            hidden = outputs.get("hidden_out", outputs.get("logits"))
        cache.advance(valid)
        return hidden[0]

    def prefill(self, tokens: list[int], cache: KVCache) -> np.ndarray:
        """Full chunks of N through the prompt processor, a shorter last chunk left-padded; once the prompt
        processor's cache capacity (C - N) is reached, the rest token by token. Returns the last logits."""
        n = self.sequence_length
        pp_capacity = layout.past_capacity(self.context_length, n)
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
        n = self.sequence_length
        pieces, i = [], 0
        while i < len(tokens):
            chunk = tokens[i:i + n - cache.length % n]
            pieces.append(self.run_graphs(PROMPT_PROCESSOR, chunk, cache)[n - len(chunk):])
            i += len(chunk)
        return np.concatenate(pieces)

"""Run an exported (or compiled) folder: prompt processor for prefill, token generator per token.

State is plain data: the manifest, one ONNX Runtime session per part and graph kind, and a host KV cache.
A compiled folder (`ondevice-llama compile`) holds QNN context binaries behind EPContext models; it runs
on QNN HTP (the NPU of a Snapdragon device, the HTP simulator elsewhere) with the same engine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from ..attention_sink import AttentionSink
from ..manifest import Manifest, load_manifest, verify_checksums
from .cpu_engine import CpuEngine
from .engine import Cache, Engine
from .npu_engine import PROMPT_PROCESSOR, TOKEN_GENERATOR, ContextFullError, NpuEngine
from .sessions import open_session

__all__ = ["PROMPT_PROCESSOR", "TOKEN_GENERATOR", "ContextFullError", "ExportedModel", "session_options"]


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # Quantized npu graphs on the CPU: where ONNX Runtime fuses DequantizeLinear + MatMul into MatMulNBits,
    # keep float arithmetic (its default, int8, would no longer match the simulated model).
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return options


def _session_factory(folder: Path, manifest: Manifest, threads: int | None, providers: list[str] | None):
    """How to open each graph (`open(path, expected)`, checked against its manifest entry): ONNX Runtime's CPU for
    exports, QNN HTP for a compiled folder (its per-graph binaries on the x86_64 simulator, which cannot load
    weight-shared ones)."""
    if manifest.compiled is None:
        providers = providers or ["CPUExecutionProvider"]
        return lambda path, expected: open_session(path, session_options(threads), providers, expected)
    from .. import qnn

    soc = qnn.soc_by_name(manifest.compiled["soc"])
    if not qnn.simulated():
        return lambda path, expected: open_session(path, qnn.session_options(soc), None, expected)
    simulator = manifest.compiled.get("simulator")
    if not simulator:
        raise ValueError(f"{folder}: compiled with --device-only; QNN's x86_64 HTP simulator cannot load its "
                         "weight-shared context binaries: compile again without --device-only to run it here")
    return lambda path, expected: open_session(path.parent / simulator / path.name, qnn.session_options(soc), None,
                                               expected)


class ExportedModel:
    """An exported folder ready to run: manifest, tokenizer and the engine for its target."""

    def __init__(self, folder: Path | str, threads: int | None = None, providers: list[str] | None = None):
        self.folder = Path(folder)
        self.manifest: Manifest = load_manifest(self.folder)
        verify_checksums(self.folder, self.manifest)
        self.config = self.manifest.config
        self.tokenizer = Tokenizer.from_file(str(self.folder / self.manifest.tokenizer_file))
        engine = CpuEngine if self.manifest.target == "cpu" else NpuEngine
        open_session = _session_factory(self.folder, self.manifest, threads, providers)
        self.engine: Engine = engine(self.folder, self.manifest, open_session)
        sink_file = self.manifest.attention_sink_file
        c = self.config
        self.attention_sink = (AttentionSink.load(self.folder / sink_file, (c.num_layers, c.num_kv_heads, c.head_dim),
                                                  c.vocab_size) if sink_file else None)

    def model_tokens(self, tokens: list[int]) -> list[int]:
        """`tokens` as the graphs run them: a quantized export's graphs hold the attention sink (the BOS every
        sequence starts with) themselves, so a leading BOS is dropped (and a prompt without one is run as if it
        had it)."""
        return self.attention_sink.without_sink(tokens) if self.attention_sink is not None else list(tokens)

    @property
    def context_length(self) -> int:
        """Tokens a cache holds (a baked attention sink comes on top)."""
        return self.manifest.context_length

    @property
    def sequence_length(self) -> int:
        return self.manifest.sequence_length

    def new_cache(self) -> Cache:
        return self.engine.new_cache()

    def reset_cache(self, cache: Cache) -> None:
        """Back to what `new_cache` gives."""
        cache.truncate(0)

    def prefill(self, tokens: list[int], cache: Cache) -> np.ndarray:
        """Process model tokens after what `cache` holds; returns the last token's logits [vocab]."""
        if not tokens:
            raise ValueError("prefill needs at least one token")
        if cache.length + len(tokens) > self.context_length:
            raise ContextFullError(f"{cache.length + len(tokens)} tokens exceed the context length "
                                   f"{self.context_length}")
        return self.engine.prefill(tokens, cache)[-1]

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits of every position of `tokens` from a fresh cache ([len, vocab]); needs an export with all logits."""
        if not self.manifest.all_logits:
            raise ValueError(f"{self.folder}: exported without --all-logits; export again with it to evaluate")
        ids = self.model_tokens(tokens)
        if len(ids) > self.context_length:
            raise ContextFullError(f"{len(ids)} tokens exceed the context length {self.context_length}")
        rows = [self.attention_sink.logits[None]] if len(ids) < len(tokens) else []  # the dropped BOS's row
        if ids:
            rows.append(self.engine.all_logits(ids, self.new_cache()))
        return np.concatenate(rows)

    def decode(self, token: int, cache: Cache) -> np.ndarray:
        """One token through the token generator; returns its logits [vocab]."""
        if cache.length >= self.context_length:
            raise ContextFullError(f"the context length {self.context_length} is reached")
        return self.engine.step([token], cache)[-1]

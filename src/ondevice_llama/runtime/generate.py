"""Generation on an exported model: prefill, decode one token at a time, stream text, measure.

`ChatSession` keeps the conversation and its KV cache between turns: each turn re-renders the whole
conversation with the chat template and prefills only what the cache does not already hold.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..chat_format import Message, format_chat
from .detokenizer import IncrementalDetokenizer
from .exported_model import ContextFullError, ExportedModel
from .kv_cache import KVCache
from .sampling import Sampler, SamplingConfig

GREEDY = SamplingConfig()
CONTEXT_FULL_MESSAGE = "[context full: the reply was cut at the context length; start a new chat or use --slide]"


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    stop_reason: str  # "eos", "max_new_tokens" or "context_full"
    ttft_s: float  # prompt processing up to the first sampled token
    decode_s: float  # every later token

    @property
    def decode_tokens_per_s(self) -> float:
        steps = len(self.token_ids) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    def timing_line(self) -> str:
        # Three significant digits: a simulated NPU decodes at a few hundredths of a token per second.
        return (f"[{self.prompt_tokens} prompt tokens, TTFT {self.ttft_s:.3f} s, {len(self.token_ids)} tokens, "
                f"{self.decode_tokens_per_s:.3g} tokens/s, stop: {self.stop_reason}]")


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    mismatch = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(mismatch[0]) if mismatch.size else n


class Generator:
    """Token generation over one KV cache; remembers which tokens the cache holds."""

    def __init__(self, model: ExportedModel):
        self.model = model
        self.cache: KVCache = model.new_cache()
        self.history: list[int] = []  # the model tokens whose K/V the cache holds, one per position

    def reset(self) -> None:
        self.model.reset_cache(self.cache)
        self.history = []

    def _prefill(self, prompt: list[int]) -> np.ndarray:
        """Reuse the cached prefix of `prompt` (model tokens) and process the rest (at least one token, for
        logits)."""
        if not prompt:  # the attention sink alone: its logits were precomputed
            self.reset()
            return self.model.attention_sink.logits
        keep = min(common_prefix(self.history, prompt), len(prompt) - 1, self.cache.length)
        self.cache.truncate(keep)
        self.history = prompt[:keep]
        logits = self.model.prefill(prompt[keep:], self.cache)
        self.history = list(prompt)
        return logits

    def _slide(self, tokens: list[int]) -> np.ndarray:
        """Keep the newest half of the context and recompute its cache (positions are baked into keys)."""
        keep = tokens[-(self.model.context_length // 2):]
        self.reset()
        return self._prefill(keep)

    def generate(self, prompt: list[int], sampling: SamplingConfig = GREEDY, max_new_tokens: int = 256,
                 stop_ids: tuple[int, ...] = (), on_text: Callable[[str], None] | None = None,
                 slide: bool = False) -> GenerationResult:
        if not prompt:
            raise ValueError("the prompt is empty")
        prompt_tokens = len(prompt)
        prompt = self.model.model_tokens(prompt)
        context = self.model.context_length
        if len(prompt) >= context and not slide:
            raise ContextFullError(f"the prompt has {len(prompt)} tokens; the context length is {context}")
        on_text = on_text or (lambda _: None)
        sampler = Sampler(sampling)
        detok = IncrementalDetokenizer(self.model.tokenizer)
        start = time.perf_counter()
        logits = self._slide(prompt) if len(prompt) >= context else self._prefill(prompt)
        generated: list[int] = []
        stop_reason = "max_new_tokens"
        ttft = 0.0
        while len(generated) < max_new_tokens:
            token = sampler(logits)
            if not generated:
                ttft = time.perf_counter() - start
                decode_start = time.perf_counter()
            if token in stop_ids:
                stop_reason = "eos"
                break
            generated.append(token)
            on_text(detok.add(token))
            if len(generated) == max_new_tokens:
                break
            if self.cache.length >= context:
                if not slide:
                    stop_reason = "context_full"
                    break
                logits = self._slide(self.history + [token])
                continue
            logits = self.model.decode(token, self.cache)
            self.history.append(token)
        on_text(detok.flush())
        decode_s = time.perf_counter() - decode_start if generated else 0.0
        text = self.model.tokenizer.decode(generated, skip_special_tokens=True)
        return GenerationResult(generated, text, prompt_tokens, stop_reason, ttft, decode_s)


class ChatSession:
    """A multi-turn conversation with the model's own chat format; `_generate` is the engine's part."""

    def __init__(self, model: ExportedModel, system: str | None = None):
        self.model = model
        self.generator = Generator(model)
        self._start(model.manifest, model.tokenizer, system)

    def _start(self, manifest, tokenizer, system: str | None) -> None:
        self.manifest, self.tokenizer = manifest, tokenizer
        self.messages: list[Message] = [{"role": "system", "content": system}] if system else []

    def reset(self) -> None:
        """A new conversation (the system prompt kept)."""
        self.messages = self.messages[:1] if self.messages[:1] and self.messages[0]["role"] == "system" else []
        self._reset_engine()

    def _reset_engine(self) -> None:
        self.generator.reset()

    def prompt_ids(self) -> list[int]:
        m = self.manifest
        return format_chat(self.tokenizer, self.messages, m.special_tokens, m.chat_template)

    def _generate(self, prompt: list[int], sampling: SamplingConfig, max_new_tokens: int,
                  on_text: Callable[[str], None] | None, slide: bool) -> GenerationResult:
        return self.generator.generate(prompt, sampling, max_new_tokens, self.manifest.special_tokens.eos_ids,
                                       on_text, slide)

    def send(self, text: str, sampling: SamplingConfig = GREEDY, max_new_tokens: int = 256,
             on_text: Callable[[str], None] | None = None, slide: bool = False) -> GenerationResult:
        """One turn; a turn that fails or is interrupted (Ctrl-C) is left out of the conversation."""
        self.messages.append({"role": "user", "content": text})
        try:
            result = self._generate(self.prompt_ids(), sampling, max_new_tokens, on_text, slide)
        except BaseException:
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": result.text})
        return result

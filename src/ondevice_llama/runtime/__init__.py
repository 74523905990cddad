"""Runtime: run an exported folder with ONNX Runtime, numpy and tokenizers alone (no torch)."""

from ..chat_format import Message, encode_text, format_chat
from .exported_model import ContextFullError, ExportedModel
from .generate import ChatSession, GenerationResult, Generator
from .kv_cache import KVCache
from .sampling import Sampler, SamplingConfig

__all__ = ["ChatSession", "ContextFullError", "ExportedModel", "GenerationResult", "Generator", "KVCache",
           "Message", "Sampler", "SamplingConfig", "encode_text", "format_chat"]

"""Open a Llama-family checkpoint, whatever its format, as one `Checkpoint`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import LlamaConfig, RopeScaling, SpecialTokens
from .default_model import default_checkpoint_path
from .errors import CheckpointError
from .names import expected_names
from .sources import GGUFSource, SafetensorsSource, TensorSource

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


@dataclass
class Checkpoint:
    """Config, lazy tensors and tokenizer: all a later stage needs, with no trace of the file format."""

    path: Path
    name: str
    config: LlamaConfig
    tensors: TensorSource
    tokenizer: object  # tokenizers.Tokenizer
    special_tokens: SpecialTokens
    chat_template: str | None


def open_checkpoint(path: Path | str | None = None) -> Checkpoint:
    """Open a Hugging Face folder or a `.gguf` file; None opens the default model."""
    path = default_checkpoint_path() if path is None else Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file or folder")
    if path.is_dir():
        checkpoint = _open_hf_folder(path)
    elif path.suffix == ".gguf":
        checkpoint = _open_gguf(path)
    else:
        raise CheckpointError(path, "expected a Hugging Face folder or a .gguf file")
    _check_tensors(checkpoint)
    return checkpoint


def _open_hf_folder(folder: Path) -> Checkpoint:
    from .tokenizer import tokenizer_from_hf_folder

    config_path = folder / "config.json"
    if not config_path.exists():
        raise CheckpointError(folder, "no config.json (not a Hugging Face model folder)")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(config_path, f"invalid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(config_path, f"not a config object (the JSON is a {type(hf).__name__})")
    architectures = hf.get("architectures") or []
    if not isinstance(architectures, list):
        raise CheckpointError(config_path, f"architectures must be a list, got {architectures!r}")
    if hf.get("model_type") != "llama" or not set(architectures) <= set(SUPPORTED_ARCHITECTURES):
        raise CheckpointError(config_path, f"not a Llama model (model_type={hf.get('model_type')!r}, "
                                           f"architectures={architectures})")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError(config_path, "Llama variants with bias terms are not supported")
    try:
        config = LlamaConfig.from_hf(hf)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(config_path, f"unusable config ({e})") from None
    tokenizer, special, template = tokenizer_from_hf_folder(folder)
    tensors = SafetensorsSource(folder)
    return Checkpoint(folder, folder.name, config, tensors, tokenizer, special, template)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _gguf_config(reader, path: Path) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(path, f"not a Llama model (general.architecture={arch!r})")
    if "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise CheckpointError(path, "GGUF files with precomputed rope_freqs are not supported; "
                                    "use the Hugging Face folder instead")
    try:
        heads = int(_field(reader, "llama.attention.head_count"))
        hidden = int(_field(reader, "llama.embedding_length"))
        vocab = _field(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
        rope = _gguf_rope(reader, path)
        tied = "output.weight" not in {t.name for t in reader.tensors}
        return LlamaConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(_field(reader, "llama.feed_forward_length")),
            num_layers=int(_field(reader, "llama.block_count")),
            num_heads=heads,
            num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
            head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
            rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
            rope_scaling=rope,
            max_position_embeddings=int(_field(reader, "llama.context_length", 4096)),
            tie_word_embeddings=tied,
        )
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(path, f"incomplete Llama metadata ({e})") from None


def _gguf_rope(reader, path: Path) -> RopeScaling:
    """GGUF's rope scaling keys (llama.cpp's names); a type or key we would ignore is refused."""
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling in ("none", None):
        return RopeScaling()
    if scaling not in ("linear", "yarn"):
        raise CheckpointError(path, f"unsupported rope scaling type {scaling!r} (supported: none, linear, yarn)")
    attn_factor = _field(reader, "llama.rope.scaling.attn_factor", 1.0)
    if scaling == "yarn" and attn_factor != 1.0:
        raise CheckpointError(path, f"yarn rope with attn_factor {attn_factor} is not supported")
    factor = float(_field(reader, "llama.rope.scaling.factor", 1.0))
    if scaling == "linear":
        return RopeScaling("linear", factor=factor)
    original = int(_field(reader, "llama.rope.scaling.original_context_length", 0))
    return RopeScaling("yarn", factor=factor, original_max_position_embeddings=original)


def _open_gguf(path: Path) -> Checkpoint:
    import gguf

    from .tokenizer import tokenizer_from_gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises bare ValueError/IndexError/struct errors on damaged files
        raise CheckpointError(path, f"unreadable GGUF file ({type(e).__name__}: {e})") from None
    config = _gguf_config(reader, path)
    tokenizer, special, template = tokenizer_from_gguf(reader, path)
    name = _field(reader, "general.name") or path.stem
    return Checkpoint(path, name, config, GGUFSource(path, reader, config), tokenizer, special, template)


def _check_tensors(checkpoint: Checkpoint) -> None:
    """Fail at open time, naming the file, rather than halfway through an export."""
    c = checkpoint.config
    qkv = c.num_heads * c.head_dim
    kv = c.num_kv_heads * c.head_dim
    shapes = {
        "embed_tokens": (c.vocab_size, c.hidden_size), "norm": (c.hidden_size,),
        "lm_head": (c.vocab_size, c.hidden_size), "input_norm": (c.hidden_size,),
        "post_attention_norm": (c.hidden_size,), "q_proj": (qkv, c.hidden_size),
        "k_proj": (kv, c.hidden_size), "v_proj": (kv, c.hidden_size), "o_proj": (c.hidden_size, qkv),
        "gate_proj": (c.intermediate_size, c.hidden_size), "up_proj": (c.intermediate_size, c.hidden_size),
        "down_proj": (c.hidden_size, c.intermediate_size),
    }
    present = set(checkpoint.tensors.names())
    for name in expected_names(c.num_layers, c.tie_word_embeddings):
        if name not in present:
            raise CheckpointError(checkpoint.path, f"missing tensor {name}")
        want, got = shapes[name.rsplit(".", 1)[-1]], checkpoint.tensors.shape(name)
        if got != want:
            raise CheckpointError(checkpoint.path, f"tensor {name} has shape {got}, config implies {want}")

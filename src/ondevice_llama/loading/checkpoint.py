"""Open a Llama-family checkpoint, whatever its format, as one `Checkpoint`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import LlamaConfig, RopeScaling, SpecialTokens
from ..files import read_json_object
from .default_model import default_checkpoint_path
from .errors import CheckpointError
from .gguf_file import GGUFFile
from .names import expected_names, tensor_shape
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
    _check_vocabulary(checkpoint)
    return checkpoint


def _open_hf_folder(folder: Path) -> Checkpoint:
    from .tokenizer import tokenizer_from_hf_folder

    config_path = folder / "config.json"
    if not config_path.exists():
        raise CheckpointError(folder, "no config.json (not a Hugging Face model folder)")
    hf = read_json_object(config_path, "config", CheckpointError)
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


def _gguf_config(file: GGUFFile) -> LlamaConfig:
    """The config from GGUF metadata, every field read with its type checked (a float count is refused)."""
    path = file.path
    arch = file.value("general.architecture", "str", None)
    if arch != "llama":
        raise CheckpointError(path, f"not a Llama model (general.architecture={arch!r})")
    if "rope_freqs.weight" in file.tensors:
        raise CheckpointError(path, "GGUF files with precomputed rope_freqs are not supported; "
                                    "use the Hugging Face folder instead")
    heads = file.value("llama.attention.head_count", "int")
    hidden = file.value("llama.embedding_length", "int")
    vocab = file.value("llama.vocab_size", "int", None)
    if vocab is None:
        vocab = len(file.value("tokenizer.ggml.tokens", "[str]"))
    try:
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=file.value("llama.feed_forward_length", "int"),
            num_layers=file.value("llama.block_count", "int"),
            num_heads=heads,
            num_kv_heads=file.value("llama.attention.head_count_kv", "int", heads),
            head_dim=file.value("llama.rope.dimension_count", "int", hidden // heads if heads > 0 else 0),
            rms_norm_eps=file.value("llama.attention.layer_norm_rms_epsilon", "float", 1e-5),
            rope_theta=file.value("llama.rope.freq_base", "float", 10000.0),
            rope_scaling=_gguf_rope(file),
            max_position_embeddings=file.value("llama.context_length", "int", 4096),
            tie_word_embeddings="output.weight" not in file.tensors,
        )
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(path, f"unusable Llama metadata ({e})") from None


def _gguf_rope(file: GGUFFile) -> RopeScaling:
    """GGUF's rope scaling keys (llama.cpp's names); a type or key we would ignore is refused."""
    scaling = file.value("llama.rope.scaling.type", "str", "none")
    if scaling == "none":
        return RopeScaling()
    if scaling not in ("linear", "yarn"):
        raise CheckpointError(file.path, f"unsupported rope scaling type {scaling!r} (supported: none, linear, yarn)")
    attn_factor = file.value("llama.rope.scaling.attn_factor", "float", 1.0)
    if scaling == "yarn" and attn_factor != 1.0:
        raise CheckpointError(file.path, f"yarn rope with attn_factor {attn_factor} is not supported")
    factor = file.value("llama.rope.scaling.factor", "float", 1.0)
    if scaling == "linear":
        return RopeScaling("linear", factor=factor)
    original = file.value("llama.rope.scaling.original_context_length", "int", 0)
    return RopeScaling("yarn", factor=factor, original_max_position_embeddings=original)


def _open_gguf(path: Path) -> Checkpoint:
    from .tokenizer import tokenizer_from_gguf

    file = GGUFFile(path)
    config = _gguf_config(file)
    tokenizer, special, template = tokenizer_from_gguf(file)
    name = file.value("general.name", "str", None) or path.stem
    return Checkpoint(path, name, config, GGUFSource(file, config), tokenizer, special, template)


def _check_tensors(checkpoint: Checkpoint) -> None:
    """Fail at open time, naming the file, rather than halfway through an export."""
    c = checkpoint.config
    present = set(checkpoint.tensors.names())
    for name in expected_names(c.num_layers, c.tie_word_embeddings):
        if name not in present:
            raise CheckpointError(checkpoint.path, f"missing tensor {name}")
        want, got = tensor_shape(c, name), checkpoint.tensors.shape(name)
        if got != want:
            raise CheckpointError(checkpoint.path, f"tensor {name} has shape {got}, config implies {want}")


def _check_vocabulary(checkpoint: Checkpoint) -> None:
    """Every token id the tokenizer can produce has an embedding row (a larger vocabulary fails mid-chat)."""
    largest = max(checkpoint.tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    if largest >= checkpoint.config.vocab_size:
        raise CheckpointError(checkpoint.path, f"the tokenizer has token id {largest}, the model embeds only "
                                               f"{checkpoint.config.vocab_size} tokens")

"""Synthetic Hugging Face checkpoints: real layout and config, random weights.

Right for testing speed, memory and equivalence at any scale; meaningless for quality. Tensors are
generated and written one at a time, so a 7B checkpoint never sits in memory.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np

from ..config import LlamaConfig
from ..files import make_staging_folder, replace_folder
from .names import canonical_to_hf, expected_names

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
BYTE_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape for every tensor of `config`."""
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = {
        "input_norm": (c.hidden_size,), "post_attention_norm": (c.hidden_size,),
        "q_proj": (q, c.hidden_size), "k_proj": (kv, c.hidden_size), "v_proj": (kv, c.hidden_size),
        "o_proj": (c.hidden_size, q), "gate_proj": (c.intermediate_size, c.hidden_size),
        "up_proj": (c.intermediate_size, c.hidden_size), "down_proj": (c.hidden_size, c.intermediate_size),
    }
    glob = {"embed_tokens": (c.vocab_size, c.hidden_size), "norm": (c.hidden_size,),
            "lm_head": (c.vocab_size, c.hidden_size)}
    return {canonical_to_hf(n): glob.get(n) or per_layer[n.rsplit(".", 1)[1]]
            for n in expected_names(c.num_layers, c.tie_word_embeddings)}


def _random_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator, dtype: np.dtype) -> np.ndarray:
    if len(shape) == 1:  # norm weights sit near 1, as in trained models
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
    std = 1.0 if "embed_tokens" in name else shape[1] ** -0.5  # keeps activations O(1) layer to layer
    return (std * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)


def _write_shard(path: Path, names: list[str], shapes: dict, rng: np.random.Generator, dtype: np.dtype) -> None:
    code = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}[np.dtype(dtype)]
    header, offset = {}, 0
    for name in names:
        nbytes = int(np.prod(shapes[name])) * np.dtype(dtype).itemsize
        header[name] = {"dtype": code, "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in names:
            f.write(_random_tensor(name, shapes[name], rng, dtype).tobytes())


def write_synthetic_checkpoint(config: LlamaConfig, out: Path, *, seed: int = 0, shard_bytes: int = 10 * 2**30,
                               dtype: type = np.float32, tokenizer_dir: Path | None = None) -> Path:
    """Write a Hugging Face folder for `config` with random weights; returns `out`.

    `tokenizer_dir` supplies tokenizer files to copy; without it a byte-level tokenizer with a ChatML
    template is written (its vocabulary must fit `config.vocab_size`).
    """
    out = Path(out)
    shapes = tensor_shapes(config)
    itemsize = np.dtype(dtype).itemsize
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_staging_folder(out)
    rng = np.random.default_rng(seed)
    hf = config.to_hf() | {"torch_dtype": "float16" if dtype == np.float16 else "float32"}
    (tmp / "config.json").write_text(json.dumps(hf, indent=2))
    if len(shards) == 1:
        _write_shard(tmp / "model.safetensors", shards[0], shapes, rng, dtype)
    else:
        weight_map = {}
        for k, names in enumerate(shards):
            file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_shard(tmp / file, names, shapes, rng, dtype)
            weight_map |= {n: file for n in names}
        total = sum(int(np.prod(s)) * itemsize for s in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer_dir is not None:
        for file in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json"):
            if (Path(tokenizer_dir) / file).exists():
                shutil.copy(Path(tokenizer_dir) / file, tmp / file)
    else:
        _write_byte_tokenizer(tmp, config.vocab_size)
    replace_folder(tmp, out)
    return out


def _write_byte_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus ChatML specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(BYTE_SPECIALS)}
    vocab |= {ch: len(BYTE_SPECIALS) + i for i, ch in enumerate(sorted(alphabet))}
    if len(vocab) > vocab_size:
        raise ValueError(f"the byte tokenizer needs vocab_size >= {len(vocab)}, config has {vocab_size}")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in BYTE_SPECIALS])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
              "chat_template": CHATML_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

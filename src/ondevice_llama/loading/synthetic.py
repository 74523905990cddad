"""Synthetic Hugging Face checkpoints: real layout and config, random weights.

Right for testing speed, memory and equivalence at any scale (a 7B model without downloading one);
meaningless for quality. `PRESETS` holds the exact configs of real models, `PRESET_FILES` how their
checkpoints are stored (dtype, shard size, special ids, chat template), so that a synthetic
`llama-2-7b-chat` has the same files, shards, tensor names, shapes and dtype as
meta-llama/Llama-2-7b-chat-hf.

Weights: each matrix is i.i.d. normal with real-model scale (embeddings std 0.02, projections std
1/sqrt(in_features), i.e. about 0.016 and 0.0095 at 7B, which keeps activations O(1) layer to layer);
norm weights are 1 + 0.1 N(0, 1). Values are drawn as 16-bit random indices into a table of the
65,536 equiprobable normal quantiles (tails to 4.3 sigma), about 5x faster than drawing normals,
and each tensor has its own random stream (seed, name), so its values do not depend on the dtype,
the sharding or the number of layers. Tensors are generated and written in chunks of
`CHUNK_ELEMENTS`, so memory stays at a few tens of MB whatever the model size.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
import time
import zlib
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import numpy as np

from ..config import LlamaConfig, RopeScaling
from ..files import folder_lock, make_staging_folder, replace_folder
from .names import canonical_to_hf, num_parameters
from .names import tensor_shapes as canonical_shapes

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
# meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json chat_template (Meta's [INST] <<SYS>> format).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
BYTE_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

GB = 10**9  # Hugging Face's max_shard_size units are decimal

_LLAMA3_ROPE = RopeScaling("llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192)

# Exact configs of the real models (their config.json).
PRESETS: dict[str, LlamaConfig] = {
    "llama-2-7b-chat": LlamaConfig(  # meta-llama/Llama-2-7b-chat-hf
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
        num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
        tie_word_embeddings=False),
    "llama-3.2-1b": LlamaConfig(  # meta-llama/Llama-3.2-1B
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
        num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
        max_position_embeddings=131072, tie_word_embeddings=True),
    "llama-3.2-3b": LlamaConfig(  # meta-llama/Llama-3.2-3B
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
        max_position_embeddings=131072, tie_word_embeddings=True),
    "tinyllama-1.1b": LlamaConfig(  # TinyLlama/TinyLlama-1.1B-Chat-v1.0
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
        num_kv_heads=4, head_dim=64, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048,
        tie_word_embeddings=False),
}


@dataclass(frozen=True)
class PresetFiles:
    """How a real checkpoint is stored, so that the synthetic one looks the same on disk."""

    torch_dtype: str  # float16 | bfloat16 | float32
    shard_bytes: int  # max_shard_size the real checkpoint was saved with
    bos_token_id: int
    eos_token_id: int
    chat_template: str | None = None  # for a --tokenizer that brings no template of its own


PRESET_FILES: dict[str, PresetFiles] = {
    # Two shards, 9.98 GB + 3.50 GB, exactly like the real one.
    "llama-2-7b-chat": PresetFiles("float16", 10 * GB, 1, 2, LLAMA2_CHAT_TEMPLATE),
    "llama-3.2-1b": PresetFiles("bfloat16", 5 * GB, 128000, 128001),  # one model.safetensors, 2.47 GB
    "llama-3.2-3b": PresetFiles("bfloat16", 5 * GB, 128000, 128001),  # 4.97 GB + 1.46 GB
    "tinyllama-1.1b": PresetFiles("bfloat16", 5 * GB, 1, 2),  # one model.safetensors, 2.20 GB
}

# dtype name -> (safetensors code, numpy storage type; bfloat16 is stored as its uint16 bit pattern)
STORAGE = {"float32": ("F32", np.float32), "float16": ("F16", np.float16), "bfloat16": ("BF16", np.uint16)}
CHUNK_ELEMENTS = 8 << 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json")


def tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape for every tensor of `config`, in the order of transformers' state dict
    (embeddings, layers, final norm, LM head), which is the order the shards are filled in."""
    return {canonical_to_hf(name): shape for name, shape in canonical_shapes(config).items()}


def plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int, shard_bytes: int) -> list[list[str]]:
    """Hugging Face's rule: fill shards in state-dict order; start a new one when the next tensor would
    push a non-empty shard past `shard_bytes`."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    return ["model.safetensors"] if count == 1 else [
        f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]


@cache
def _normal_quantiles() -> np.ndarray:
    from statistics import NormalDist

    normal = NormalDist()
    return np.array([normal.inv_cdf((k + 0.5) / 65536) for k in range(65536)])


@cache
def _value_table(mean: float, std: float, dtype: str) -> np.ndarray:
    """The 65,536 values a tensor's random uint16 indices select, in the stored type. Every dtype is
    rounded from the same float32 table, so a float16 checkpoint is the float32 one rounded."""
    table = (mean + std * _normal_quantiles()).astype(np.float32)
    if dtype == "bfloat16":  # round to nearest even
        bits = table.view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return table.astype(STORAGE[dtype][1])


def _distribution(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    if len(shape) == 1:  # norm weights sit near 1, as in trained models
        return 1.0, 0.1
    if "embed_tokens" in name:
        return 0.0, 0.02
    return 0.0, shape[1] ** -0.5  # keeps activations O(1) layer to layer


def _write_tensor(f, name: str, shape: tuple[int, ...], seed: int, dtype: str, bar) -> None:
    table = _value_table(*_distribution(name, shape), dtype)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    count = int(np.prod(shape))
    for start in range(0, count, CHUNK_ELEMENTS):
        values = table[rng.integers(0, 65536, size=min(CHUNK_ELEMENTS, count - start), dtype=np.uint16)]
        f.write(values)
        bar.update(values.nbytes)


def _write_shard(path: Path, names: list[str], shapes: dict, seed: int, dtype: str, bar) -> None:
    code, storage = STORAGE[dtype]
    names = sorted(names)  # safetensors stores a file's tensors in name order
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        nbytes = int(np.prod(shapes[name])) * np.dtype(storage).itemsize
        header[name] = {"dtype": code, "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in names:
            _write_tensor(f, name, shapes[name], seed, dtype, bar)


def _dtype_name(dtype) -> str:
    if isinstance(dtype, str):
        if dtype not in STORAGE:
            raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(STORAGE)}")
        return dtype
    return {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}[np.dtype(dtype)]


def checkpoint_bytes(config: LlamaConfig, dtype: str = "float32") -> int:
    """Bytes of tensor data a checkpoint of `config` holds in `dtype` (the index's total_size)."""
    itemsize = np.dtype(STORAGE[_dtype_name(dtype)][1]).itemsize
    return sum(int(np.prod(s)) for s in tensor_shapes(config).values()) * itemsize


def write_synthetic_checkpoint(config: LlamaConfig, out: Path, *, seed: int = 0, shard_bytes: int = 5 * GB,
                               dtype="float32", tokenizer: Path | None = None, chat_template: str | None = None,
                               bos_token_id: int | None = None, eos_token_id: int | None = None,
                               progress: bool = False, provenance: dict | None = None) -> Path:
    """Write a Hugging Face folder for `config` with random weights; returns `out`.

    `dtype`: "float32", "float16" or "bfloat16" (or np.float32 / np.float16). `tokenizer`: a SentencePiece
    `tokenizer.model`, a `tokenizer.json` or a folder holding either, copied in with its folder's
    tokenizer_config.json when there is one; `chat_template`, `bos_token_id` and `eos_token_id` fill in
    what such a tokenizer does not say. Without it, a byte-level tokenizer with a ChatML template.
    The folder is built beside `out` and renamed into place when complete (replacing `out`).
    """
    out = Path(out)
    dtype = _dtype_name(dtype)
    shapes = tensor_shapes(config)
    itemsize = np.dtype(STORAGE[dtype][1]).itemsize
    shards = plan_shards(shapes, itemsize, shard_bytes)
    files = shard_file_names(len(shards))
    total = sum(int(np.prod(s)) for s in shapes.values()) * itemsize
    with folder_lock(out):
        tmp = make_staging_folder(out)
        try:
            special = _install_tokenizer(tmp, tokenizer, config, chat_template, bos_token_id, eos_token_id)
            ids = {"bos_token_id": special.bos_id,
                   "eos_token_id": special.eos_ids[0] if len(special.eos_ids) == 1 else list(special.eos_ids)}
            hf = config.to_hf() | ids | {"torch_dtype": dtype}
            (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
            (tmp / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
            from tqdm import tqdm

            with tqdm(total=total, unit="B", unit_scale=True, desc="synthesize", file=sys.stderr,
                      disable=not progress, dynamic_ncols=True, mininterval=0.5) as bar:
                for file, names in zip(files, shards, strict=True):
                    bar.set_postfix_str(file)
                    _write_shard(tmp / file, names, shapes, seed, dtype, bar)
            if len(files) > 1:
                weight_map = {name: file for file, names in zip(files, shards, strict=True) for name in names}
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            record = {"format": "ondevice-llama-synthetic", "format_version": 1, "seed": seed, "dtype": dtype,
                      "note": "random weights with a real model's layout; meaningless for quality"}
            (tmp / SYNTHETIC_MARKER).write_text(json.dumps(record | (provenance or {}), indent=2) + "\n")
            replace_folder(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


SYNTHETIC_MARKER = "synthetic.json"  # marks a folder this module wrote (and may overwrite)


# ---------------------------------------------------------------- presets and the command


@dataclass
class SynthesisResult:
    path: Path
    name: str
    config: LlamaConfig
    dtype: str
    shard_files: list[str]
    total_bytes: int
    seconds: float
    tokenizer: str

    def summary(self) -> str:
        shards = f"{len(self.shard_files)} shard{'s' if len(self.shard_files) > 1 else ''}"
        return (f"synthesized {self.name}: {self.config.num_layers} layers, "
                f"{num_parameters(self.config) / 1e9:.2f}B parameters, {self.dtype}, {shards}, "
                f"{self.total_bytes / GB:.2f} GB, {self.tokenizer} tokenizer, {self.seconds:.0f} s -> {self.path}")


def resolve_config(config: str | Path | LlamaConfig) -> tuple[str, LlamaConfig, PresetFiles]:
    """A preset name, a Hugging Face config.json or a LlamaConfig -> (name, config, how to store it)."""
    if isinstance(config, LlamaConfig):
        return "custom", config, PresetFiles("float32", 5 * GB, 1, 2)
    if str(config) in PRESETS:
        return str(config), PRESETS[str(config)], PRESET_FILES[str(config)]
    path = Path(config)
    if path.suffix != ".json" and not path.is_file():
        raise ValueError(f"unknown --config preset {str(config)!r}; presets: {', '.join(PRESETS)} "
                         f"(or a Hugging Face config.json)")
    try:
        hf = json.loads(path.read_text())
        parsed = LlamaConfig.from_hf(hf)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a usable Llama config.json (--config): {e}") from None
    dtype = hf.get("torch_dtype") if hf.get("torch_dtype") in STORAGE else "float32"
    bos, eos = hf.get("bos_token_id"), hf.get("eos_token_id")
    return path.parent.name or path.stem, parsed, PresetFiles(
        dtype, 5 * GB, bos if isinstance(bos, int) else 1, eos if isinstance(eos, int) else 2)


def synthesize(config: str | Path | LlamaConfig, out: Path, *, tokenizer: Path | None = None, seed: int = 0,
               dtype: str | None = None, layers: int | None = None, shard_bytes: int | None = None,
               progress: bool = False) -> SynthesisResult:
    """Write a synthetic checkpoint of a preset (see `PRESETS`), a config.json or a LlamaConfig to `out`.

    `layers` keeps the widths and cuts the depth (quick runs, tests). `out` may be absent, an empty
    folder or an earlier synthetic checkpoint (replaced); anything else is refused, as is a disk that
    cannot hold the checkpoint. Bad input raises ValueError naming the file or option.
    """
    started = time.perf_counter()
    name, cfg, files = resolve_config(config)
    if layers is not None:
        if not 1 <= layers <= cfg.num_layers:
            raise ValueError(f"--layers: must be from 1 to the config's {cfg.num_layers} layers, got {layers}")
        cfg = replace(cfg, num_layers=layers)
    if seed < 0:
        raise ValueError(f"--seed: must be non-negative, got {seed}")
    dtype = _dtype_name(dtype or files.torch_dtype)
    out = Path(out)
    _check_out(out)
    if tokenizer is not None:
        _check_tokenizer_source(Path(tokenizer))
    total = checkpoint_bytes(cfg, dtype)
    parent = out.parent if out.parent.exists() else Path(".")
    free = shutil.disk_usage(parent).free
    if free < total + (64 << 20):
        raise ValueError(f"{out}: the checkpoint needs {total / GB:.2f} GB, {parent.resolve()} has "
                         f"{free / GB:.2f} GB free")
    provenance = {"preset": name, "num_layers": cfg.num_layers}
    write_synthetic_checkpoint(cfg, out, seed=seed, shard_bytes=shard_bytes or files.shard_bytes, dtype=dtype,
                               tokenizer=tokenizer, chat_template=files.chat_template,
                               bos_token_id=files.bos_token_id, eos_token_id=files.eos_token_id,
                               progress=progress, provenance=provenance)
    shard_files = sorted(p.name for p in out.glob("*.safetensors"))
    kind = "byte-level" if tokenizer is None else Path(tokenizer).name
    return SynthesisResult(out, name, cfg, dtype, shard_files, total, time.perf_counter() - started, kind)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder (--out)")
    if out.is_dir() and any(out.iterdir()) and not (out / SYNTHETIC_MARKER).is_file():
        raise ValueError(f"{out}: exists, is not empty and is not a synthetic checkpoint; choose another --out "
                         f"or remove it")


# ---------------------------------------------------------------- tokenizers


def _check_tokenizer_source(source: Path) -> None:
    """Fail before writing gigabytes when --tokenizer is missing or unreadable."""
    from tokenizers import Tokenizer

    if source.is_dir():
        if not any((source / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            raise ValueError(f"{source}: no tokenizer.json or tokenizer.model in this folder (--tokenizer)")
        return
    if not source.is_file():
        raise ValueError(f"{source}: no such file (--tokenizer)")
    try:
        if source.suffix == ".json":
            Tokenizer.from_file(str(source))
        else:
            import sentencepiece

            sentencepiece.SentencePieceProcessor(model_file=str(source))
    except Exception as e:  # tokenizers and sentencepiece raise bare Exception / RuntimeError
        kind = "tokenizer.json" if source.suffix == ".json" else "SentencePiece tokenizer.model"
        raise ValueError(f"{source}: not a readable {kind} (--tokenizer): {str(e).splitlines()[0]}") from None


def _install_tokenizer(folder: Path, source: Path | None, config: LlamaConfig, chat_template: str | None,
                       bos_id: int | None, eos_id: int | None):
    """Put the tokenizer files into `folder`; returns the SpecialTokens the loader will see."""
    from .tokenizer import tokenizer_from_hf_folder

    if source is None:
        _write_byte_tokenizer(folder, config.vocab_size)
    else:
        source = Path(source)
        _check_tokenizer_source(source)
        if source.is_dir():
            for file in TOKENIZER_FILES:
                if (source / file).is_file():
                    shutil.copyfile(source / file, folder / file)
        else:
            shutil.copyfile(source, folder / ("tokenizer.json" if source.suffix == ".json" else "tokenizer.model"))
            for file in TOKENIZER_FILES[2:]:  # its folder's side files, when it has them
                if (source.parent / file).is_file():
                    shutil.copyfile(source.parent / file, folder / file)
        if not (folder / "tokenizer_config.json").is_file():
            _write_tokenizer_config(folder, config, chat_template, bos_id, eos_id)
    tokenizer, special, _ = tokenizer_from_hf_folder(folder)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > config.vocab_size:
        raise ValueError(f"{source or 'the byte-level tokenizer'}: {size} tokens do not fit the model's "
                         f"vocab_size {config.vocab_size} (--tokenizer)")
    return special


def _write_tokenizer_config(folder: Path, config: LlamaConfig, chat_template: str | None, bos_id: int | None,
                            eos_id: int | None) -> None:
    """tokenizer_config.json for a bare tokenizer file, as the real Llama checkpoints have it."""
    from tokenizers import Tokenizer

    if (folder / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        token_at = tokenizer.id_to_token
        settings: dict = {"tokenizer_class": "PreTrainedTokenizerFast"}
    else:
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        size = processor.get_piece_size()
        bos_id = bos_id if bos_id is not None and 0 <= bos_id < size else processor.bos_id()
        eos_id = eos_id if eos_id is not None and 0 <= eos_id < size else processor.eos_id()

        def token_at(i: int) -> str | None:
            return processor.id_to_piece(i) if 0 <= i < size else None

        settings = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                    "unk_token": token_at(processor.unk_id())}
    for key, index in (("bos_token", bos_id), ("eos_token", eos_id)):
        token = token_at(index) if index is not None and index >= 0 else None
        if token is not None:
            settings[key] = token
    settings |= {"model_max_length": config.max_position_embeddings, "clean_up_tokenization_spaces": False}
    if chat_template is not None:
        settings["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def _write_byte_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer with no merges: ChatML specials (ids 0-2) plus 256 byte tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(BYTE_SPECIALS)}
    vocab |= {ch: len(BYTE_SPECIALS) + i for i, ch in enumerate(sorted(alphabet))}
    if len(vocab) > vocab_size:
        raise ValueError(f"the byte-level tokenizer needs vocab_size >= {len(vocab)}, the config has {vocab_size}; "
                         f"pass --tokenizer")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in BYTE_SPECIALS])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
              "chat_template": CHATML_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

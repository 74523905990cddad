"""Lazy tensor sources: every loader answers `get(name)` with a float32 array in our layout.

Nothing is read until a tensor is asked for, so building part K of a model touches only the
bytes of part K's tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np

from ..config import LlamaConfig
from .errors import CheckpointError
from .names import IGNORED, gguf_to_canonical, hf_to_canonical
from .safetensors_reader import SafetensorsFile, read_into


class TensorSource(Protocol):
    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> np.ndarray: ...


class SafetensorsSource:
    """A Hugging Face folder with `model.safetensors` or sharded files and their index."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(index, f"not a safetensors index ({e})") from None
            shards = sorted(set(weight_map.values()))
        elif (folder / "model.safetensors").exists():
            shards = ["model.safetensors"]
        else:
            raise CheckpointError(folder, "no model.safetensors or model.safetensors.index.json")
        self._where: dict[str, tuple[SafetensorsFile, str]] = {}
        for shard in shards:
            path = folder / shard
            if not path.exists():
                raise CheckpointError(path, "missing shard listed in the safetensors index")
            file = SafetensorsFile(path)
            for hf_name in file.names():
                ours = hf_to_canonical(hf_name)
                if ours is not None:
                    self._where[ours] = (file, hf_name)
                elif not IGNORED.search(hf_name):
                    raise CheckpointError(path, f"unexpected tensor {hf_name!r} (not a Llama weight)")

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        file, hf_name = self._where[name]
        return file.shape(hf_name)

    def get(self, name: str) -> np.ndarray:
        file, hf_name = self._where[name]
        return file.read(hf_name)


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-RoPE row order so Q/K follow Hugging Face's rotate-half layout."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


class GGUFSource:
    """Tensors of a GGUF file, read and dequantized to float32 one at a time (not through a memory map)."""

    def __init__(self, path: Path, reader, config: LlamaConfig):  # reader: gguf.GGUFReader
        self.path = path
        self.config = config
        self._tensors = {}
        for tensor in reader.tensors:
            ours = gguf_to_canonical(tensor.name)
            if ours is not None:
                self._tensors[ours] = tensor
            elif not IGNORED.search(tensor.name):
                raise CheckpointError(path, f"unexpected tensor {tensor.name!r} (not a Llama weight)")

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[name].shape))

    def get(self, name: str) -> np.ndarray:
        from gguf import quants

        tensor = self._tensors[name]
        # Read the bytes into a fresh buffer rather than through the reader's memory map, whose touched
        # pages would stay resident: streaming every tensor would cost the whole file in RSS.
        raw = np.empty(tensor.data.shape, tensor.data.dtype)
        read_into(self.path, tensor.data_offset, raw)
        array = np.array(quants.dequantize(raw, tensor.tensor_type), dtype=np.float32)  # a fresh copy
        del raw
        array = array.reshape(self.shape(name))
        if name.endswith(".q_proj"):
            array = unpermute_rope_rows(array, self.config.num_heads)
        elif name.endswith(".k_proj"):
            array = unpermute_rope_rows(array, self.config.num_kv_heads)
        return np.ascontiguousarray(array)

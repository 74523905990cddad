"""Lazy tensor sources: every loader answers `get(name)` with a float32 array in our layout.

Nothing is read until a tensor is asked for, so building part K of a model touches only the
bytes of part K's tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from ..config import LlamaConfig
from ..files import read_json_object
from .errors import CheckpointError
from .gguf_file import GGUFFile
from .names import IGNORED, gguf_to_canonical, hf_to_canonical
from .safetensors_reader import FLOAT_DTYPES, SafetensorsFile


class TensorSource(Protocol):
    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> np.ndarray: ...


INDEX_FILE = "model.safetensors.index.json"


class SafetensorsSource:
    """A Hugging Face folder with `model.safetensors` or sharded files and their index."""

    def __init__(self, folder: Path):
        weight_map = _weight_map(folder / INDEX_FILE) if (folder / INDEX_FILE).exists() else None
        if weight_map is not None:
            shards = sorted(set(weight_map.values()))
        elif (folder / "model.safetensors").exists():
            shards = ["model.safetensors"]
        else:
            raise CheckpointError(folder, f"no model.safetensors or {INDEX_FILE}")
        self._where: dict[str, tuple[SafetensorsFile, str]] = {}
        found: dict[str, str] = {}  # HF name -> shard
        for shard in shards:
            path = folder / shard
            if not path.is_file():
                raise CheckpointError(path, "missing shard listed in the safetensors index")
            file = SafetensorsFile(path, FLOAT_DTYPES)
            for hf_name in file.names():
                if hf_name in found:
                    raise CheckpointError(path, f"tensor {hf_name!r} is also in {found[hf_name]}")
                found[hf_name] = shard
                ours = hf_to_canonical(hf_name)
                if ours is not None:
                    self._where[ours] = (file, hf_name)
                elif not IGNORED.search(hf_name):
                    raise CheckpointError(path, f"unexpected tensor {hf_name!r} (not a Llama weight)")
        for hf_name, shard in (weight_map or {}).items():
            if found.get(hf_name) != shard:
                raise CheckpointError(folder / INDEX_FILE, f"places {hf_name!r} in {shard}, which does not hold it")

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        file, hf_name = self._where[name]
        return file.shape(hf_name)

    def get(self, name: str) -> np.ndarray:
        file, hf_name = self._where[name]
        return file.read(hf_name)


def _weight_map(index: Path) -> dict[str, str]:
    """The index's tensor -> shard map, checked: shard names are plain file names in the folder."""
    data = read_json_object(index, "safetensors index", CheckpointError)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(index, "weight_map must be a non-empty object from tensor names to shard file names")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise CheckpointError(index, f"{shard!r} is not the name of a .safetensors file in this folder")
    return weight_map


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-RoPE row order so Q/K follow Hugging Face's rotate-half layout."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


class GGUFSource:
    """Tensors of a GGUF file, read and dequantized to float32 one at a time (not through a memory map)."""

    def __init__(self, file: GGUFFile, config: LlamaConfig):
        self.file = file
        self.config = config
        self._tensors: dict[str, str] = {}  # ours -> GGUF name
        for name in file.tensors:
            ours = gguf_to_canonical(name)
            if ours is not None:
                self._tensors[ours] = name
            elif not IGNORED.search(name):
                raise CheckpointError(file.path, f"unexpected tensor {name!r} (not a Llama weight)")

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file.tensors[self._tensors[name]].shape

    def get(self, name: str) -> np.ndarray:
        array = self.file.read(self._tensors[name])
        if name.endswith(".q_proj"):
            array = unpermute_rope_rows(array, self.config.num_heads)
        elif name.endswith(".k_proj"):
            array = unpermute_rope_rows(array, self.config.num_kv_heads)
        return np.ascontiguousarray(array)

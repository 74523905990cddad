"""The quantized checkpoint on disk: `quantization.json` (config, recipe, weight index, activation encodings,
calibration record), integer codes and scales in safetensors (one file per layer as they are made, 4-bit codes
packed two per byte), and the attention sink; and the float view of it that the simulated model reads.

The algorithm that makes one is `quantize_model`; this module is only the format.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..attention_sink import SINK_FILE, AttentionSink
from ..config import LlamaConfig
from ..files import FileError, folder_lock, make_staging_folder, read_versioned_json, replace_folder
from ..loading import TensorSource
from ..loading.names import is_norm
from ..loading.safetensors_reader import SafetensorsFile, write_safetensors
from .encodings import ActivationEncoding, quantized_norm_weight
from .quantizers import QuantizedWeight, dequantize, pack_int4, unpack_int4
from .recipe import Recipe

QUANTIZED_FORMAT = "ondevice-llama-quantized"
QUANTIZED_VERSION = 7  # 3: the attention sink; 4: its K/V quantized as cache entries; 5: values' own cache tap;
# 6: 16-bit norm weights where norm outputs are quantized (the sink and encodings computed with them); 7: norm
# inputs quantized, not the residual stream (taps attn_input, mlp_input, norm_input)

class QuantizedWeights(Mapping[str, QuantizedWeight]):
    """Quantized weights on disk, one safetensors file per layer, read one tensor at a time.

    4-bit codes are stored packed two per byte, so a 7B model takes about half its int8 size.
    """

    def __init__(self, folder: Path, index: dict[str, dict]):
        self.folder, self.index = Path(folder), index
        self._files: dict[str, SafetensorsFile] = {}

    def __getitem__(self, name: str) -> QuantizedWeight:
        info = self.index[name]
        file = self._files.get(info["file"])
        if file is None:
            file = self._files[info["file"]] = SafetensorsFile(self.folder / info["file"])
        codes = np.array(file.read_raw(f"{name}.codes"))
        if info["bits"] == 4:
            codes = unpack_int4(codes, tuple(info["shape"]))
        return QuantizedWeight(codes, file.read(f"{name}.scales"), None, info["bits"], info["group_size"],
                               info["max_error"])

    def __contains__(self, name: object) -> bool:
        return name in self.index  # without reading the tensor, as Mapping's default would

    def __iter__(self):
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


def _index(index: dict[str, dict]) -> dict[str, dict]:
    """The weights index of quantization.json, checked: plain file names, 4 or 8 bits, a shape."""
    for name, info in index.items():
        if not (isinstance(info["file"], str) and Path(info["file"]).name == info["file"]
                and info["bits"] in (4, 8) and isinstance(info["shape"], list)):
            raise ValueError(f"weight {name}: bad index entry {info!r}")
    return index


def _write_weights(folder: Path, file: str, weights: dict[str, QuantizedWeight]) -> dict[str, dict]:
    """Write one file of quantized weights; return their index entries."""
    tensors, index = {}, {}
    for name, q in weights.items():
        tensors[f"{name}.codes"] = pack_int4(q.codes) if q.bits == 4 else q.codes
        tensors[f"{name}.scales"] = q.scales
        index[name] = {"file": file, "bits": q.bits, "group_size": q.group_size, "shape": list(q.codes.shape),
                       "max_error": q.max_error}
    write_safetensors(folder / file, tensors)
    return index


@dataclass
class QuantizedModel:
    """Integer weights and activation encodings: everything export and simulation need beyond the checkpoint."""

    config: LlamaConfig
    recipe: Recipe
    weights: Mapping[str, QuantizedWeight]
    activations: dict[str, ActivationEncoding]
    calibration: dict = field(default_factory=dict)  # what the encodings were calibrated on
    source: str = ""  # the float checkpoint it was quantized from
    attention_sink: AttentionSink | None = None  # position 0 of every sequence, in float (attention_sink.py)

    def dequantized(self, name: str) -> np.ndarray:
        q = self.weights[name]
        return dequantize(q.codes, q.scales, q.zero_points, q.group_size)

    def save(self, folder: Path) -> Path:
        """A reusable quantized checkpoint: `quantization.json` plus integer codes and scales in safetensors."""
        folder = Path(folder)
        with folder_lock(folder):
            tmp = make_staging_folder(folder)
            try:
                index = _write_weights(tmp, "weights.safetensors", dict(self.weights))
                write_meta(tmp, self, index)
                replace_folder(tmp, folder)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return folder

    @classmethod
    def load(cls, folder: Path | str) -> QuantizedModel:
        """Read a quantized checkpoint; a damaged or malformed one is a one-line error naming the file."""
        folder = Path(folder)
        path = folder / "quantization.json"
        meta = read_versioned_json(path, QUANTIZED_FORMAT, QUANTIZED_VERSION, "quantized checkpoint")
        try:
            config = LlamaConfig.from_dict(meta["config"])
            activations = {n: ActivationEncoding.from_dict(e) for n, e in meta["activations"].items()}
            model = cls(config, Recipe.from_dict(meta["recipe"]), QuantizedWeights(folder, _index(meta["weights"])),
                        activations, meta.get("calibration", {}), meta.get("source", ""))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FileError(path, f"malformed quantized checkpoint ({type(e).__name__}: {e})") from None
        if (folder / SINK_FILE).exists():
            shape = (config.num_layers, config.num_kv_heads, config.head_dim)
            model.attention_sink = AttentionSink.load(folder / SINK_FILE, shape, config.vocab_size)
        return model


def write_meta(folder: Path, model: QuantizedModel, index: dict[str, dict]) -> None:
    """Everything but the weight files: `quantization.json` and the attention sink, if any."""
    meta = {"format": QUANTIZED_FORMAT, "format_version": QUANTIZED_VERSION, "source": model.source,
            "config": model.config.to_dict(), "recipe": model.recipe.to_dict(), "calibration": model.calibration,
            "weights": index, "activations": {n: e.to_dict() for n, e in model.activations.items()}}
    (folder / "quantization.json").write_text(json.dumps(meta, indent=2))
    if model.attention_sink is not None:
        model.attention_sink.save(folder / SINK_FILE)


class QuantizedSource:
    """The checkpoint's tensors with every quantized weight replaced by its dequantized codes, and the weight of
    every norm whose output is quantized by its 16-bit round trip (as the export holds it)."""

    def __init__(self, source: TensorSource, quantized: QuantizedModel):
        self.source, self.quantized = source, quantized

    def names(self) -> list[str]:
        return self.source.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(name)

    def get(self, name: str) -> np.ndarray:
        if name in self.quantized.weights:
            return self.quantized.dequantized(name)
        if is_norm(name) and name in self.quantized.activations:  # a quantized norm: its weight is, too
            return quantized_norm_weight(self.source.get(name))
        return self.source.get(name)


class WeightStore:
    """Where quantized weights go: kept in memory, or written to `folder` one file per layer as they come."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.memory: dict[str, QuantizedWeight] = {}
        self.index: dict[str, dict] = {}

    def add(self, file: str, weights: dict[str, QuantizedWeight]) -> None:
        if self.folder is None:
            self.memory |= weights
        else:
            self.index |= _write_weights(self.folder, file, weights)

    def mapping(self) -> Mapping[str, QuantizedWeight]:
        return self.memory if self.folder is None else QuantizedWeights(self.folder, self.index)

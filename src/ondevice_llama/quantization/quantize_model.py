"""Quantize a whole model layer by layer: weights (RTN or GPTQ) and activation encodings.

Only one decoder layer is ever built in memory. Calibration hidden states flow through the layers in
turn: each layer first runs in float to collect its input Hessians, is quantized, then runs again
(quantized) to observe its activation ranges and to produce the next layer's inputs, so later layers
calibrate against the errors of earlier ones, as GPTQ prescribes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..attention_sink import SINK_FILE, AttentionSink
from ..config import LlamaConfig
from ..files import FileError, folder_lock, make_staging_folder, read_versioned_json, replace_folder
from ..loading import Checkpoint, TensorSource
from ..loading.names import PROJECTIONS, is_norm
from ..loading.safetensors_reader import SafetensorsFile, write_safetensors
from ..memory import release_free_memory
from ..model.reference import Block, build_block, causal_mask, rms_norm, rope_cos_sin
from .calibration import FakeQuantTap, RangeObserver, encodings_from_ranges
from .encodings import ActivationEncoding, quantized_norm_weight
from .gptq import FactorCache, gptq_quantize
from .hessian import SHARED_INPUT, gram, layer_hessians
from .quantizers import QuantizedWeight, dequantize, pack_int4, quantize_weight, unpack_int4
from .recipe import Recipe

QUANTIZED_FORMAT = "ondevice-llama-quantized"
QUANTIZED_VERSION = 5  # 3: the attention sink; 4: its K/V quantized as cache entries; 5: values' own cache tap
_LAST_READER = ("v_proj", "o_proj", "up_proj", "down_proj")  # after these, their input's Hessian is freed


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
                _write_meta(tmp, self, index)
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


def _write_meta(folder: Path, model: QuantizedModel, index: dict[str, dict]) -> None:
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


def quantize_with_recipe(weight: np.ndarray, bits: int, recipe: Recipe, hessian: torch.Tensor | None,
                         factors: FactorCache | None = None) -> QuantizedWeight:
    """`weight` at `bits` with the recipe's algorithm: GPTQ when it says so and a Hessian is given, else RTN.
    `factors`: shared by the projections of one layer, which share Hessians (`gptq.FactorCache`)."""
    if recipe.algorithm == "gptq" and hessian is not None:
        return gptq_quantize(weight, hessian, bits, recipe.block_size, damp=recipe.damp, act_order=recipe.act_order,
                             clip_search=recipe.clip_search, factors=factors)
    return quantize_weight(weight, bits, recipe.block_size)


class _SinkPass:
    """Position 0 alone, carried layer by layer beside the calibration pass and computed as the simulated
    model computes it (`FakeQuantTap(float_first=True)`): activations in float, but its keys and values
    quantized with the layer's just-calibrated encodings, as the KV cache holds every entry."""

    def __init__(self, config: LlamaConfig, token: int, embedding: torch.Tensor):
        self.config, self.token = config, token
        self.hidden = embedding[None, None]  # [1, 1, hidden]
        self.rope = rope_cos_sin(config, torch.arange(1))
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def run_layer(self, block: Block, layer: int, encodings: dict[str, ActivationEncoding]) -> None:
        quantize = FakeQuantTap(encodings, float_first=True)

        def tap(name: str, x: torch.Tensor) -> torch.Tensor:
            y = quantize(name, x)
            if name.endswith(".k_rope"):  # [1, kv_heads, 1, head_dim]
                self.keys.append(y[0, :, 0])
            elif name.endswith(".v_cache"):  # [1, 1, kv_heads * head_dim]
                self.values.append(y[0, 0])
            return y

        block.set_tap(tap, f"layers.{layer}.")
        with torch.no_grad():
            self.hidden = block(self.hidden, *self.rope, torch.zeros(1, 1), None)

    def result(self, norm: torch.Tensor, head: torch.Tensor) -> AttentionSink:
        c = self.config
        shape = (c.num_layers, c.num_kv_heads, c.head_dim)
        logits = rms_norm(self.hidden[0, 0], norm, c.rms_norm_eps) @ head.T
        return AttentionSink(self.token, torch.stack(self.keys).reshape(shape).numpy(),
                             torch.stack(self.values).reshape(shape).numpy(), logits.numpy())


class _WeightSink:
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


def dequantized_tensor(q: QuantizedWeight) -> torch.Tensor:
    """A symmetric quantized weight's float values, as a tensor."""
    return torch.from_numpy(dequantize(q.codes, q.scales, None, q.group_size))


def quantize_model(checkpoint: Checkpoint, recipe: Recipe, calibration: torch.Tensor, progress: bool = True,
                   out: Path | str | None = None, calibration_info: dict | None = None,
                   sink_token: int | None = None) -> QuantizedModel:
    """calibration: [rows, length] token ids (see calibration.pack_sequences).

    With `sink_token`, every calibration row starts with it: position 0 is left out of the activation
    encodings and the Hessians; computed alone, in float but for its K/V cache entries, it becomes the model's
    attention sink.

    With `out`, each layer's weights are written there as soon as they are quantized (so memory holds one
    layer, whatever the model size) and the folder becomes a quantized checkpoint that `QuantizedModel.load`
    reads; without it, everything stays in memory.
    """
    if out is None:
        return _quantize_model(checkpoint, recipe, calibration, progress, None, calibration_info, sink_token)
    with folder_lock(out):
        return _quantize_model(checkpoint, recipe, calibration, progress, Path(out), calibration_info, sink_token)


def _quantize_model(checkpoint: Checkpoint, recipe: Recipe, calibration: torch.Tensor, progress: bool,
                    out: Path | None, calibration_info: dict | None, sink_token: int | None) -> QuantizedModel:
    """`quantize_model`, holding the lock on `out` when there is one."""
    c, tensors = checkpoint.config, checkpoint.tensors
    tmp = make_staging_folder(out) if out is not None else None
    try:
        store = _WeightSink(tmp)
        if sink_token is not None and not bool((calibration[:, 0] == sink_token).all()):
            raise ValueError(f"every calibration row must start with the attention sink token {sink_token}")
        observer = RangeObserver(skip_first=sink_token is not None)
        embed_q = quantize_weight(tensors.get("embed_tokens"), recipe.bits_for("embed_tokens"), recipe.block_size)
        embed = dequantized_tensor(embed_q)
        sink_pass = None if sink_token is None else _SinkPass(c, sink_token, embed[sink_token])
        hidden = observer("embed", embed[calibration])
        length = calibration.shape[1]
        cos, sin = rope_cos_sin(c, torch.arange(length))
        mask = causal_mask(torch.arange(length), length, torch.float32)
        for layer in tqdm(range(c.num_layers), desc=f"quantize ({recipe.algorithm})", unit="layer",
                          disable=not progress, dynamic_ncols=True):
            hessians = {}
            if recipe.algorithm == "gptq":  # float layer inputs; the float block is freed right after
                hessians = layer_hessians(build_block(c, tensors, layer), hidden, cos, sin, mask,
                                          sink_token is not None)
            layer_weights, factors = {}, FactorCache()
            for proj in PROJECTIONS:
                name = f"layers.{layer}.{proj}"
                key = SHARED_INPUT[proj]
                hessian = hessians.pop(key, None) if proj in _LAST_READER else hessians.get(key)
                layer_weights[name] = quantize_with_recipe(tensors.get(name), recipe.bits_for(name), recipe, hessian,
                                                           factors)
            block = build_block(c, tensors, layer, {n: dequantized_tensor(q).numpy() for n, q in layer_weights.items()})
            store.add(f"layer_{layer:03d}.safetensors", layer_weights)
            del layer_weights
            block.set_tap(observer, f"layers.{layer}.")
            with torch.no_grad():
                hidden = block(hidden, cos, sin, mask, None)
            if sink_pass is not None:  # this layer's encodings are final now
                prefix = f"layers.{layer}."
                layer_ranges = {n: r for n, r in observer.ranges.items() if n.startswith(prefix)}
                sink_pass.run_layer(block, layer, encodings_from_ranges(layer_ranges, recipe.activation_bits_for))
            del block
            release_free_memory()
        normed = observer("norm", rms_norm(hidden, torch.from_numpy(tensors.get("norm")), c.rms_norm_eps))
        head_weights = {"embed_tokens": embed_q}
        if c.tie_word_embeddings:
            head = embed
        else:
            hessian = gram(normed.double()) if recipe.algorithm == "gptq" else None
            head_weights["lm_head"] = quantize_with_recipe(tensors.get("lm_head"), recipe.bits_for("lm_head"), recipe,
                                                       hessian)
            head = dequantized_tensor(head_weights["lm_head"])
        with torch.no_grad():
            for row in normed:  # one row at a time: all rows' logits at once can take gigabytes
                observer("logits", row @ head.T)
        store.add("head.safetensors", head_weights)
        encodings = encodings_from_ranges(observer.ranges, recipe.activation_bits_for)
        info = calibration_info or {"rows": int(calibration.shape[0]), "length": int(calibration.shape[1])}
        attention_sink = None if sink_pass is None else sink_pass.result(torch.from_numpy(tensors.get("norm")), head)
        model = QuantizedModel(c, recipe, store.mapping(), encodings, info, str(checkpoint.path), attention_sink)
        if tmp is None:
            return model
        _write_meta(tmp, model, store.index)
        replace_folder(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return QuantizedModel.load(out)

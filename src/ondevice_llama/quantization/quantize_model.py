"""Quantize a whole model layer by layer: weights (RTN or GPTQ) and activation encodings.

Only one decoder layer is ever built in memory. Calibration hidden states flow through the layers in
turn: each layer first runs in float to collect its input Hessians, is quantized, then runs again
(quantized) to observe its activation ranges and to produce the next layer's inputs, so later layers
calibrate against the errors of earlier ones, as GPTQ prescribes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import LlamaConfig
from ..files import make_staging_folder, read_versioned_json, replace_folder
from ..loading import Checkpoint, TensorSource
from ..loading.names import LAYER_TENSORS
from ..loading.safetensors_reader import SafetensorsFile, write_safetensors
from ..model.reference import Block, rms_norm, rope_cos_sin
from .calibration import RangeObserver, encodings_from_ranges
from .encodings import ActivationEncoding
from .gptq import gptq_quantize
from .quantizers import QuantizedWeight, dequantize, quantize_weight
from .recipe import Recipe

QUANTIZED_FORMAT = "ondevice-llama-quantized"
QUANTIZED_VERSION = 1
PROJECTIONS = LAYER_TENSORS[1:5] + LAYER_TENSORS[6:]  # q k v o gate up down
# Projections that read the same input share one Hessian.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
SHARED_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
                "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}


@dataclass
class QuantizedModel:
    """Integer weights and activation encodings: everything export and simulation need beyond the checkpoint."""

    config: LlamaConfig
    recipe: Recipe
    weights: dict[str, QuantizedWeight]
    activations: dict[str, ActivationEncoding]

    def dequantized(self, name: str) -> np.ndarray:
        q = self.weights[name]
        return dequantize(q.codes, q.scales, q.zero_points, q.group_size)

    def save(self, folder: Path, source: str = "") -> Path:
        """A reusable quantized checkpoint: `quantization.json` plus integer codes and scales in safetensors."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_staging_folder(folder)
        tensors = {}
        for name, q in self.weights.items():
            tensors[f"{name}.codes"] = q.codes
            tensors[f"{name}.scales"] = q.scales
        write_safetensors(tmp / "weights.safetensors", tensors)
        meta = {"format": QUANTIZED_FORMAT, "format_version": QUANTIZED_VERSION, "source": source,
                "config": self.config.to_dict(), "recipe": self.recipe.to_dict(),
                "weights": {n: {"bits": q.bits, "group_size": q.group_size, "max_error": q.max_error}
                            for n, q in self.weights.items()},
                "activations": {n: e.to_dict() for n, e in self.activations.items()}}
        (tmp / "quantization.json").write_text(json.dumps(meta, indent=2))
        replace_folder(tmp, folder)
        return folder

    @classmethod
    def load(cls, folder: Path | str) -> QuantizedModel:
        folder = Path(folder)
        meta = read_versioned_json(folder / "quantization.json", QUANTIZED_FORMAT, QUANTIZED_VERSION,
                                   "quantized checkpoint")
        tensors = SafetensorsFile(folder / "weights.safetensors")
        weights = {}
        for name, info in meta["weights"].items():
            codes = tensors.read_raw(f"{name}.codes")
            weights[name] = QuantizedWeight(codes, tensors.read(f"{name}.scales"), None, info["bits"],
                                            info["group_size"], info["max_error"])
        activations = {n: ActivationEncoding.from_dict(e) for n, e in meta["activations"].items()}
        return cls(LlamaConfig.from_dict(meta["config"]), Recipe.from_dict(meta["recipe"]), weights, activations)


class QuantizedSource:
    """The checkpoint's tensors with every quantized weight replaced by its dequantized codes."""

    def __init__(self, source: TensorSource, quantized: QuantizedModel):
        self.source, self.quantized = source, quantized

    def names(self) -> list[str]:
        return self.source.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(name)

    def get(self, name: str) -> np.ndarray:
        return self.quantized.dequantized(name) if name in self.quantized.weights else self.source.get(name)


def _quantize_weight(weight: np.ndarray, bits: int, recipe: Recipe, hessian: torch.Tensor | None) -> QuantizedWeight:
    if recipe.algorithm == "gptq" and hessian is not None:
        return gptq_quantize(weight, hessian, bits, recipe.block_size)
    return quantize_weight(weight, bits, recipe.block_size)


def _linear(block: Block, proj: str) -> torch.nn.Linear:
    return getattr(block.attention if proj in ATTENTION_PROJECTIONS else block.mlp, proj)


def _load_block(config: LlamaConfig, tensors: TensorSource, layer: int, weights=None) -> Block:
    """One decoder layer with float weights, or with the given (dequantized) ones."""
    block = Block(config)
    for tensor in LAYER_TENSORS:
        name = f"layers.{layer}.{tensor}"
        value = torch.from_numpy(weights[name] if weights and name in weights else tensors.get(name))
        target = getattr(block, tensor) if tensor.endswith("norm") else _linear(block, tensor).weight
        target.data = value
    return block.eval()


def _hessians(block: Block, hidden: torch.Tensor, cos, sin, mask) -> dict[str, torch.Tensor]:
    """Sum of x^T x over every calibration position, for each distinct projection input."""
    sums: dict[str, torch.Tensor] = {}

    def accumulate(key: str):
        def hook(_module, args) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + x.T @ x
        return hook

    readers = {key: proj for proj, key in reversed(SHARED_INPUT.items())}  # one reader per input
    hooks = [_linear(block, proj).register_forward_pre_hook(accumulate(key)) for key, proj in readers.items()]
    with torch.no_grad():
        block(hidden, cos, sin, mask, None)
    for hook in hooks:
        hook.remove()
    return sums


def quantize_model(checkpoint: Checkpoint, recipe: Recipe, calibration: torch.Tensor,
                   progress: bool = True) -> QuantizedModel:
    """calibration: [rows, length] token ids (see calibration.pack_sequences)."""
    c, tensors = checkpoint.config, checkpoint.tensors
    weights: dict[str, QuantizedWeight] = {}
    observer = RangeObserver()
    weights["embed_tokens"] = quantize_weight(tensors.get("embed_tokens"), recipe.bits_for("embed_tokens"),
                                              recipe.block_size)
    embed = torch.from_numpy(dequantize(weights["embed_tokens"].codes, weights["embed_tokens"].scales, None,
                                        weights["embed_tokens"].group_size))
    hidden = observer("embed", embed[calibration])
    length = calibration.shape[1]
    cos, sin = rope_cos_sin(c, torch.arange(length))
    allowed = torch.arange(length)[None, :] <= torch.arange(length)[:, None]
    mask = torch.zeros(length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)
    for layer in tqdm(range(c.num_layers), desc=f"quantize ({recipe.algorithm})", unit="layer",
                      disable=not progress, dynamic_ncols=True):
        block = _load_block(c, tensors, layer)
        hessians = _hessians(block, hidden, cos, sin, mask) if recipe.algorithm == "gptq" else {}
        layer_weights = {}
        for proj in PROJECTIONS:
            name = f"layers.{layer}.{proj}"
            weights[name] = _quantize_weight(tensors.get(name), recipe.bits_for(name), recipe,
                                             hessians.get(SHARED_INPUT[proj]))
            q = weights[name]
            layer_weights[name] = dequantize(q.codes, q.scales, None, q.group_size)
        block = _load_block(c, tensors, layer, layer_weights)
        block.set_tap(observer, f"layers.{layer}.")
        with torch.no_grad():
            hidden = block(hidden, cos, sin, mask, None)
    normed = observer("norm", rms_norm(hidden, torch.from_numpy(tensors.get("norm")), c.rms_norm_eps))
    if c.tie_word_embeddings:
        head = embed
    else:
        x = normed.reshape(-1, c.hidden_size).double()
        hessian = x.T @ x if recipe.algorithm == "gptq" else None
        weights["lm_head"] = _quantize_weight(tensors.get("lm_head"), recipe.bits_for("lm_head"), recipe, hessian)
        head = torch.from_numpy(dequantize(weights["lm_head"].codes, weights["lm_head"].scales, None,
                                           weights["lm_head"].group_size))
    with torch.no_grad():
        observer("logits", normed @ head.T)
    encodings = encodings_from_ranges(observer.ranges, recipe.activation_bits_for)
    return QuantizedModel(c, recipe, weights, encodings)

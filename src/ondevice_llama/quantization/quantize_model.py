"""Quantize a whole model layer by layer: weights (RTN or GPTQ) and activation encodings.

Only one decoder layer is ever built in memory. Calibration hidden states flow through the layers in
turn: each layer first runs in float to collect its input Hessians, is quantized, then runs again
(quantized) to observe its activation ranges and to produce the next layer's inputs, so later layers
calibrate against the errors of earlier ones, as GPTQ prescribes. What it writes is a quantized checkpoint
(`quantized_checkpoint.py`, the format).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..attention_sink import AttentionSink
from ..config import LlamaConfig
from ..files import folder_lock, make_staging_folder, replace_folder
from ..loading import Checkpoint, TensorSource
from ..loading.names import NORMS, PROJECTIONS
from ..memory import release_free_memory
from ..model.reference import Block, build_block, causal_mask, rms_norm, rope_cos_sin
from .encodings import ActivationEncoding, quantized_norm_weight
from .gptq import FactorCache, gptq_quantize
from .hessian import INPUT_ORDER, SHARED_INPUT, gram, input_statistics, layer_hessians
from .observers import OUTLIER_FRACTION_8_BIT, FakeQuantTap, RangeObserver, encodings_from_ranges
from .quantized_checkpoint import QuantizedModel, WeightStore, write_meta
from .quantizers import QuantizedWeight, dequantize, quantize_weight
from .recipe import Recipe
from .rotation import checkpoint_for

_LAST_READER = ("v_proj", "o_proj", "up_proj", "down_proj")  # after these, their input's Hessian is freed


def quantize_with_recipe(weight: np.ndarray, bits: int, recipe: Recipe, hessian: torch.Tensor | None,
                         factors: FactorCache | None = None, cross: torch.Tensor | None = None) -> QuantizedWeight:
    """`weight` at `bits` with the recipe's algorithm: GPTQ when it says so and a Hessian is given, else RTN.
    `factors`: shared by the projections of one layer, which share Hessians (`gptq.FactorCache`); `cross`:
    asymmetric calibration's cross products (`gptq.gptq_quantize`)."""
    if recipe.algorithm == "gptq" and hessian is not None:
        return gptq_quantize(weight, hessian, bits, recipe.block_size, damp=recipe.damp, act_order=recipe.act_order,
                             clip_search=recipe.clip_search, factors=factors, refit=recipe.refit_scales,
                             scale_bits=recipe.scale_bits_for(bits), cross=cross)
    return quantize_weight(weight, bits, recipe.block_size, scale_bits=recipe.scale_bits_for(bits))


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


def _norm_weights(tensors: TensorSource, recipe: Recipe, layer: int | None = None) -> dict[str, np.ndarray]:
    """The norm weights of `layer` (or the final norm) as the export holds them: 16-bit where their outputs are
    quantized (`quantized_norm_weight`), so that the quantized layers run here as the simulated model runs them."""
    names = ["norm"] if layer is None else [f"layers.{layer}.{norm}" for norm in NORMS]
    return {n: quantized_norm_weight(tensors.get(n)) for n in names if recipe.activation_bits_for(n) is not None}


def _gptq_layer(checkpoint: Checkpoint, recipe: Recipe, layer: int, hidden: torch.Tensor,
                rope_and_mask: tuple[torch.Tensor, ...], skip_first: bool) -> dict[str, QuantizedWeight]:
    """`layer`'s projections quantized by the recipe, GPTQ on the float layer's inputs for `hidden`."""
    c, tensors = checkpoint.config, checkpoint.tensors
    hessians = {}
    if recipe.algorithm == "gptq":  # the float block is freed right after
        hessians = layer_hessians(build_block(c, tensors, layer), hidden, *rope_and_mask, skip_first)
    layer_weights, factors = {}, FactorCache()
    for proj in PROJECTIONS:
        name, key = f"layers.{layer}.{proj}", SHARED_INPUT[proj]
        hessian = hessians.pop(key, None) if proj in _LAST_READER else hessians.get(key)
        layer_weights[name] = quantize_with_recipe(tensors.get(name), recipe.bits_for(name), recipe, hessian, factors)
    return layer_weights


def _asymmetric_layer(checkpoint: Checkpoint, recipe: Recipe, layer: int, hidden: torch.Tensor, target: torch.Tensor,
                      rope_and_mask: tuple[torch.Tensor, ...],
                      skip_first: bool) -> tuple[dict[str, QuantizedWeight], torch.Tensor]:
    """`layer`'s projections by GPTQ with asymmetric calibration (GPTAQ, as far as the recipe says), and the
    float model's next hidden states after `target`. The projections go in the order the block reads their
    inputs, each group's inputs taken from the block with the groups before it quantized: had o_proj seen the
    float block's attention output instead, it would compensate again what q/k/v_proj already did (measured:
    perplexity 17,693 on 2,048 wikitext tokens)."""
    c, tensors = checkpoint.config, checkpoint.tensors
    float_block = build_block(c, tensors, layer)
    layer_weights, dequantized, factors = {}, {}, FactorCache()
    for key in INPUT_ORDER:
        block = build_block(c, tensors, layer, dequantized | _norm_weights(tensors, recipe, layer))
        hessian, cross, output = input_statistics(block, float_block, key, hidden, target, *rope_and_mask,
                                                  skip_first)
        cross = hessian + recipe.asymmetric_calibration * (cross - hessian)  # aim part way to the float model
        for proj in (p for p in PROJECTIONS if SHARED_INPUT[p] == key):
            name = f"layers.{layer}.{proj}"
            layer_weights[name] = quantize_with_recipe(tensors.get(name), recipe.bits_for(name), recipe, hessian,
                                                       factors, cross)
            dequantized[name] = dequantized_tensor(layer_weights[name]).numpy()
    return layer_weights, output


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

    A recipe with a rotation quantizes the rotated model (`rotation.checkpoint_for`), whose config it records.
    """
    checkpoint = checkpoint_for(checkpoint, recipe)
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
        store = WeightStore(tmp)
        if sink_token is not None and not bool((calibration[:, 0] == sink_token).all()):
            raise ValueError(f"every calibration row must start with the attention sink token {sink_token}")
        observer = RangeObserver(skip_first=sink_token is not None,
                                 outlier_fraction=OUTLIER_FRACTION_8_BIT if recipe.activation_bits == 8 else 0.0)
        embed_q = quantize_weight(tensors.get("embed_tokens"), recipe.bits_for("embed_tokens"), recipe.block_size)
        embed = dequantized_tensor(embed_q)
        sink_pass = None if sink_token is None else _SinkPass(c, sink_token, embed[sink_token])
        hidden = observer("embed", embed[calibration])
        asymmetric = recipe.algorithm == "gptq" and recipe.asymmetric_calibration > 0
        target = torch.from_numpy(tensors.get("embed_tokens"))[calibration] if asymmetric else None
        length = calibration.shape[1]
        cos, sin = rope_cos_sin(c, torch.arange(length))
        mask = causal_mask(torch.arange(length), length, torch.float32)
        for layer in tqdm(range(c.num_layers), desc=f"quantize ({recipe.algorithm})", unit="layer",
                          disable=not progress, dynamic_ncols=True):
            if asymmetric:  # the float model's hidden states move on beside the quantized model's
                layer_weights, target = _asymmetric_layer(checkpoint, recipe, layer, hidden, target, (cos, sin, mask),
                                                          sink_token is not None)
            else:
                layer_weights = _gptq_layer(checkpoint, recipe, layer, hidden, (cos, sin, mask), sink_token is not None)
            weights = {n: dequantized_tensor(q).numpy() for n, q in layer_weights.items()}
            block = build_block(c, tensors, layer, weights | _norm_weights(tensors, recipe, layer))
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
        norm = torch.from_numpy(_norm_weights(tensors, recipe).get("norm", tensors.get("norm")))
        normed = observer("norm", rms_norm(observer("norm_input", hidden), norm, c.rms_norm_eps))
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
        attention_sink = None if sink_pass is None else sink_pass.result(norm, head)
        model = QuantizedModel(c, recipe, store.mapping(), encodings, info, str(checkpoint.path), attention_sink)
        if tmp is None:
            return model
        write_meta(tmp, model, store.index)
        replace_folder(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return QuantizedModel.load(out)

"""How much host memory an export will need at its peak, checked before it starts.

An export runs in phases, and only one layer's tensors are in memory at a time in each; the peak is the
largest phase. The estimate is the sum of what each phase holds, from the configuration alone:

- calibration text (GPTQ on models up to 2B): the whole float model generating text;
- quantize (npu quantized precisions): the dequantized embedding kept for calibration, plus either one
  layer (float copy, codes, the biggest projection's quantizer temporaries, GPTQ's Hessians) or the
  embedding / LM head being quantized;
- export: one layer's weights as the graph builder slices them, plus the embedding and LM head.

Each phase also pays the baseline (Python, torch, onnx and ONNX Runtime loaded). The factors below were
fitted to measured peaks (README: memory check) on the default model and on synthetic Llama-2-7B shapes,
rounded up: an estimate that is too low is a bug, one that is far too high refuses exports that fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import LlamaConfig
from ..loading.names import PROJECTIONS, num_parameters, tensor_shape
from ..memory import available_bytes
from ..quantization.recipe import Recipe

if TYPE_CHECKING:
    from .plan import ExportPlan

GB = 1e9
BASELINE = 0.38 * GB  # interpreter with torch, onnx, onnxruntime and numpy loaded, checkpoint opened
F32 = 4
QUANTIZER_TEMPORARIES = 4  # float copies a round-to-nearest quantizer holds at once, per weight element
ALLOCATOR_GROWTH = 0.06
CALIBRATION_ROW = 256  # tokens per calibration row (quantization.pipeline.CALIBRATION_LENGTH)
GPTQ_TEMPORARIES = 3  # [in, in] float64 matrices GPTQ holds at once (Hessian, its inverse, Cholesky factor)


@dataclass(frozen=True)
class MemoryEstimate:
    phases: dict[str, float]  # phase -> peak bytes

    @property
    def peak_bytes(self) -> float:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def describe(self) -> str:
        return ", ".join(f"{name} {value / GB:.1f} GB" for name, value in self.phases.items())


def _layer_sizes(c: LlamaConfig) -> tuple[int, int]:
    """(elements of one decoder layer's projections, elements of its largest projection)."""
    sizes = [math.prod(tensor_shape(c, p)) for p in PROJECTIONS]
    return sum(sizes), max(sizes)


def estimate_export_memory(config: LlamaConfig, target: str, precision: str, recipe: Recipe | None,
                           generated_calibration: bool, quantize: bool, calibration_tokens: int = 1024
                           ) -> MemoryEstimate:
    """Peak bytes per phase of an export with these (resolved) settings; `quantize` False when a quantized
    checkpoint is given (or the cache has it), so the quantize phases are skipped. `calibration_tokens`:
    how many tokens calibration runs through each layer at once."""
    c = config
    layer, largest = _layer_sizes(c)
    table = c.vocab_size * c.hidden_size  # embedding (and untied LM head) elements
    heads = 1 if c.tie_word_embeddings else 2
    phases: dict[str, float] = {}
    if target == "npu" and recipe is not None and quantize:
        if generated_calibration:
            phases["calibration text"] = BASELINE + F32 * num_parameters(c) * 1.1
        kept = F32 * table  # the dequantized embedding, kept for calibration and a tied head
        head = F32 * table * (QUANTIZER_TEMPORARIES + (heads - 1))
        # A layer's activations on all calibration tokens: scores and probabilities per head, the MLP's
        # intermediate tensors, hidden states.
        row = CALIBRATION_ROW
        # Measured on the default model (13,056 tokens): 1.16 GB above the layer's start, and the whole GPTQ
        # export peaking at 1.98 GB, which 6 scores-sized tensors per head underestimated by 5% (7: +1%).
        activations = F32 * calibration_tokens * (7 * c.num_heads * row + 4 * c.intermediate_size + 6 * c.hidden_size)
        one_layer = F32 * layer + layer + F32 * QUANTIZER_TEMPORARIES * largest + activations
        if recipe.algorithm == "gptq":
            inputs = (2 * c.hidden_size**2 + (c.num_heads * c.head_dim) ** 2 + c.intermediate_size**2)
            widest = max(c.hidden_size, c.intermediate_size)
            one_layer = max(one_layer, F32 * layer) + 8 * inputs + 8 * GPTQ_TEMPORARIES * widest**2
        # RSS grows over the run by a few percent of one float layer per layer. Measured on the synthetic
        # 7B: 1.0 GB over 32 layers, then 1.4 GB (45 MB a layer) even with the heap trimmed after each layer
        # (which does flatten the default model's), so the cause is not only glibc's free lists.
        growth = ALLOCATOR_GROWTH * c.num_layers * F32 * layer
        phases["quantize"] = BASELINE + kept + max(head, one_layer) + growth
    if target == "npu" and recipe is not None:
        phases["export"] = BASELINE + 3 * layer + 3 * table * heads
    elif target == "npu":
        width = 2 if precision == "fp16" else F32
        phases["export"] = BASELINE + (F32 + width) * layer + (2 * F32 + width) * table * heads
    else:
        phases["export"] = BASELINE + F32 * layer + F32 * QUANTIZER_TEMPORARIES * max(table, largest)
    return MemoryEstimate(phases)


def estimate_plan_memory(plan: ExportPlan) -> MemoryEstimate:
    """`estimate_export_memory` for an export plan (`plan.plan_export`)."""
    return estimate_export_memory(plan.config, plan.options.target, plan.options.precision, plan.recipe,
                                  plan.generated_calibration, plan.quantize, plan.calibration_tokens)


class NotEnoughMemory(ValueError):
    """The export would not fit; the message says what to do."""


def check_memory(estimate: MemoryEstimate, target: str, recipe: Recipe | None, available: float | None = None
                 ) -> None:
    """Raise `NotEnoughMemory` with advice when the estimated peak exceeds free RAM + swap."""
    available = available_bytes() if available is None else available
    need = estimate.peak_bytes
    if need <= available:
        return
    short = need - available
    advice = []
    if estimate.peak_phase == "calibration text":
        advice.append("--calibration-file FILE (calibrate on your text instead of generating it with the whole "
                      "float model)")
    if recipe is not None and recipe.algorithm == "gptq" and estimate.peak_phase == "quantize":
        advice.append("--algorithm rtn (no GPTQ Hessians)")
    if target == "npu" and recipe is not None and estimate.peak_phase == "quantize":
        advice.append("`ondevice-llama quantize` on a bigger machine, then `export --quantized DIR` here")
    swap_gb = int(short / GB) + 2
    advice.append(f"add {swap_gb} GB of swap: sudo fallocate -l {swap_gb}G /swapfile && sudo chmod 600 /swapfile "
                  f"&& sudo mkswap /swapfile && sudo swapon /swapfile")
    raise NotEnoughMemory(
        f"this export needs about {need / GB:.1f} GB at its peak ({estimate.peak_phase}; {estimate.describe()}) "
        f"but {available / GB:.1f} GB of RAM + swap is available. To fit: " + "; or ".join(advice)
        + ". (--skip-memory-check runs it anyway.)")

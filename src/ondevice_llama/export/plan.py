"""The export plan: every option resolved once, before anything runs.

`plan_export` fills in the defaults, checks them against the model, builds the recipe, fits the part count,
and works out where the quantized checkpoint comes from and whether quantization has to run. The memory
estimate (`memory_check.estimate_plan_memory`) and the exporter read this plan; nothing downstream goes back
to the options to derive it again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..config import LlamaConfig
from ..loading import Checkpoint
from ..loading.names import num_parameters
from ..manifest import DECODER, PREFILL, PROMPT_PROCESSOR, TOKEN_GENERATOR
from ..quantization.quantizers import MODES
from ..quantization.recipe import (
    BLOCK_SIZES_TEXT,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_PRECISION,
    FLOAT_PRECISIONS,
    PRECISIONS,
    TARGET_PRECISIONS,
    Recipe,
    method_options,
    rotation_option,
)
from .cpu_graph import FLOAT_COMPUTE, INT8_COMPUTE, CpuGraphOptions
from .llama_graph import GraphOptions, PartSpec
from .part_size import check_parts_fit, parts_that_fit, storage_of

SEVEN_B_PARAMETERS = 6_000_000_000


@dataclass(frozen=True)
class ExportOptions:
    num_parts: int | None = None  # None: 4 for 7B-class models, fewer for small ones
    sequence_length: int = 128
    context_length: int | None = None  # None: 1024 for 7B-class models, else up to 2048
    use_conv: bool = False  # npu: projections as MatMul (QNN HTP prepares these in seconds; 1x1 Conv took minutes)
    all_logits: bool = False  # cpu: every position's logits (npu prompt processors always return them)
    target: str = "npu"  # "npu": static-shape SHA graphs; "cpu": fused ORT contrib ops, dynamic length
    precision: str | None = None  # None: the target's default (npu: w4a16, cpu: w4)
    block_size: int | None = DEFAULT_BLOCK_SIZE  # weight quantization block; None: per output channel (npu target only)
    accuracy_level: int = INT8_COMPUTE  # cpu target: MatMulNBits compute type (4: int8, fastest; 0: float)
    # cpu target: the compute type of prompts; where it differs from accuracy_level, a part has a second graph,
    # "prefill", for them. Float prompts make the first answer token the float model's (int8 activations moved the
    # README prompt's near tie by up to 0.3 logits, differently per CPU) at little prefill cost, but the second
    # graph holds its own prepacked weights. None: float below 7B-class, accuracy_level for 7B-class models.
    prefill_accuracy_level: int | None = None
    cpu_weights: str = "affine"  # cpu target: projection weights' mode (quantizers.MODES; affine is Q4_1's grid)
    cpu_float_down_proj: bool = True  # cpu target: down_proj computes in float whatever the accuracy level
    algorithm: str | None = None  # npu quantized precisions: rtn | gptq (None: the recipe's default)
    rotation: str | None = None  # npu quantized precisions: hadamard | none (None: the recipe's default)
    recipe: Path | None = None  # a recipe file (e.g. from `analyze`) instead of one built from the precision
    calibration_file: Path | None = None  # text to calibrate on instead of the built-in set
    quantized: Path | None = None  # a quantized checkpoint (from `quantize`) to export instead of quantizing
    kv_bits: int = 16  # npu quantized precisions: 8 quantizes the KV cache entries to 8 bits


TARGETS = ("npu", "cpu")
# npu: fp16 stores float16 weights; wXaY quantizes weights to X bits and activations to Y (QDQ), w4/w8 weights only.


def default_num_parts(config: LlamaConfig) -> int:
    params = num_parameters(config)
    parts = 4 if params >= SEVEN_B_PARAMETERS else 2 if params >= 1_000_000_000 else 1
    return min(parts, config.num_layers)


# npu: QNN HTP's graph preparation time grows steeply past C = 1024 (the default model's prompt processor: 8
# layers took 19 s at C = 1024 and 89 s at 2048), and so does the device's attention cost; Qualcomm's 7B recipe
# uses 1024 too.
NPU_CONTEXT_LENGTH = 1024


def default_context_length(config: LlamaConfig, target: str = "npu") -> int:
    if target == "npu" or num_parameters(config) >= SEVEN_B_PARAMETERS:
        return min(NPU_CONTEXT_LENGTH, config.max_position_embeddings)
    return min(2048, config.max_position_embeddings)


def plan_parts(num_layers: int, num_parts: int) -> list[PartSpec]:
    """Layers split as evenly as possible; earlier parts take the extra layer."""
    if not 1 <= num_parts <= num_layers:
        raise ValueError(f"--num-parts: must be between 1 and the number of layers ({num_layers}), got {num_parts}")
    base, extra = divmod(num_layers, num_parts)
    parts, start = [], 0
    for k in range(num_parts):
        end = start + base + (k < extra)
        parts.append(PartSpec(k, range(start, end), first=k == 0, last=k == num_parts - 1))
        start = end
    return parts


def resolve_options(config: LlamaConfig, options: ExportOptions) -> ExportOptions:
    """The options with every default filled in, checked against the model."""
    if options.target not in TARGETS:
        raise ValueError(f"--target: must be one of {TARGETS}, got {options.target!r}")
    precision = options.precision or DEFAULT_PRECISION[options.target]
    if precision not in TARGET_PRECISIONS[options.target]:
        raise ValueError(f"--precision: {precision} is not supported for the {options.target} target "
                         f"(supported: {', '.join(TARGET_PRECISIONS[options.target])})")
    quantized = precision not in FLOAT_PRECISIONS
    if quantized and options.block_size is None and options.target == "cpu":
        raise ValueError(f"--block-size: the cpu target needs a block size ({BLOCK_SIZES_TEXT})")
    if quantized and options.block_size and (config.hidden_size % options.block_size
                                             or config.intermediate_size % options.block_size):
        raise ValueError(f"--block-size: {options.block_size} does not divide the hidden size {config.hidden_size} "
                         f"and the intermediate size {config.intermediate_size}")
    if options.target == "cpu" and (options.recipe or options.quantized or options.algorithm or options.rotation):
        raise ValueError("--recipe, --quantized, --algorithm, --rotation: these apply to the npu target's quantized "
                         "precisions")
    if options.cpu_weights not in MODES:
        raise ValueError(f"--cpu-weights: must be one of {', '.join(MODES)}, got {options.cpu_weights!r}")
    if options.target != "cpu" and options.cpu_weights != "affine":
        raise ValueError("--cpu-weights: applies to the cpu target (npu weights follow --precision and the recipe)")
    if options.target != "cpu" and options.prefill_accuracy_level is not None:
        raise ValueError("--prefill-accuracy-level: applies to the cpu target (its MatMulNBits compute type)")
    if options.target != "cpu" and not options.cpu_float_down_proj:
        raise ValueError("--int8-down-proj: applies to the cpu target (its MatMulNBits compute type)")
    parts = default_num_parts(config) if options.num_parts is None else options.num_parts
    context = default_context_length(config, options.target) if options.context_length is None \
        else options.context_length
    if options.sequence_length < 1:
        raise ValueError(f"--sequence-length: must be positive, got {options.sequence_length}")
    if context < 2:
        raise ValueError(f"--context-length: must be at least 2, got {context}")
    if options.target == "npu" and context <= options.sequence_length:
        raise ValueError(f"--context-length: {context} must exceed --sequence-length {options.sequence_length}")
    if context > config.max_position_embeddings:
        raise ValueError(f"--context-length: {context} exceeds the model's maximum "
                         f"{config.max_position_embeddings}")
    plan_parts(config.num_layers, parts)  # checks the part count
    all_logits = options.all_logits or options.target == "npu"  # Genie reads the last real row of a chunk
    prefill = options.prefill_accuracy_level
    if prefill is None and options.target == "cpu":
        prefill = options.accuracy_level if num_parameters(config) >= SEVEN_B_PARAMETERS else FLOAT_COMPUTE
    return replace(options, num_parts=parts, context_length=context, precision=precision, all_logits=all_logits,
                   prefill_accuracy_level=prefill)


def fit_parts(config: LlamaConfig, options: ExportOptions, recipe: Recipe | None, requested: int | None
              ) -> ExportOptions:
    """npu: as many parts as keep each under QNN HTP's context limit (more than the default when needed); a
    requested count that leaves a part over it is refused."""
    storage = storage_of(options.precision, recipe)
    fitting = parts_that_fit(config, storage, 1, lambda k: plan_parts(config.num_layers, k))
    if requested is not None:
        check_parts_fit(config, plan_parts(config.num_layers, requested), storage, fitting)
        return options
    return replace(options, num_parts=max(options.num_parts, fitting))


def export_recipe(options: ExportOptions) -> Recipe | None:
    """The quantization recipe of a resolved npu export, or None for float precisions."""
    if options.target != "npu" or options.precision in FLOAT_PRECISIONS:
        return None
    if options.recipe is not None:
        recipe = Recipe.load(options.recipe)
        expected = PRECISIONS[options.precision][1]
        if recipe.activation_bits != expected:
            raise ValueError(f"{options.recipe}: recipe quantizes activations to {recipe.activation_bits} bits, "
                             f"but --precision {options.precision} means {expected}")
        return replace(recipe, **rotation_option(options.rotation))
    extra = method_options(options.algorithm, options.rotation)
    return Recipe.from_precision(options.precision, block_size=options.block_size, kv_bits=options.kv_bits, **extra)


def graph_passes(options: ExportOptions) -> int:
    """How many times the builder walks every layer (for the progress bar): once per graph kind."""
    return len(graph_options(options))


@dataclass(frozen=True)
class ExportPlan:
    """What an export will do, resolved from its options (`plan_export`)."""

    config: LlamaConfig
    options: ExportOptions  # every default filled in, the part count fitted
    recipe: Recipe | None  # npu quantized precisions; None for float ones and the cpu target
    parts: tuple[PartSpec, ...]
    quantized_folder: Path | None  # the quantized checkpoint: --quantized, or the cache's folder for the recipe
    quantize: bool  # whether quantization runs (no quantized checkpoint there yet)
    generated_calibration: bool  # calibration text generated by the float model (see quantization.pipeline)
    calibration_tokens: int  # about how many calibration tokens go through each layer
    graphs: dict[str, GraphOptions | CpuGraphOptions]  # graph kind -> its options (npu: without quantization)

    @property
    def manifest_extra(self) -> dict:
        """The manifest's record of the cpu target's weight format."""
        cpu = self.graphs.get(DECODER)
        if cpu is None or cpu.bits is None:
            return {}
        prefill = self.graphs.get(PREFILL, cpu)
        return {"block_size": cpu.block_size, "accuracy_level": cpu.accuracy_level,
                "prefill_accuracy_level": prefill.accuracy_level, "weight_mode": cpu.mode, "head_bits": cpu.head_bits}


def graph_options(options: ExportOptions) -> dict[str, GraphOptions | CpuGraphOptions]:
    """Each graph kind of a part and its options, for resolved `options` (npu graphs without quantization,
    which the quantized checkpoint supplies)."""
    if options.target == "cpu":
        bits = None if options.precision in FLOAT_PRECISIONS else PRECISIONS[options.precision][0]
        decoder = CpuGraphOptions(options.context_length, bits, options.block_size, mode=options.cpu_weights,
                                  head_bits=None if bits is None else 8, accuracy_level=options.accuracy_level,
                                  float_down_proj=options.cpu_float_down_proj, all_logits=options.all_logits)
        if bits is None or options.prefill_accuracy_level == options.accuracy_level:
            return {DECODER: decoder}
        return {DECODER: decoder, PREFILL: replace(decoder, accuracy_level=options.prefill_accuracy_level)}
    return {kind: GraphOptions(n, options.context_length, options.use_conv, None,
                               fp16_weights=options.precision == "fp16")
            for kind, n in ((PROMPT_PROCESSOR, options.sequence_length), (TOKEN_GENERATOR, 1))}


def plan_export(checkpoint: Checkpoint, options: ExportOptions) -> ExportPlan:
    """The plan of exporting `checkpoint` with `options`; a bad option is a ValueError naming it."""
    config = checkpoint.config
    requested_parts = options.num_parts
    options = resolve_options(config, options)
    recipe = export_recipe(options)
    if options.target == "npu":
        options = fit_parts(config, options, recipe, requested_parts)
    folder, quantize, generated, tokens = None, False, False, 0
    if recipe is not None:
        from ..quantization import pipeline

        folder = options.quantized or pipeline.quantized_cache_folder(checkpoint, recipe, options.calibration_file)
        quantize = options.quantized is None and not (Path(folder) / "quantization.json").exists()
        generated = options.calibration_file is None and pipeline.uses_generated_calibration(checkpoint, recipe)
        tokens = pipeline.calibration_token_estimate(generated, options.calibration_file is not None)
    return ExportPlan(config, options, recipe, tuple(plan_parts(config.num_layers, options.num_parts)),
                      None if folder is None else Path(folder), quantize, generated, tokens, graph_options(options))

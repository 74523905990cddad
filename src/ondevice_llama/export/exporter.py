"""Export a checkpoint as per-part ONNX prompt processors and token generators.

Everything is written into a staging folder beside the destination (`.NAME.partial`) and renamed into
place at the end, so an interrupted export never leaves a folder that looks complete. Each finished part
is recorded there with the checksums of its files; running the same export again verifies and reuses
those parts and exports only the rest.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from ..attention_sink import SINK_FILE
from ..config import LlamaConfig
from ..files import cache_key, fingerprint, folder_lock, remove_stale_staging, replace_folder, sha256_file
from ..loading import Checkpoint
from ..loading.names import num_parameters
from ..manifest import MANIFEST_FILE, GraphManifest, Manifest, PartManifest, TensorSpec, with_file_records
from ..memory import PeakRssSampler, release_free_memory
from ..quantization.recipe import (
    BLOCK_SIZES_TEXT,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_PRECISION,
    FLOAT_PRECISIONS,
    PRECISIONS,
    TARGET_PRECISIONS,
    Recipe,
)
from ..staging import StagedParts, staging_folder
from .cpu_graph import CpuGraphOptions, build_cpu_part_graph
from .encodings_file import EncodingsFile
from .graph import Graph, WeightFile
from .llama_graph import GraphOptions, GraphQuantization, PartSpec, build_part_graph
from .memory_check import GB, MemoryEstimate, check_memory, estimate_export_memory
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
    accuracy_level: int = 4  # cpu target: MatMulNBits compute type (4: int8, fastest; 0: float)
    algorithm: str | None = None  # npu quantized precisions: rtn | gptq (None: the recipe's default)
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
    if options.target == "cpu" and (options.recipe or options.quantized or options.algorithm):
        raise ValueError("--recipe, --quantized, --algorithm: these apply to the npu target's quantized precisions")
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
    return replace(options, num_parts=parts, context_length=context, precision=precision, all_logits=all_logits)


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


def _dims(value: onnx.ValueInfoProto) -> tuple[int, ...]:
    """Static sizes, -1 for a named (dynamic) dimension."""
    return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)


def _specs(values: list[onnx.ValueInfoProto], encodings: dict) -> tuple[TensorSpec, ...]:
    """The manifest's record of graph inputs or outputs; integer codes carry their scale and zero point."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype

    def spec(v: onnx.ValueInfoProto) -> TensorSpec:
        e = encodings.get(v.name)
        return TensorSpec(v.name, np.dtype(dtype(v.type.tensor_type.elem_type)).name, _dims(v),
                          None if e is None else float(np.float32(e.scale)), None if e is None else e.zero_point)

    return tuple(spec(v) for v in values)


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
        return recipe
    extra = {"algorithm": options.algorithm} if options.algorithm else {}
    return Recipe.from_precision(options.precision, block_size=options.block_size, kv_bits=options.kv_bits, **extra)


def _build_graphs(checkpoint: Checkpoint, part: PartSpec, options: ExportOptions, weights: WeightFile,
                  on_layer, quantization: GraphQuantization | None, encodings: EncodingsFile | None
                  ) -> dict[str, tuple[str, Graph]]:
    """kind -> (file name, graph) for one part: PP and TG on the NPU target, one decoder on the CPU target."""
    number = part.index + 1
    if options.target == "cpu":
        bits = None if options.precision in FLOAT_PRECISIONS else PRECISIONS[options.precision][0]
        cpu = CpuGraphOptions(options.context_length, bits, options.block_size, mode="affine",
                              head_bits=None if bits is None else 8, accuracy_level=options.accuracy_level,
                              all_logits=options.all_logits)
        graph = Graph(f"decoder_part{number}", weights)
        build_cpu_part_graph(graph, checkpoint.config, checkpoint.tensors, part, cpu, on_layer)
        return {"decoder": (f"decoder_part{number}.onnx", graph)}
    graphs = {}
    for kind, n in (("prompt_processor", options.sequence_length), ("token_generator", 1)):
        graph = Graph(f"{kind}_part{number}", weights, encodings)
        graph_options = GraphOptions(n, options.context_length, options.use_conv, quantization,
                                     fp16_weights=options.precision == "fp16")
        build_part_graph(graph, checkpoint.config, checkpoint.tensors, part, graph_options, on_layer)
        graphs[kind] = (f"{kind}_part{number}.onnx", graph)
    return graphs


def graph_passes(options: ExportOptions) -> int:
    """How many times the builder walks every layer (for the progress bar)."""
    return 1 if options.target == "cpu" else 2


def _export_part(checkpoint: Checkpoint, folder: Path, part: PartSpec, options: ExportOptions, bar: tqdm,
                 quantization: GraphQuantization | None) -> PartManifest:
    number = part.index + 1
    weights = WeightFile(folder / f"weights_part{number}.bin")
    encodings = EncodingsFile(folder / f"encodings_part{number}.json") if quantization is not None else None
    graphs = {}
    try:
        bar.set_description(f"part {number}/{options.num_parts}")

        def on_layer() -> None:
            release_free_memory()  # each layer's weights were transient: keep RSS flat over the part
            bar.update(1)

        built = _build_graphs(checkpoint, part, options, weights, on_layer, quantization, encodings)
        for kind, (file, graph) in built.items():
            onnx.save_model(graph.to_model(), folder / file)
            n = options.sequence_length if kind == "prompt_processor" else 1 if kind == "token_generator" else -1
            graphs[kind] = GraphManifest(file, n, _specs(graph.inputs, graph.io_encodings),
                                         _specs(graph.outputs, graph.io_encodings))
        if encodings is not None:
            encodings.close()
    except BaseException:
        if encodings is not None:
            encodings.discard()
        raise
    finally:
        weights.close()
    return PartManifest(part.index, part.layers.start, part.layers.stop, weights.path.name,
                        sha256_file(weights.path), graphs, encodings.path.name if encodings else None)


# ---- resuming an interrupted export ---------------------------------------------------------------
def _part_files(part: PartManifest) -> list[str]:
    return [part.weights_file, *(g.file for g in part.graphs.values())] + ([part.encodings_file]
                                                                         if part.encodings_file else [])


def _export_key(checkpoint: Checkpoint, options: ExportOptions, quantized_folder: Path | None) -> str:
    """Identity of an export: the same key means a staged part can be reused."""
    return cache_key(fingerprint(checkpoint.path), asdict(options),
                     fingerprint(quantized_folder) if quantized_folder else None)


def _quantization(checkpoint: Checkpoint, options: ExportOptions, recipe: Recipe | None, progress: bool
                  ) -> tuple[GraphQuantization | None, dict, Path | None]:
    """What the graphs quantize, the manifest's record of it, and the quantized checkpoint's folder."""
    if recipe is None:
        return None, {}, None
    from ..quantization.pipeline import load_quantized, prepare_quantized

    if options.quantized is not None:
        quantized, folder = load_quantized(options.quantized, checkpoint), options.quantized
    else:
        quantized, folder = prepare_quantized(checkpoint, recipe, options.calibration_file, progress=progress)
    activations = quantized.activations if quantized.recipe.activation_bits else {}
    info = {"quantization": {"recipe": quantized.recipe.to_dict(), "description": quantized.recipe.describe(),
                             "quantized_checkpoint": str(Path(folder).resolve()),
                             "calibration": quantized.calibration}}
    return GraphQuantization(quantized.weights, activations, quantized.attention_sink), info, Path(folder)


def memory_estimate(checkpoint: Checkpoint, options: ExportOptions, recipe: Recipe | None) -> MemoryEstimate:
    """The peak memory this (resolved) export needs, from its configuration."""
    from ..quantization.pipeline import calibration_token_estimate, quantized_cache_folder, uses_generated_calibration

    quantize = recipe is not None and options.quantized is None and not (
        quantized_cache_folder(checkpoint, recipe, options.calibration_file) / "quantization.json").exists()
    generated = options.calibration_file is None and uses_generated_calibration(checkpoint, recipe)
    tokens = calibration_token_estimate(generated, options.calibration_file is not None)
    return estimate_export_memory(checkpoint.config, options.target, options.precision, recipe, generated, quantize,
                                  tokens)


def export_model(checkpoint: Checkpoint, out: Path | str, options: ExportOptions = ExportOptions(),
                 progress: bool = True, check_memory_first: bool = True) -> Manifest:
    """Export `checkpoint` into folder `out` (replacing an earlier export there) and return its manifest.

    First the peak memory it needs is estimated and, unless `check_memory_first` is False, compared with
    free RAM + swap (`NotEnoughMemory` says what to do when it does not fit); the manifest records the
    estimate beside the peak actually measured.
    """
    out = Path(out)
    with folder_lock(out):
        return _export_locked(checkpoint, out, options, progress, check_memory_first)


def _export_locked(checkpoint: Checkpoint, out: Path, options: ExportOptions, progress: bool,
                   check_memory_first: bool) -> Manifest:
    """`export_model` while holding the lock on `out`: no other process writes it or its staging folder."""
    remove_stale_staging(out.parent, own=out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is a file; choose another --out")
    if out.exists() and not (out / MANIFEST_FILE).exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not an exported model folder; choose another --out")
    requested_parts = options.num_parts
    options = resolve_options(checkpoint.config, options)
    recipe = export_recipe(options)
    if options.target == "npu":
        options = fit_parts(checkpoint.config, options, recipe, requested_parts)
    parts = plan_parts(checkpoint.config.num_layers, options.num_parts)
    estimate = memory_estimate(checkpoint, options, recipe)
    if check_memory_first:
        check_memory(estimate, options.target, recipe)
    out.parent.mkdir(parents=True, exist_ok=True)
    with PeakRssSampler() as sampler:
        quantization, extra, quantized_folder = _quantization(checkpoint, options, recipe, progress)
        return _export_parts(checkpoint, out, options, parts, quantization, quantized_folder, progress,
                             lambda: extra | _memory_record(estimate, sampler))


def _memory_record(estimate: MemoryEstimate, sampler: PeakRssSampler) -> dict:
    """The manifest's record of the estimated and the measured (sampled RSS) peak."""
    sampler.sample()
    return {"memory": {"estimated_peak_gb": round(estimate.peak_bytes / GB, 3),
                       "measured_peak_gb": round(sampler.peak_bytes / GB, 3),
                       "estimated_phases_gb": {k: round(v / GB, 3) for k, v in estimate.phases.items()}}}


def _export_parts(checkpoint: Checkpoint, out: Path, options: ExportOptions, parts: list[PartSpec],
                  quantization: GraphQuantization | None, quantized_folder: Path | None, progress: bool,
                  extra: Callable[[], dict]) -> Manifest:
    """Export each part not already staged by an earlier run, then move the finished folder into place."""
    target_extra = {}
    if options.target == "cpu" and options.precision != "fp32":
        target_extra = {"block_size": options.block_size, "accuracy_level": options.accuracy_level,
                        "weight_mode": "affine", "head_bits": 8}
    staging = staging_folder(out)
    planned = {p.index: p.layers for p in parts}
    staged = StagedParts(staging, _export_key(checkpoint, options, quantized_folder),
                         lambda index, record: PartManifest.from_dict(record).layers == planned.get(index))
    done = {index: PartManifest.from_dict(record) for index, record in staged.done.items()}
    if done:  # said even with --quiet: what is reused is not a progress bar
        print(f"resuming the export in {staging}: part(s) {', '.join(str(k + 1) for k in sorted(done))} "
              f"already done and verified", file=sys.stderr)
    else:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    try:
        total = graph_passes(options) * sum(len(p.layers) for p in parts if p.index not in done)
        with tqdm(total=total, unit="layer", disable=not progress, dynamic_ncols=True) as bar:
            for part in parts:
                if part.index not in done:
                    done[part.index] = finished = _export_part(checkpoint, staging, part, options, bar, quantization)
                    staged.record(part.index, asdict(finished), _part_files(finished),
                                  {finished.weights_file: finished.weights_sha256})
        checkpoint.tokenizer.save(str(staging / "tokenizer.json"))
        sink = quantization.attention_sink if quantization is not None else None
        if sink is not None:
            sink.save(staging / SINK_FILE)
        manifest = Manifest(
            model_name=checkpoint.name, source=str(checkpoint.path), config=checkpoint.config,
            special_tokens=checkpoint.special_tokens, chat_template=checkpoint.chat_template,
            precision=options.precision, target=options.target, use_conv=options.use_conv,
            sequence_length=options.sequence_length, context_length=options.context_length,
            all_logits=options.all_logits, parts=tuple(done[p.index] for p in parts), extra=target_extra | extra(),
            attention_sink_file=SINK_FILE if sink is not None else None,
        )
        manifest = with_file_records(manifest, staging, staged.sha256)
        manifest.save(staging)
        staged.finish()
        replace_folder(staging, out)
    except BaseException:
        if done:
            print(f"export stopped; {len(done)} finished part(s) kept in {staging}: run the same command again "
                  f"to resume", file=sys.stderr)
        else:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest

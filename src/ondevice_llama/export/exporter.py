"""Export a checkpoint as per-part ONNX prompt processors and token generators.

Everything is written into a temporary folder beside the destination and renamed into place at the
end, so an interrupted export never leaves a folder that looks complete.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from ..config import LlamaConfig
from ..files import make_staging_folder, replace_folder, sha256_file
from ..loading import Checkpoint
from ..manifest import MANIFEST_FILE, GraphManifest, Manifest, PartManifest, TensorSpec
from .cpu_graph import CpuGraphOptions, build_cpu_part_graph
from .graph import Graph, WeightFile
from .llama_graph import GraphOptions, PartSpec, build_part_graph

SEVEN_B_PARAMETERS = 6_000_000_000


@dataclass(frozen=True)
class ExportOptions:
    num_parts: int | None = None  # None: 4 for 7B-class models, fewer for small ones
    sequence_length: int = 128
    context_length: int | None = None  # None: 1024 for 7B-class models, else up to 2048
    use_conv: bool = True
    all_logits: bool = False
    target: str = "npu"  # "npu": static-shape SHA graphs; "cpu": fused ORT contrib ops, dynamic length
    precision: str | None = None  # None: the target's default (npu: fp32, cpu: w4)
    block_size: int = 32  # weight quantization block
    accuracy_level: int = 4  # cpu target: MatMulNBits compute type (4: int8, fastest; 0: float)


TARGETS = ("npu", "cpu")
PRECISIONS = {"npu": ("fp32",), "cpu": ("fp32", "w8", "w4")}
DEFAULT_PRECISION = {"npu": "fp32", "cpu": "w4"}


def default_num_parts(config: LlamaConfig) -> int:
    params = config.num_parameters
    parts = 4 if params >= SEVEN_B_PARAMETERS else 2 if params >= 1_000_000_000 else 1
    return min(parts, config.num_layers)


def default_context_length(config: LlamaConfig) -> int:
    if config.num_parameters >= SEVEN_B_PARAMETERS:
        return 1024
    return min(2048, config.max_position_embeddings)


def plan_parts(num_layers: int, num_parts: int) -> list[PartSpec]:
    """Layers split as evenly as possible; earlier parts take the extra layer."""
    if not 1 <= num_parts <= num_layers:
        raise ValueError(f"--num-parts must be between 1 and the number of layers ({num_layers}), got {num_parts}")
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
        raise ValueError(f"--target must be one of {TARGETS}, got {options.target!r}")
    precision = options.precision or DEFAULT_PRECISION[options.target]
    if precision not in PRECISIONS[options.target]:
        raise ValueError(f"--precision {precision} is not supported for the {options.target} target "
                         f"(supported: {', '.join(PRECISIONS[options.target])})")
    if precision != "fp32" and config.hidden_size % options.block_size:
        raise ValueError(f"--block-size {options.block_size} does not divide the hidden size {config.hidden_size}")
    parts = options.num_parts or default_num_parts(config)
    context = options.context_length or default_context_length(config)
    if options.sequence_length < 1:
        raise ValueError(f"--sequence-length must be positive, got {options.sequence_length}")
    if options.target == "npu" and context <= options.sequence_length:
        raise ValueError(f"--context-length ({context}) must exceed --sequence-length ({options.sequence_length})")
    if context > config.max_position_embeddings:
        raise ValueError(f"--context-length {context} exceeds the model's maximum "
                         f"{config.max_position_embeddings}")
    plan_parts(config.num_layers, parts)  # checks the part count
    return replace(options, num_parts=parts, context_length=context, precision=precision)


def _dims(value: onnx.ValueInfoProto) -> tuple[int, ...]:
    """Static sizes, -1 for a named (dynamic) dimension."""
    return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)


def _specs(values: list[onnx.ValueInfoProto]) -> tuple[TensorSpec, ...]:
    dtype = onnx.helper.tensor_dtype_to_np_dtype
    return tuple(TensorSpec(v.name, np.dtype(dtype(v.type.tensor_type.elem_type)).name, _dims(v)) for v in values)


def _build_graphs(checkpoint: Checkpoint, part: PartSpec, options: ExportOptions, weights: WeightFile,
                  on_layer) -> dict[str, tuple[str, Graph]]:
    """kind -> (file name, graph) for one part: PP and TG on the NPU target, one decoder on the CPU target."""
    number = part.index + 1
    if options.target == "cpu":
        bits = {"fp32": None, "w8": 8, "w4": 4}[options.precision]
        cpu = CpuGraphOptions(options.context_length, bits, options.block_size, mode="affine",
                              head_bits=None if bits is None else 8, accuracy_level=options.accuracy_level,
                              all_logits=options.all_logits)
        graph = Graph(f"decoder_part{number}", weights)
        build_cpu_part_graph(graph, checkpoint.config, checkpoint.tensors, part, cpu, on_layer)
        return {"decoder": (f"decoder_part{number}.onnx", graph)}
    graphs = {}
    for kind, n in (("prompt_processor", options.sequence_length), ("token_generator", 1)):
        graph = Graph(f"{kind}_part{number}", weights)
        graph_options = GraphOptions(n, options.context_length, options.use_conv, options.all_logits)
        build_part_graph(graph, checkpoint.config, checkpoint.tensors, part, graph_options, on_layer)
        graphs[kind] = (f"{kind}_part{number}.onnx", graph)
    return graphs


def graph_passes(options: ExportOptions) -> int:
    """How many times the builder walks every layer (for the progress bar)."""
    return 1 if options.target == "cpu" else 2


def _export_part(checkpoint: Checkpoint, folder: Path, part: PartSpec, options: ExportOptions,
                 bar: tqdm) -> PartManifest:
    number = part.index + 1
    weights = WeightFile(folder / f"weights_part{number}.bin")
    graphs = {}
    try:
        bar.set_description(f"part {number}/{options.num_parts}")
        for kind, (file, graph) in _build_graphs(checkpoint, part, options, weights, lambda: bar.update(1)).items():
            onnx.save_model(graph.to_model(), folder / file)
            n = options.sequence_length if kind == "prompt_processor" else 1 if kind == "token_generator" else -1
            graphs[kind] = GraphManifest(file, n, _specs(graph.inputs), _specs(graph.outputs))
    finally:
        weights.close()
    return PartManifest(part.index, part.layers.start, part.layers.stop, weights.path.name,
                        sha256_file(weights.path), graphs)


def export_model(checkpoint: Checkpoint, out: Path | str, options: ExportOptions = ExportOptions(),
                 progress: bool = True) -> Manifest:
    """Export `checkpoint` into folder `out` (replacing an earlier export there) and return its manifest."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is a file; choose another --out")
    if out.exists() and not (out / MANIFEST_FILE).exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not an exported model folder; choose another --out")
    options = resolve_options(checkpoint.config, options)
    parts = plan_parts(checkpoint.config.num_layers, options.num_parts)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_staging_folder(out)
    try:
        total = graph_passes(options) * checkpoint.config.num_layers
        with tqdm(total=total, unit="layer", disable=not progress, dynamic_ncols=True) as bar:
            part_manifests = tuple(_export_part(checkpoint, tmp, p, options, bar) for p in parts)
        checkpoint.tokenizer.save(str(tmp / "tokenizer.json"))
        manifest = Manifest(
            model_name=checkpoint.name, source=str(checkpoint.path), config=checkpoint.config,
            special_tokens=checkpoint.special_tokens, chat_template=checkpoint.chat_template,
            precision=options.precision, target=options.target, use_conv=options.use_conv,
            sequence_length=options.sequence_length, context_length=options.context_length,
            all_logits=options.all_logits, parts=part_manifests,
            extra={"block_size": options.block_size, "accuracy_level": options.accuracy_level,
                   "weight_mode": "affine", "head_bits": 8}
            if options.target == "cpu" and options.precision != "fp32" else {},
        )
        manifest.save(tmp)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest

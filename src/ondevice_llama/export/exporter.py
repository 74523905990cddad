"""Export a checkpoint as per-part ONNX prompt processors and token generators.

Everything is written into a temporary folder beside the destination and renamed into place at the
end, so an interrupted export never leaves a folder that looks complete.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from ..config import LlamaConfig
from ..files import make_staging_folder, replace_folder, sha256_file
from ..loading import Checkpoint
from ..manifest import MANIFEST_FILE, GraphManifest, Manifest, PartManifest, TensorSpec
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
    precision: str = "fp32"
    target: str = "npu"


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


def resolve_options(config: LlamaConfig, options: ExportOptions) -> tuple[int, int]:
    """(num_parts, context_length) after defaults, checked against the model."""
    parts = options.num_parts or default_num_parts(config)
    context = options.context_length or default_context_length(config)
    if options.sequence_length < 1:
        raise ValueError(f"--sequence-length must be positive, got {options.sequence_length}")
    if context <= options.sequence_length:
        raise ValueError(f"--context-length ({context}) must exceed --sequence-length ({options.sequence_length})")
    if context > config.max_position_embeddings:
        raise ValueError(f"--context-length {context} exceeds the model's maximum "
                         f"{config.max_position_embeddings}")
    if options.precision != "fp32":
        raise ValueError(f"precision {options.precision!r} is not supported yet (supported: fp32)")
    return parts, context


def _specs(values: list[onnx.ValueInfoProto]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(v.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).name,
                            tuple(d.dim_value for d in v.type.tensor_type.shape.dim)) for v in values)


def _export_part(checkpoint: Checkpoint, folder: Path, part: PartSpec, options: ExportOptions, context: int,
                 bar: tqdm) -> PartManifest:
    number = part.index + 1
    weights = WeightFile(folder / f"weights_part{number}.bin")
    graphs = {}
    try:
        for kind, n in (("prompt_processor", options.sequence_length), ("token_generator", 1)):
            bar.set_description(f"part {number} {kind}")
            graph = Graph(f"{kind}_part{number}", weights)
            graph_options = GraphOptions(n, context, options.use_conv, options.all_logits)
            build_part_graph(graph, checkpoint.config, checkpoint.tensors, part, graph_options,
                             on_layer=lambda: bar.update(1))
            model = graph.to_model()
            file = f"{kind}_part{number}.onnx"
            onnx.save_model(model, folder / file)
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
    num_parts, context = resolve_options(checkpoint.config, options)
    parts = plan_parts(checkpoint.config.num_layers, num_parts)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_staging_folder(out)
    try:
        total = 2 * checkpoint.config.num_layers
        with tqdm(total=total, unit="layer", disable=not progress, dynamic_ncols=True) as bar:
            part_manifests = tuple(_export_part(checkpoint, tmp, p, options, context, bar) for p in parts)
        checkpoint.tokenizer.save(str(tmp / "tokenizer.json"))
        manifest = Manifest(
            model_name=checkpoint.name, source=str(checkpoint.path), config=checkpoint.config,
            special_tokens=checkpoint.special_tokens, chat_template=checkpoint.chat_template,
            precision=options.precision, target=options.target, use_conv=options.use_conv,
            sequence_length=options.sequence_length, context_length=context, all_logits=options.all_logits,
            parts=part_manifests,
        )
        manifest.save(tmp)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest

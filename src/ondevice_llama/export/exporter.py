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
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from ..attention_sink import SINK_FILE
from ..files import cache_key, fingerprint, folder_lock, remove_stale_staging, replace_folder, sha256_file
from ..loading import Checkpoint
from ..manifest import MANIFEST_FILE, GraphManifest, Manifest, PartManifest, TensorSpec, with_file_records
from ..memory import PeakRssSampler, release_free_memory
from ..staging import StagedParts, staging_folder
from .cpu_graph import CpuGraphOptions, build_cpu_part_graph
from .encodings_file import EncodingsFile
from .graph import Graph, WeightFile
from .llama_graph import GraphQuantization, PartSpec, build_part_graph
from .memory_check import GB, MemoryEstimate, check_memory, estimate_plan_memory
from .plan import (  # noqa: F401 (the options and their resolution, re-exported where they used to live)
    ExportOptions,
    ExportPlan,
    default_context_length,
    default_num_parts,
    export_recipe,
    fit_parts,
    graph_passes,
    plan_export,
    plan_parts,
    resolve_options,
)


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


def _build_graphs(checkpoint: Checkpoint, part: PartSpec, plan: ExportPlan, weights: WeightFile,
                  on_layer, quantization: GraphQuantization | None, encodings: EncodingsFile | None
                  ) -> dict[str, tuple[str, Graph]]:
    """kind -> (file name, graph) for one part: PP and TG on the NPU target, one decoder on the CPU target."""
    number = part.index + 1
    graphs = {}
    for kind, options in plan.graphs.items():
        if isinstance(options, CpuGraphOptions):
            graph = Graph(f"{kind}_part{number}", weights)
            build_cpu_part_graph(graph, checkpoint.config, checkpoint.tensors, part, options, on_layer)
        else:
            graph = Graph(f"{kind}_part{number}", weights, encodings)
            build_part_graph(graph, checkpoint.config, checkpoint.tensors, part,
                             replace(options, quantization=quantization), on_layer)
        graphs[kind] = (f"{kind}_part{number}.onnx", graph)
    return graphs


def _export_part(checkpoint: Checkpoint, folder: Path, part: PartSpec, plan: ExportPlan, bar: tqdm,
                 quantization: GraphQuantization | None) -> PartManifest:
    number = part.index + 1
    weights = WeightFile(folder / f"weights_part{number}.bin")
    encodings = EncodingsFile(folder / f"encodings_part{number}.json") if quantization is not None else None
    graphs = {}
    try:
        bar.set_description(f"part {number}/{plan.options.num_parts}")

        def on_layer() -> None:
            release_free_memory()  # each layer's weights were transient: keep RSS flat over the part
            bar.update(1)

        built = _build_graphs(checkpoint, part, plan, weights, on_layer, quantization, encodings)
        for kind, (file, graph) in built.items():
            onnx.save_model(graph.to_model(), folder / file)
            options = plan.graphs[kind]
            n = -1 if isinstance(options, CpuGraphOptions) else options.sequence_length
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


def _float_model(checkpoint: Checkpoint, plan: ExportPlan) -> Checkpoint:
    """The float model the graphs are built from: the checkpoint, rotated where the quantization rotated it."""
    if plan.recipe is None:
        return checkpoint
    from ..quantization.quantized_checkpoint import QuantizedModel
    from ..quantization.rotation import checkpoint_for

    recipe = QuantizedModel.load(plan.quantized_folder).recipe if plan.options.quantized else plan.recipe
    return checkpoint_for(checkpoint, recipe)


def _quantization(checkpoint: Checkpoint, plan: ExportPlan, progress: bool) -> tuple[GraphQuantization | None, dict]:
    """What the graphs quantize, and the manifest's record of it."""
    if plan.recipe is None:
        return None, {}
    from ..quantization.pipeline import load_quantized, prepare_quantized

    folder = plan.quantized_folder
    if plan.options.quantized is not None:
        quantized = load_quantized(folder, checkpoint)
    else:
        quantized, _ = prepare_quantized(checkpoint, plan.recipe, plan.options.calibration_file, progress=progress,
                                         cache=folder)
    activations = quantized.activations if quantized.recipe.activation_bits else {}
    info = {"quantization": {"recipe": quantized.recipe.to_dict(), "description": quantized.recipe.describe(),
                             "quantized_checkpoint": str(folder.resolve()), "calibration": quantized.calibration}}
    return GraphQuantization(quantized.weights, activations, quantized.attention_sink), info


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
    plan = plan_export(checkpoint, options)
    rotated = _float_model(checkpoint, plan)
    if rotated is not checkpoint:  # the rotated model's own plan: its LM head is a tensor of its own
        checkpoint, plan = rotated, plan_export(rotated, options)
    estimate = estimate_plan_memory(plan)
    if check_memory_first:
        check_memory(estimate, plan.options.target, plan.recipe)
    out.parent.mkdir(parents=True, exist_ok=True)
    with PeakRssSampler() as sampler:
        quantization, extra = _quantization(checkpoint, plan, progress)
        return _export_parts(checkpoint, out, plan, quantization, progress,
                             lambda: extra | _memory_record(estimate, sampler))


def _memory_record(estimate: MemoryEstimate, sampler: PeakRssSampler) -> dict:
    """The manifest's record of the estimated and the measured (sampled RSS) peak."""
    sampler.sample()
    return {"memory": {"estimated_peak_gb": round(estimate.peak_bytes / GB, 3),
                       "measured_peak_gb": round(sampler.peak_bytes / GB, 3),
                       "estimated_phases_gb": {k: round(v / GB, 3) for k, v in estimate.phases.items()}}}


def _export_parts(checkpoint: Checkpoint, out: Path, plan: ExportPlan, quantization: GraphQuantization | None,
                  progress: bool, extra: Callable[[], dict]) -> Manifest:
    """Export each part not already staged by an earlier run, then move the finished folder into place."""
    options, parts = plan.options, plan.parts
    staging = staging_folder(out)
    planned = {p.index: p.layers for p in parts}
    staged = StagedParts(staging, _export_key(checkpoint, options, plan.quantized_folder),
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
                    done[part.index] = finished = _export_part(checkpoint, staging, part, plan, bar, quantization)
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
            all_logits=options.all_logits, parts=tuple(done[p.index] for p in parts),
            extra=plan.manifest_extra | extra(),
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

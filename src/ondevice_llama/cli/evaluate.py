"""`ondevice-llama evaluate`: perplexity, KL and top-1 agreement of float, simulated-quantized and exported models.

`--model` is an exported folder (measured with its float source and, for quantized exports, the simulated
model it must match), a quantized checkpoint (float and simulated), or a checkpoint (float, plus simulated
when `--precision` asks for a quantization).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..evaluation.evaluate import LogitFn, evaluate
from ..evaluation.text import load_text_tokens
from ..manifest import MANIFEST_FILE


def run_evaluate(args: argparse.Namespace) -> int:
    if args.context_length < 2:
        raise ValueError(f"--context-length: must be at least 2, got {args.context_length}")
    if args.max_tokens < 2:
        raise ValueError(f"--max-tokens: must be at least 2, got {args.max_tokens}")
    model_path: Path = args.model
    info: dict[str, Any] = {"model": str(model_path)}
    if model_path.is_dir() and (model_path / MANIFEST_FILE).exists():
        sources, tokens, window = _exported(args, info)
    elif model_path.is_dir() and (model_path / "quantization.json").exists():
        sources, tokens, window = _quantized(args, info)
    else:
        sources, tokens, window = _checkpoint(args, info)
    reference = "float" if "float" in sources and len(sources) > 1 else None
    pairs = (("compiled", "exported"), ("compiled", "simulated"), ("exported", "simulated"))
    compare = tuple(pair for pair in pairs if set(pair) <= set(sources))
    # Every window starts with the model's BOS, if it has one: quantized exports run every sequence after
    # it (ondevice_llama.attention_sink), and all sources must see the same tokens.
    report = evaluate(sources, tokens, window, reference=reference, progress=not args.quiet, compare=compare,
                      bos=info.pop("bos_id"))
    print(f"{info['model_name']} on {args.text}:")
    print(report.table())
    if args.json is not None:
        data = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "text": str(args.text),
                "max_tokens": args.max_tokens, "requested_context_length": args.context_length,
                "context_length": report.window} | info | report.to_dict()
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _exported(args: argparse.Namespace, info: dict[str, Any]) -> tuple[dict[str, LogitFn], list[int], int]:
    """Sources of an exported folder: the export itself, plus the float checkpoint it came from if still there."""
    from ..evaluation.sources import exported_logits, float_logits, require_all_logits
    from ..runtime import ExportedModel

    require_all_logits(args.model)
    model = ExportedModel(args.model, threads=args.threads)  # checks every file before anything is measured
    manifest = model.manifest
    window = min(args.context_length, manifest.context_length)
    info |= {"kind": "exported", "model_name": manifest.model_name,
             "export": {"target": manifest.target, "precision": manifest.precision,
                        "sequence_length": manifest.sequence_length, "context_length": manifest.context_length,
                        "parts": len(manifest.parts), "source": manifest.source}}
    info["bos_id"] = manifest.special_tokens.bos_id
    tokens = load_text_tokens(args.text, model.tokenizer, args.max_tokens)
    sources: dict[str, LogitFn] = {}
    float_checkpoint = None
    if args.no_float:
        print("float reference skipped (--no-float): perplexity of the export alone", file=sys.stderr)
    elif not Path(manifest.source).exists():
        print(f"{manifest.source}: the export's source checkpoint is gone; evaluating the export alone, "
              f"with no float reference", file=sys.stderr)
    else:
        from ..loading import open_checkpoint

        float_checkpoint = manifest.source
        checkpoint = open_checkpoint(manifest.source)
        sources["float"] = float_logits(checkpoint)
        quantized = manifest.extra.get("quantization", {}).get("quantized_checkpoint")
        if quantized and Path(quantized).exists():
            from ..evaluation.sources import simulated_logits
            from ..quantization.quantized_checkpoint import QuantizedModel

            sources["simulated"] = simulated_logits(checkpoint, QuantizedModel.load(quantized))
            info["quantized_checkpoint"] = quantized
        elif quantized:
            print(f"{quantized}: the export's quantized checkpoint is gone; no simulated model to compare with",
                  file=sys.stderr)
    info["float_checkpoint"] = float_checkpoint
    if manifest.compiled is None:
        sources["exported"] = exported_logits(model)
        return sources, tokens, window
    # A compiled folder runs on QNN HTP; the export it was compiled from, on ONNX Runtime's CPU, beside it.
    info["compiled"] = {k: manifest.compiled[k] for k in ("soc", "qnn_sdk", "export")}
    export = Path(manifest.compiled["export"])
    if export.exists():
        sources["exported"] = exported_logits(ExportedModel(export, threads=args.threads))
    else:
        print(f"{export}: the export this folder was compiled from is gone; no ONNX Runtime CPU run to compare with",
              file=sys.stderr)
    sources["compiled"] = exported_logits(model)
    return sources, tokens, window


def _quantized(args: argparse.Namespace, info: dict[str, Any]) -> tuple[dict[str, LogitFn], list[int], int]:
    """A quantized checkpoint: the float checkpoint it came from and the simulated quantized model."""
    from ..evaluation.sources import float_logits, simulated_logits
    from ..loading import open_checkpoint
    from ..quantization.quantized_checkpoint import QuantizedModel

    quantized = QuantizedModel.load(args.model)
    source = quantized.source
    if not source or not Path(source).exists():
        raise ValueError(f"{args.model}: the checkpoint it was quantized from ({source or 'unknown'}) is gone")
    checkpoint = open_checkpoint(source)
    info |= {"kind": "quantized", "model_name": checkpoint.name, "float_checkpoint": str(checkpoint.path),
             "quantization": quantized.recipe.to_dict(), "bos_id": checkpoint.special_tokens.bos_id}
    tokens = load_text_tokens(args.text, checkpoint.tokenizer, args.max_tokens)
    return {"float": float_logits(checkpoint), "simulated": simulated_logits(checkpoint, quantized)}, tokens, \
        args.context_length


def _checkpoint(args: argparse.Namespace, info: dict[str, Any]) -> tuple[dict[str, LogitFn], list[int], int]:
    """A checkpoint (Hugging Face folder or .gguf): the float reference, and the simulated model of --precision."""
    from ..evaluation.sources import float_logits
    from ..loading import open_checkpoint

    if args.no_float:
        raise ValueError(f"{args.model}: --no-float leaves nothing to evaluate for a checkpoint "
                         f"(it applies to exported folders)")
    checkpoint = open_checkpoint(args.model)
    info |= {"kind": "checkpoint", "model_name": checkpoint.name, "float_checkpoint": str(checkpoint.path),
             "bos_id": checkpoint.special_tokens.bos_id}
    tokens = load_text_tokens(args.text, checkpoint.tokenizer, args.max_tokens)
    sources = {"float": float_logits(checkpoint)}
    if args.precision is not None:
        from ..evaluation.sources import simulated_logits
        from ..quantization.pipeline import prepare_quantized
        from ..quantization.recipe import Recipe, method_options

        extra = method_options(args.algorithm, args.rotation)
        recipe = Recipe.from_precision(args.precision, block_size=args.block_size, **extra)
        quantized, folder = prepare_quantized(checkpoint, recipe, args.calibration_file, progress=not args.quiet)
        sources["simulated"] = simulated_logits(checkpoint, quantized)
        info |= {"quantization": recipe.to_dict(), "quantized_checkpoint": str(folder)}
    return sources, tokens, args.context_length

"""Perplexity of the CPU target beside the float model and ONNX Runtime GenAI's int4 model, on the same windows.

    python benchmarks/cpu_quality.py [--max-tokens 2048] [--context-length 512] [--model DIR]

Sources, all on the default model (the same GGUF): float (the GGUF dequantized, our reference model), ours (the
CPU target as `export --target cpu --all-logits` writes it, or --model DIR), and ORT GenAI (its builder's int4
CPU model, built as `vs_peers.py` builds it, run with ONNX Runtime on each whole window). Windows and scoring are
`ondevice-llama evaluate`'s: non-overlapping windows of --context-length tokens starting with BOS, KL and top-1
agreement to float on every scored position. Writes benchmarks/results/cpu_quality.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ondevice_llama.evaluation.evaluate import LogitFn, evaluate
from ondevice_llama.evaluation.text import load_text_tokens

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cpu_quality.json"
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def ort_genai_logits(folder: Path, threads: int) -> LogitFn:
    """Every position's logits of ORT GenAI's model for one window, from an empty cache."""
    import onnxruntime as ort

    config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(folder / config["filename"]), options, providers=["CPUExecutionProvider"])
    empty = np.zeros((1, config["num_key_value_heads"], 0, config["head_size"]), np.float32)
    names = config["inputs"]

    def logits(tokens: list[int]) -> np.ndarray:
        feeds = {names["input_ids"]: np.array([tokens], np.int64),
                 names["attention_mask"]: np.ones((1, len(tokens)), np.int64)}
        for layer in range(config["num_hidden_layers"]):
            feeds[names["past_key_names"] % layer] = empty
            feeds[names["past_value_names"] % layer] = empty
        return session.run([config["outputs"]["logits"]], feeds)[0][0]

    return logits


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    """The text, its windows and the thread count (shared with cpu_formats.py)."""
    parser.add_argument("--text", type=Path, default=WIKITEXT)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--context-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)


def write_results(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_text_arguments(parser)
    parser.add_argument("--model", type=Path, default=None, help="an existing CPU-target export made with --all-logits")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from vs_peers import build_ort_genai_model

    from ondevice_llama.evaluation.sources import exported_logits, float_logits, require_all_logits
    from ondevice_llama.export import ExportOptions, export_model
    from ondevice_llama.loading import default_checkpoint_path, open_checkpoint
    from ondevice_llama.runtime import ExportedModel

    gguf = default_checkpoint_path().resolve()
    checkpoint = open_checkpoint(gguf)
    with tempfile.TemporaryDirectory(prefix="cpu_quality_") as tmp:
        folder = args.model
        if folder is None:
            folder = Path(tmp) / "cpu"
            export_model(checkpoint, folder, ExportOptions(target="cpu", all_logits=True))
        require_all_logits(folder)
        ours = ExportedModel(folder, threads=args.threads)
        print("building ORT GenAI's int4 model", file=sys.stderr)
        genai = build_ort_genai_model(gguf, Path(tmp))
        sources = {"float": float_logits(checkpoint), "ours": exported_logits(ours),
                   "ORT GenAI": ort_genai_logits(genai, args.threads)}
        tokens = load_text_tokens(args.text, ours.tokenizer, args.max_tokens)
        report = evaluate(sources, tokens, args.context_length, reference="float",
                          bos=ours.manifest.special_tokens.bos_id)
        weights = {k: ours.manifest.extra.get(k) for k in ("weight_mode", "block_size", "accuracy_level",
                                                           "head_bits")}
    print(report.table())
    data = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "gguf": gguf.name,
            "text": str(args.text), "max_tokens": args.max_tokens, "ours": weights} | report.to_dict()
    write_results(args.out, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

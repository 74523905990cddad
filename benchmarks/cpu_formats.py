"""CPU-target weight formats on the default model: perplexity, the README prompt's answer, decode beside ORT GenAI.

    python benchmarks/cpu_formats.py [--max-tokens 2048] [--repetitions 5] [--variants a,b,...] [--skip-speed]

Each variant is the CPU target with other weight options (`--precision w4|w8`, `--cpu-weights`, `--int8-down-proj`:
the weights' bits and grid, and whether `down_proj` computes in float), exported through `export_model` (once
with every position's logits, for perplexity, once as chat uses it). Quality: `ondevice-llama evaluate`'s
windows on --max-tokens wikitext-2 test tokens, every variant beside the float model in one pass. The README
prompt ("What is the capital of France?") through `ondevice-llama chat`, greedy. Speed: decode tokens/s over 128
steps after a 128-token prompt, vs_peers.py's engines, every variant and ORT GenAI's int4 model in each round,
the order rotating. Writes benchmarks/results/cpu_formats.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cpu_formats.json"
PROMPT = "What is the capital of France?"
VARIANTS = {  # name -> (what it is, the cpu target's ExportOptions fields)
    "affine4_down_float": ("w4 affine (Q4_1 exact), down_proj in float: the default",
                           dict(precision="w4", cpu_weights="affine", cpu_float_down_proj=True)),
    "affine4": ("w4 affine, int8 compute everywhere",
                dict(precision="w4", cpu_weights="affine", cpu_float_down_proj=False)),
    "asymmetric8": ("w8 asymmetric (integer zero points), int8 compute everywhere",
                    dict(precision="w8", cpu_weights="asymmetric", cpu_float_down_proj=False)),
    "asymmetric8_down_float": ("w8 asymmetric, down_proj in float",
                               dict(precision="w8", cpu_weights="asymmetric", cpu_float_down_proj=True)),
    "asymmetric4": ("w4 asymmetric RTN (integer zero points), int8 compute everywhere",
                    dict(precision="w4", cpu_weights="asymmetric", cpu_float_down_proj=False)),
    "symmetric4": ("w4 symmetric RTN (ORT GenAI's grid), int8 compute everywhere",
                   dict(precision="w4", cpu_weights="symmetric", cpu_float_down_proj=False)),
}


def answer(folder: Path) -> str:
    run = subprocess.run([sys.executable, "-m", "ondevice_llama.cli.main", "chat", "--model", str(folder), "--prompt",
                          PROMPT, "--max-new-tokens", "24"], capture_output=True, text=True, check=True)
    return run.stdout.strip().splitlines()[0]


def decode_speeds(folders: dict[str, Path], threads: int, repetitions: int, work: Path) -> dict[str, dict]:
    from vs_peers import DECODE_PROMPT, DECODE_STEPS, OrtGenAI, Ours, run_rounds

    from ondevice_llama.runtime import ExportedModel
    from ondevice_llama.runtime.bench import draw_tokens, median_spread, special_ids

    probe = ExportedModel(next(iter(folders.values())), threads=1)
    tokens = draw_tokens(DECODE_PROMPT, min(probe.config.vocab_size, probe.tokenizer.get_vocab_size()),
                         special_ids(probe.tokenizer, probe.manifest.special_tokens))
    engines = {name: Ours(folder, threads, tokens) for name, folder in folders.items()}
    gguf = Path(probe.manifest.source)
    engines["ort_genai"] = OrtGenAI(gguf, threads, tokens, work)
    rounds = run_rounds(engines, repetitions, lambda engine: {"decode": engine.decode(DECODE_PROMPT, DECODE_STEPS)})
    samples = {name: figures["decode"] for name, figures in rounds.items()}
    genai = float(np.median(samples["ort_genai"]))
    return {name: median_spread(values) | {"vs_ort_genai": float(np.median(values)) / genai}
            for name, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    from cpu_quality import add_text_arguments, write_results

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_text_arguments(parser)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--skip-speed", action="store_true", help="perplexity and answers only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from ondevice_llama.evaluation.evaluate import evaluate
    from ondevice_llama.evaluation.sources import exported_logits, float_logits
    from ondevice_llama.evaluation.text import load_text_tokens
    from ondevice_llama.export import ExportOptions, export_model
    from ondevice_llama.loading import default_checkpoint_path, open_checkpoint
    from ondevice_llama.runtime import ExportedModel

    names = [v.strip() for v in args.variants.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    checkpoint = open_checkpoint(default_checkpoint_path().resolve())
    with tempfile.TemporaryDirectory(prefix="cpu_formats_") as tmp:
        root = Path(tmp)
        chat_folders, sources = {}, {"float": float_logits(checkpoint)}
        for name in names:
            for all_logits in (False, True):
                folder = root / (name + ("_all" if all_logits else ""))
                export_model(checkpoint, folder, ExportOptions(target="cpu", all_logits=all_logits,
                                                               **VARIANTS[name][1]), progress=False)
            chat_folders[name] = root / name
            sources[name] = exported_logits(ExportedModel(root / f"{name}_all", threads=args.threads))
        bos = checkpoint.special_tokens.bos_id
        tokens = load_text_tokens(args.text, checkpoint.tokenizer, args.max_tokens)
        report = evaluate(sources, tokens, args.context_length, reference="float", bos=bos).to_dict()
        answers = {name: answer(folder) for name, folder in chat_folders.items()}
        speeds = {} if args.skip_speed else decode_speeds(chat_folders, args.threads, args.repetitions, root)
    rows = {name: {"description": VARIANTS[name][0], "options": VARIANTS[name][1],
                   "perplexity": report["sources"][name]["perplexity"],
                   "kl_to_float": report["sources"][name]["kl_to_reference"],
                   "top1_with_float": report["sources"][name]["top1_agreement"],
                   "answer": answers[name], "decode": speeds.get(name)} for name in names}
    print(f"{'variant':24s} {'ppl':>7s} {'KL':>8s} {'decode vs ORT GenAI':>20s}  answer")
    print(f"{'float':24s} {report['sources']['float']['perplexity']:7.2f}")
    for name, r in rows.items():
        speed = "-" if r["decode"] is None else f"{r['decode']['vs_ort_genai']:.2f}x"
        print(f"{name:24s} {r['perplexity']:7.2f} {r['kl_to_float']:8.4f} {speed:>20s}  {r['answer'][:60]}")
    data = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "text": str(args.text),
            "max_tokens": args.max_tokens, "threads": args.threads, "repetitions": args.repetitions,
            "float_perplexity": report["sources"]["float"]["perplexity"], "variants": rows,
            "ort_genai_decode": speeds.get("ort_genai")}
    write_results(args.out, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

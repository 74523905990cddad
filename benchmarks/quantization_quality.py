"""Quality of weight quantization on the default model, w4a16: round-to-nearest (RTN), GPTQ, GPTQ on the
rotated model (quantization.rotation), and that with asymmetric calibration (GPTAQ, the default).

One run quantizes the model once per row (layer by layer, built-in calibration set), simulates each
quantized model in the PyTorch reference (integer weights dequantized, activations fake-quantized to the
recipe's 16-bit encodings: the "simulated" evaluation source) and scores every one on the same windows of
each text: perplexity, KL divergence to float and top-1 agreement with float. "gap closed" is how much of
RTN's perplexity gap to float a method closes at the same granularity: (ppl_RTN - ppl) / (ppl_RTN - ppl_float).

Texts: wikitext-2's test set (../shared/data) and, as a second text unlike it, the Python language
reference that ships with every CPython (`pydoc_data.topics`, named `python-docs`).

    python benchmarks/quantization_quality.py [--max-tokens 8192] [--context-length 512] [--block-sizes 32]
        [--text wikitext --text python-docs]

(The default model's inputs are 576 and 1536 wide: block 128 does not divide 576, so it is skipped.)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from ondevice_llama.evaluation import evaluate, float_logits, load_text_tokens, simulated_logits
from ondevice_llama.loading import open_checkpoint
from ondevice_llama.quantization.calibration import builtin_sequences, pack_sequences
from ondevice_llama.quantization.pipeline import attention_sink_token
from ondevice_llama.quantization.quantize_model import quantize_model
from ondevice_llama.quantization.recipe import Recipe

RESULTS = Path(__file__).resolve().parent / "results"
TEXTS = {"wikitext": Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw",
         "python-docs": None}  # None: written from pydoc_data.topics
CALIBRATION_LENGTH = 256  # tokens per calibration row, as quantization.pipeline packs them


def rows(block_sizes: list[int]) -> list[tuple[str, Recipe, str | None]]:
    """(name, recipe, the RTN row it is compared with) for every quantized row of the table."""
    best = Recipe()  # the library's default GPTQ settings
    table = [("w8a16 RTN per-channel", Recipe.from_precision("w8a16", algorithm="rtn", rotation=None), None)]
    for block in [None, *block_sizes]:
        where = f"block {block}" if block else "per-channel"
        rtn = f"w4a16 RTN {where}"
        gptq = replace(best, weight_bits=4, activation_bits=16, block_size=block, asymmetric_calibration=0.0)
        table.append((rtn, Recipe.from_precision("w4a16", algorithm="rtn", block_size=block, rotation=None), None))
        table.append((f"w4a16 GPTQ {where}", replace(gptq, rotation=None), rtn))
        table.append((f"w4a16 GPTQ + rotation {where}", replace(gptq, rotation="hadamard"), rtn))
        table.append((f"w4a16 GPTAQ + rotation {where}",
                      replace(gptq, rotation="hadamard", asymmetric_calibration=best.asymmetric_calibration), rtn))
    return table


def text_file(name: str, folder: Path) -> Path:
    """The file of text `name` (a TEXTS key, or a path)."""
    if name not in TEXTS:
        return Path(name)
    if TEXTS[name] is not None:
        return TEXTS[name]
    import pydoc_data.topics

    path = folder / "python-docs.txt"
    path.write_text("\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)))
    return path


def add_model_and_text_arguments(parser: argparse.ArgumentParser, window_help: str = "window length") -> None:
    """--model, --text, --max-tokens and --context-length, as every quality benchmark takes them."""
    parser.add_argument("--model", default=None, help="checkpoint (default: the default model)")
    parser.add_argument("--text", action="append", default=None,
                        help=f"text to score on, repeatable: {' or '.join(TEXTS)}, or a file (default: both)")
    parser.add_argument("--max-tokens", type=int, default=8192, help="tokens of each text")
    parser.add_argument("--context-length", type=int, default=512, help=window_help)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_and_text_arguments(parser)
    parser.add_argument("--block-sizes", default="32", help="comma-separated block sizes besides per-channel")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "quantization_quality.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "quantization_quality.png")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    block_sizes = [int(b) for b in args.block_sizes.split(",") if b]

    checkpoint = open_checkpoint(args.model)
    c = checkpoint.config
    widths = {c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim}
    for block in [b for b in block_sizes if any(w % b for w in widths)]:
        print(f"block {block} skipped: it does not divide the layer input sizes {sorted(widths)}", file=sys.stderr)
        block_sizes.remove(block)
    with tempfile.TemporaryDirectory() as tmp:
        texts = {name: text_file(name, Path(tmp)) for name in args.text or list(TEXTS)}
        tokens = {name: load_text_tokens(path, checkpoint.tokenizer, args.max_tokens) for name, path in texts.items()}
    start = time.perf_counter()
    sequences = builtin_sequences(checkpoint, generated=True)
    sink = attention_sink_token(checkpoint)
    calibration = pack_sequences(sequences, CALIBRATION_LENGTH, first_token=sink)
    calibration_seconds = time.perf_counter() - start
    print(f"calibration: {calibration.shape[0]} x {calibration.shape[1]} tokens (built-in set, "
          f"{calibration_seconds:.0f} s to load or generate)", file=sys.stderr)

    table_spec = rows(block_sizes)
    recipes = {name: recipe for name, recipe, _ in table_spec}
    compare = {name: rtn for name, _, rtn in table_spec}
    quantized_sources, seconds = simulated_sources(checkpoint, recipes, calibration, sink)
    sources = {"float": float_logits(checkpoint)} | quantized_sources
    results = {}
    for text, ids in tokens.items():
        report = evaluate(sources, ids, args.context_length, reference="float", bos=sink)
        ppl = {name: r.perplexity for name, r in report.sources.items()}
        table_rows = []
        for name, r in report.sources.items():
            rtn = compare.get(name)
            gap = None if rtn is None else 100 * (ppl[rtn] - ppl[name]) / (ppl[rtn] - ppl["float"])
            table_rows.append({"name": name, "perplexity": r.perplexity, "kl_to_float": r.kl_to_reference,
                               "top1_agreement": r.top1_agreement, "gap_closed_percent": gap, "compared_with": rtn,
                               "quantize_seconds": seconds.get(name),
                               "recipe": recipes[name].to_dict() if name in recipes else None})
        results[text] = text_result(checkpoint.name, text, texts[text], report, table_rows)
    header = (f"{checkpoint.name}, w4a16 weight quantization; calibration {calibration.shape[0]} x "
              f"{calibration.shape[1]} built-in tokens")
    data = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": checkpoint.name,
            "model_path": str(checkpoint.path), "max_tokens": args.max_tokens, "bos_token": sink,
            "calibration_rows": calibration.shape[0], "calibration_length": calibration.shape[1],
            "calibration_source": "built-in (hand-written + generated)", "threads": torch.get_num_threads(),
            "machine": platform.machine(), "torch": torch.__version__, "texts": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    plot(results, args.plot, header)
    return 0


def simulated_sources(checkpoint, recipes: dict[str, Recipe], calibration, sink: int | None) -> tuple[dict, dict]:
    """Each recipe's quantized model as an evaluation source (simulated), and its quantization seconds."""
    sources, seconds = {}, {}
    for name, recipe in recipes.items():
        start = time.perf_counter()
        quantized = quantize_model(checkpoint, recipe, calibration, progress=True, sink_token=sink)
        seconds[name] = time.perf_counter() - start
        print(f"{name}: quantized in {seconds[name]:.0f} s", file=sys.stderr, flush=True)
        sources[name] = simulated_logits(checkpoint, quantized)
    return sources, seconds


def text_result(model: str, text: str, path: Path, report, rows: list[dict]) -> dict:
    """One text's entry of the JSON (where the text came from, its windows, the rows), its table printed."""
    source = f"pydoc_data.topics (Python {platform.python_version()})" if TEXTS.get(text, path) is None else str(path)
    print(f"{model}, {text}: {report.tokens} tokens in {report.windows} windows of {report.window} "
          f"(BOS + {report.window - 1} text tokens), {report.positions} positions scored")
    print(table(rows))
    return {"text": source, "tokens": report.tokens, "windows": report.windows, "context_length": report.window,
            "positions": report.positions, "rows": rows}


def table(results: list[dict]) -> str:
    lines = [f"{'source':34s} {'perplexity':>10s} {'KL to float':>12s} {'top-1 agr.':>10s} {'gap closed':>10s} "
             f"{'quantize s':>10s}"]
    for r in results:
        kl = "-" if r["kl_to_float"] is None else f"{r['kl_to_float']:.4f}"
        top1 = "-" if r["top1_agreement"] is None else f"{100 * r['top1_agreement']:.1f}%"
        gap = "-" if r.get("gap_closed_percent") is None else f"{r['gap_closed_percent']:.0f}%"
        secs = "-" if r["quantize_seconds"] is None else f"{r['quantize_seconds']:.0f}"
        lines.append(f"{r['name']:34s} {r['perplexity']:10.2f} {kl:>12s} {top1:>10s} {gap:>10s} {secs:>10s}")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    """Perplexity per method, one panel per text, each bar labelled with the gap to float it closes."""
    from ondevice_llama.plotting import require_pyplot

    plt = require_pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 5), squeeze=False)
    for ax, (text, result) in zip(axes[0], results.items(), strict=True):
        rows = result["rows"]
        names = [r["name"] for r in rows]
        colors = ["tab:gray" if n == "float" else "tab:red" if n.startswith("AIMET") else "tab:purple"
                  if "GPTAQ" in n else "tab:green"
                  if "rotation" in n else "tab:blue" if "GPTQ" in n else "tab:orange" for n in names]
        values = [r["perplexity"] for r in rows]
        bars = ax.barh(names, values, color=colors)
        for bar, r, v in zip(bars, rows, values, strict=True):
            note = f"{v:.2f}" + (f"  ({r['gap_closed_percent']:.0f}% of RTN's gap closed)"
                                 if r.get("gap_closed_percent") is not None else "")
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + note, va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("perplexity (lower is better)")
        ax.set_xlim(0, max(values) * 1.6)
        ax.set_title(f"{text}: {result['tokens']} tokens, windows of {result['context_length']}", fontsize=9)
        if ax is not axes[0][0]:
            ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

"""`ondevice-llama`: export a checkpoint, chat with an exported model, or benchmark one.

Heavy imports happen inside each command so that `chat` on an exported folder never loads torch.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from ..quantization.quantizers import MODES
from ..quantization.recipe import (
    ALGORITHMS,
    BLOCK_SIZES,
    BLOCK_SIZES_TEXT,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_PRECISION,
    PRECISIONS,
    ROTATION_CHOICES,
    TARGET_PRECISIONS,
    Recipe,
    method_options,
    rotation_option,
)

EXIT_BAD_INPUT = 2
# A module that only an extra installs -> that extra (pyproject.toml); the base install is the runtime.
EXTRA_OF_MODULE = {"torch": "export", "onnx": "export", "gguf": "export", "sentencepiece": "export",
                   "matplotlib": "plot"}
REPL_CONTEXT_FULL = ("[the conversation fills the context ({detail}): /reset starts a new one, or run chat with "
                     "--slide to keep its newest half and go on]")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, `error: --option: what`, with the exit code of any bad input."""

    def error(self, message: str) -> NoReturn:
        match = re.match(r"argument (\S+): (.*)", message)
        print(f"error: {match[1].split('/')[-1]}: {match[2]}" if match else f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _integer(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `low`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _number(low: float, high: float = math.inf, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] ((low, high] with `low_open`); NaN and inf are refused."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
            bounds = (f"{'>' if low_open else '>='} {low:g}" if high == math.inf else
                      f"in {'(' if low_open else '['}{low:g}, {high:g}]")
            raise argparse.ArgumentTypeError(f"must be a finite number {bounds}, got {text}")
        return value
    return parse


def _add_export_options(p: argparse.ArgumentParser, default_target: str) -> None:
    p.add_argument("--target", choices=("npu", "cpu"), default=default_target,
                   help=f"npu: static-shape split-head graphs for accelerators; cpu: fused ONNX Runtime CPU graph "
                        f"(default {default_target})")
    npu, cpu = (" | ".join(TARGET_PRECISIONS[t]) for t in ("npu", "cpu"))
    p.add_argument("--precision", default=None,
                   help=f"npu: {npu} (default {DEFAULT_PRECISION['npu']}: 4-bit weights, 16-bit activations); "
                        f"cpu: {cpu} (default {DEFAULT_PRECISION['cpu']})")
    p.add_argument("--block-size", type=_block_size, default=DEFAULT_BLOCK_SIZE,
                   help=f"weight quantization block: {BLOCK_SIZES_TEXT}, or 0 for per output channel (npu only) "
                        f"(default {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--algorithm", choices=ALGORITHMS, default=None,
                   help="npu weight quantization: gptq (default) or rtn (round to nearest)")
    _rotation_argument(p, "npu: ")
    p.add_argument("--recipe", type=Path, default=None,
                   help="npu: quantization recipe file (e.g. written by `ondevice-llama analyze`)")
    p.add_argument("--calibration-file", type=Path, default=None,
                   help="npu: UTF-8 text to calibrate on instead of the built-in chats and prose")
    p.add_argument("--quantized", type=Path, default=None,
                   help="npu: export this quantized checkpoint (from `ondevice-llama quantize`) instead of quantizing")
    p.add_argument("--kv-bits", type=int, choices=(8, 16), default=16,
                   help="npu w4a16/w8a16: bits of the KV cache entries (default 16)")
    p.add_argument("--accuracy-level", type=int, default=4, choices=(0, 1, 2, 3, 4),
                   help="cpu target: MatMulNBits compute type, 4 = int8 (fastest), 0 = float (default 4)")
    p.add_argument("--prefill-accuracy-level", type=int, default=None, choices=(0, 1, 2, 3, 4),
                   help="cpu target: the compute type of prompts; where it differs from --accuracy-level, each part "
                        "has a second graph for them, with its own prepacked weights (default: 0 = float, so the "
                        "first answer token is the float model's on any CPU; for 7B-class models --accuracy-level)")
    p.add_argument("--cpu-weights", choices=MODES, default="affine",
                   help="cpu target: the projections' 4/8-bit weight grid: affine (a float minimum per block, Q4_1's "
                        "grid, exact for Q4_1 files), asymmetric (integer zero points) or symmetric (default affine)")
    p.add_argument("--int8-down-proj", action="store_true",
                   help="cpu target: down_proj computes at --accuracy-level too (default: in float, where "
                        "activation outliers concentrate)")
    p.add_argument("--num-parts", type=_integer(1), default=None,
                   help="parts to split the model into (default: 4 for 7B-class models, fewer for small ones)")
    p.add_argument("--sequence-length", type=_integer(1), default=128, help="prompt processor length N (default 128)")
    p.add_argument("--context-length", type=_integer(2), default=None,
                   help="context length C (default: 1024 for 7B-class models, else up to 2048)")
    p.add_argument("--conv", action="store_true",
                   help="npu: projections as 1x1 Conv instead of MatMul (QNN HTP prepares Conv far slower)")


def _rotation_argument(parser: argparse.ArgumentParser, scope: str = "") -> None:
    parser.add_argument("--rotation", choices=ROTATION_CHOICES, default=None,
                        help=f"{scope}an orthogonal rotation fused into the weights before quantizing, for smaller "
                             f"4-bit errors at no run-time cost: {' or '.join(ROTATION_CHOICES)} (default: "
                             f"{Recipe().rotation} with gptq, none with rtn)")


def _export_options(args: argparse.Namespace, all_logits: bool = False):
    from ..export import ExportOptions

    return ExportOptions(num_parts=args.num_parts, sequence_length=args.sequence_length,
                         context_length=args.context_length, use_conv=args.conv, all_logits=all_logits,
                         target=args.target, precision=args.precision, block_size=args.block_size,
                         accuracy_level=args.accuracy_level, prefill_accuracy_level=args.prefill_accuracy_level,
                         cpu_weights=args.cpu_weights,
                         cpu_float_down_proj=not args.int8_down_proj, algorithm=args.algorithm, rotation=args.rotation,
                         recipe=args.recipe,
                         calibration_file=args.calibration_file, quantized=args.quantized, kv_bits=args.kv_bits)


def _block_size(text: str) -> int | None:
    if text not in ("0", *map(str, BLOCK_SIZES)):
        raise argparse.ArgumentTypeError(f"must be {', '.join(map(str, BLOCK_SIZES))} or 0 (per channel), got {text}")
    return int(text) or None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ondevice-llama", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    export = sub.add_parser("export", help="export a checkpoint as per-part ONNX graphs")
    export.add_argument("--checkpoint", type=Path, default=None,
                        help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct)")
    export.add_argument("--out", type=Path, required=True, help="output folder")
    _add_export_options(export, "npu")
    export.add_argument("--all-logits", action="store_true",
                        help="last part returns logits for every position (for evaluation)")
    export.add_argument("--skip-memory-check", action="store_true",
                        help="export even when the estimated peak memory exceeds free RAM + swap")
    export.add_argument("--quiet", action="store_true", help="no progress bar")

    quantize = sub.add_parser("quantize", help="quantize a checkpoint into a reusable quantized checkpoint")
    quantize.add_argument("--checkpoint", type=Path, default=None,
                          help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct)")
    quantize.add_argument("--out", type=Path, required=True, help="output folder (a quantized checkpoint)")
    quantize.add_argument("--precision", choices=tuple(PRECISIONS), default=DEFAULT_PRECISION["npu"],
                          help=f"weights and activations (default {DEFAULT_PRECISION['npu']})")
    quantize.add_argument("--block-size", type=_block_size, default=DEFAULT_BLOCK_SIZE,
                          help=f"{BLOCK_SIZES_TEXT}, or 0 for per output channel (default {DEFAULT_BLOCK_SIZE})")
    quantize.add_argument("--algorithm", choices=ALGORITHMS, default=None, help="default gptq")
    _rotation_argument(quantize)
    quantize.add_argument("--recipe", type=Path, default=None, help="recipe file (overrides the options above)")
    quantize.add_argument("--calibration-file", type=Path, default=None,
                          help="UTF-8 text to calibrate on instead of the built-in chats and prose")
    quantize.add_argument("--kv-bits", type=int, choices=(8, 16), default=16, help="KV cache bits (default 16)")
    quantize.add_argument("--quiet", action="store_true", help="no progress bar")

    chat = sub.add_parser("chat", help="chat with an exported model (exports the checkpoint first if needed)")
    source = chat.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, default=None, help="exported folder")
    source.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint to export once into a cache folder (default: SmolLM2-135M-Instruct)")
    _add_export_options(chat, "cpu")
    chat.add_argument("--prompt", default=None, help="one-shot prompt; without it, an interactive chat")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--temperature", type=_number(0), default=0.0, help="0 (default) is greedy")
    chat.add_argument("--top-k", type=_integer(0), default=0)
    chat.add_argument("--top-p", type=_number(0, 1, low_open=True), default=1.0)
    chat.add_argument("--seed", type=_integer(0), default=None)
    chat.add_argument("--max-new-tokens", type=_integer(1), default=256)
    chat.add_argument("--threads", type=_integer(1), default=None, help="ONNX Runtime intra-op threads")
    chat.add_argument("--genie", action="store_true",
                      help="a compiled folder: generate with Qualcomm's Genie runtime (libGenie) on its bundle")
    chat.add_argument("--slide", action="store_true",
                      help="when the context fills up, keep its newest half and go on instead of stopping")

    bench = sub.add_parser("bench", help="measure TTFT, prefill and decode speed, per-part latency and peak memory")
    bench.add_argument("--model", type=Path, required=True, help="exported folder")
    bench.add_argument("--threads", type=_integer(1), default=None, help="ONNX Runtime intra-op threads")
    bench.add_argument("--repetitions", type=_integer(1), default=5,
                       help="measured repetitions after one warm-up (default 5)")
    bench.add_argument("--prompt-lengths", default="128,512,1024",
                       help="comma-separated prompt lengths for TTFT (default 128,512,1024)")
    bench.add_argument("--json", type=Path, default=None, help="write the figures as JSON here")
    bench.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")

    evaluate = sub.add_parser("evaluate", help="perplexity, KL divergence and top-1 agreement to float on a text")
    evaluate.add_argument("--model", type=Path, required=True,
                          help="exported folder (made with --all-logits) or checkpoint (Hugging Face folder or .gguf)")
    evaluate.add_argument("--text", type=Path, required=True, help="UTF-8 text file, e.g. wikitext-2-raw/wiki.test.raw")
    evaluate.add_argument("--context-length", type=_integer(2), default=512,
                          help="tokens per window, at most the export's context length (default 512)")
    evaluate.add_argument("--max-tokens", type=_integer(2), default=4096,
                          help="evaluate the first T tokens (default 4096)")
    evaluate.add_argument("--json", type=Path, default=None, help="write every figure and setting as JSON here")
    evaluate.add_argument("--threads", type=_integer(1), default=None, help="ONNX Runtime intra-op threads")
    evaluate.add_argument("--precision", choices=tuple(PRECISIONS), default=None,
                          help="checkpoint: also measure it quantized (simulated) at this precision")
    evaluate.add_argument("--block-size", type=_block_size, default=DEFAULT_BLOCK_SIZE,
                          help=f"with --precision: {BLOCK_SIZES_TEXT}, or 0 for per channel "
                               f"(default {DEFAULT_BLOCK_SIZE})")
    evaluate.add_argument("--algorithm", choices=ALGORITHMS, default=None, help="with --precision (default gptq)")
    _rotation_argument(evaluate, "with --precision: ")
    evaluate.add_argument("--calibration-file", type=Path, default=None, help="with --precision: calibration text")
    evaluate.add_argument("--no-float", action="store_true",
                          help="exported folder: skip the float reference and measure the export alone")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")

    synth = sub.add_parser("synthesize", help="write a Hugging Face checkpoint with a real model's layout and "
                                              "random weights (for speed and memory work)")
    synth.add_argument("--config", required=True,
                       help="preset (llama-2-7b-chat, llama-3.2-1b, llama-3.2-3b, tinyllama-1.1b) or a config.json")
    synth.add_argument("--out", type=Path, required=True, help="output folder")
    synth.add_argument("--tokenizer", type=Path, default=None,
                       help="SentencePiece tokenizer.model, tokenizer.json or a folder with one "
                            "(default: a byte-level tokenizer)")
    synth.add_argument("--seed", type=_integer(0), default=0, help="random seed (default 0)")
    synth.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                       help="stored dtype (default: the real checkpoint's)")
    synth.add_argument("--layers", type=_integer(1), default=None,
                       help="keep only the first N layers (same widths)")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")

    compile_ = sub.add_parser("compile", help="compile an npu export to QNN context binaries for a Snapdragon NPU "
                                              "(both graphs of a part sharing weights) and a Genie bundle")
    compile_.add_argument("export", type=Path, help="exported folder (`ondevice-llama export --target npu`)")
    compile_.add_argument("--soc", required=True,
                          help="the SoC to compile for, e.g. SM8650 (8 Gen 3), SM8750 (8 Elite), SC8380XP (X Elite)")
    compile_.add_argument("--out", type=Path, required=True, help="output folder")
    compile_.add_argument("--device-only", action="store_true",
                          help="skip the per-graph binaries that let QNN's x86_64 HTP simulator run the folder here "
                               "(halves the time)")
    compile_.add_argument("--skip-memory-check", action="store_true",
                          help="compile even when the estimated peak memory exceeds free RAM + swap")
    compile_.add_argument("--part", type=int, action="append", default=None, metavar="K",
                          help="compile only part K (repeatable) into the staging folder; a run without --part "
                               "finishes the folder, reusing the parts already compiled")
    compile_.add_argument("--quiet", action="store_true", help="no progress bar")

    analyze = sub.add_parser("analyze", help="4-bit sensitivity of every layer's projections, and a w4a16 recipe "
                                             "keeping the most sensitive at 8 bits")
    analyze.add_argument("--checkpoint", type=Path, default=None,
                         help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct)")
    analyze.add_argument("--out", type=Path, required=True, help="recipe file to write (for export --recipe)")
    analyze.add_argument("--block-size", type=_block_size, default=DEFAULT_BLOCK_SIZE,
                         help=f"{BLOCK_SIZES_TEXT}, or 0 for per output channel (default {DEFAULT_BLOCK_SIZE})")
    analyze.add_argument("--algorithm", choices=ALGORITHMS, default=None, help="default gptq")
    _rotation_argument(analyze)
    analyze.add_argument("--calibration-file", type=Path, default=None,
                         help="UTF-8 text to measure on instead of the built-in chats and prose")
    analyze.add_argument("--budget", type=_number(0, 1), default=0.1,
                         help="at most this fraction of the projection parameters at 8 bits (default 0.1)")
    analyze.add_argument("--max-tokens", type=_integer(0), default=4096,
                         help="measure on at most T calibration tokens, whole rows spread over the set (default "
                              "4096; 0 = all)")
    analyze.add_argument("--json", type=Path, default=None, help="write the full report as JSON here")
    analyze.add_argument("--plot", type=Path, default=None, help="write a layers x projections heatmap PNG here")
    analyze.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run_export(args: argparse.Namespace) -> int:
    from ..export import export_model
    from ..loading import open_checkpoint

    checkpoint = open_checkpoint(args.checkpoint)
    manifest = export_model(checkpoint, args.out, _export_options(args, args.all_logits), progress=not args.quiet,
                            check_memory_first=not args.skip_memory_check)
    quantization = manifest.extra.get("quantization", {}).get("description")
    print(f"exported {manifest.model_name}: {manifest.target} target, {quantization or manifest.precision}, "
          f"{len(manifest.parts)} part(s), N={manifest.sequence_length}, C={manifest.context_length} -> {args.out}")
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    from ..loading import open_checkpoint
    from ..quantization.pipeline import prepare_quantized

    checkpoint = open_checkpoint(args.checkpoint)
    if args.recipe is not None:
        recipe = replace(Recipe.load(args.recipe), **rotation_option(args.rotation))
    else:
        extra = method_options(args.algorithm, args.rotation)
        recipe = Recipe.from_precision(args.precision, block_size=args.block_size, kv_bits=args.kv_bits, **extra)
    if args.out.exists() and not (args.out / "quantization.json").exists() and any(args.out.iterdir()):
        raise FileExistsError(f"{args.out}: exists and is not a quantized checkpoint; choose another --out")
    quantized, folder = prepare_quantized(checkpoint, recipe, args.calibration_file, out=args.out,
                                          progress=not args.quiet)
    print(f"quantized {checkpoint.name}: {quantized.recipe.describe()}, {len(quantized.weights)} weights, "
          f"{len(quantized.activations)} activation encodings -> {folder}")
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from ..runtime import ChatSession, ContextFullError, ExportedModel, SamplingConfig
    from .cached_export import cached_export

    folder = args.model or cached_export(args.checkpoint, _export_options(args))
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
    if args.genie:
        from ..runtime.genie import GenieChatSession

        session = GenieChatSession(folder, system=args.system, sampling=sampling)
    else:
        session = ChatSession(ExportedModel(folder, threads=args.threads), system=args.system)

    def reply(text: str, full_message: str) -> None:
        result = session.send(text, sampling, args.max_new_tokens, on_text=_stream, slide=args.slide)
        print(flush=True)
        if result.stop_reason == "context_full":
            print(full_message, file=sys.stderr)
        print(result.timing_line(), file=sys.stderr, flush=True)

    if args.prompt is not None:
        from ..runtime.generate import CONTEXT_FULL_MESSAGE

        try:
            reply(args.prompt, CONTEXT_FULL_MESSAGE)
        except ContextFullError as e:
            raise ValueError(f"--prompt: {e} (export with a larger --context-length, or use --slide)") from None
        return 0
    print(f"chatting with {session.manifest.model_name} ({folder}); /reset clears, /exit or Ctrl-D quits",
          file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            session.reset()
            continue
        if not text.strip():
            continue
        try:
            reply(text, REPL_CONTEXT_FULL.format(detail="the reply was cut"))
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            print("\n[reply stopped; that turn is left out of the conversation]", file=sys.stderr, flush=True)
        except ContextFullError as e:
            print(REPL_CONTEXT_FULL.format(detail=e), file=sys.stderr, flush=True)


def run_compile(args: argparse.Namespace) -> int:
    from ..compile import compile_export

    only = None if args.part is None else [k - 1 for k in args.part]
    manifest = compile_export(args.export, args.out, args.soc, simulator=not args.device_only,
                              progress=not args.quiet, only=only, check_memory_first=not args.skip_memory_check)
    if manifest is None:
        return 0
    c = manifest.compiled
    binaries = ", ".join(f"{p['binary']} ({p['binary_bytes'] / 1e6:.1f} MB)" for p in c["parts"])
    print(f"compiled {manifest.model_name} for {c['soc']} (soc_model {c['soc_model']}, v{c['htp_arch']}, QNN "
          f"{c['qnn_sdk']}) in {c['seconds']:.0f} s: {binaries} -> {args.out}")
    if not c["genie"].startswith("bundle"):
        print(f"no Genie bundle: {c['genie']}", file=sys.stderr)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(args)


def run_synthesize(args: argparse.Namespace) -> int:
    from ..loading.synthetic import synthesize

    result = synthesize(args.config, args.out, tokenizer=args.tokenizer, seed=args.seed, dtype=args.dtype,
                        layers=args.layers, progress=not args.quiet)
    print(result.summary())
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import run_evaluate

    return run_evaluate(args)


def run_analyze(args: argparse.Namespace) -> int:
    from .analyze import run_analyze

    return run_analyze(args)


def _one_line(error: BaseException) -> str:
    """The error as `<file or option>: <what>` on one line (an OSError's file first, as our own errors put it)."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


def _stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a bad option already reported in one line (2)
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    commands = {"export": run_export, "quantize": run_quantize, "compile": run_compile, "chat": run_chat,
                "bench": run_bench, "evaluate": run_evaluate,
                "synthesize": run_synthesize, "analyze": run_analyze}
    try:
        return commands[args.command](args)
    except ModuleNotFoundError as e:
        extra = EXTRA_OF_MODULE.get((e.name or "").partition(".")[0])
        if extra is None:
            raise
        print(f'error: {args.command}: needs the {extra} extra: pip install -e ".[{extra}]"', file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

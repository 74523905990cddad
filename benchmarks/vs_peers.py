"""Ours against llama.cpp and transformers on the same machine, thread count, GGUF file and token ids.

    python benchmarks/vs_peers.py [--threads 2] [--repetitions 5] [--out benchmarks/results/vs_peers.json]

Engines: (a) ours, the CPU target of the default model exported into a temporary folder (or --model DIR);
(b) llama.cpp through llama-cpp-python on the same GGUF; (c) ONNX Runtime GenAI (onnxruntime-genai), its model
built by its own builder (`python -m onnxruntime_genai.models.builder -p int4 -e cpu`) from a Hugging Face folder
that transformers writes from the same GGUF; (d) transformers float32 (the GGUF dequantized); and llama-bench
(pp512, tg128 on the same GGUF) when one is on PATH, run once after the rounds.
Figures: TTFT (prefill from an empty cache + the first greedy token) at 128 and 512 prompt tokens, and decode
tokens/s over 128 greedy steps after a 128-token prompt. One warm-up round, then --repetitions rounds; in each
round every engine runs every figure, the engine order rotating from round to round so drift hits all alike.
Medians with min-max and quartiles; ratios are ours over theirs as a speedup (>1: ours is faster).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ondevice_llama.runtime.bench import Runner, draw_tokens, machine_info, median_spread, special_ids

TTFT_LENGTHS = (128, 512)
DECODE_PROMPT = 128
DECODE_STEPS = 128
SETTLE_S = 0.2  # pause between engines, so one engine's idle spinning threads do not eat into the next
RESULTS = Path(__file__).resolve().parent / "results"


class Ours:
    name = "ours"

    def __init__(self, folder: Path, threads: int, tokens: list[int]):
        from ondevice_llama.runtime import ExportedModel

        self.model = ExportedModel(folder, threads=threads)
        m = self.model.manifest
        self.description = (f"ondevice-llama {m.target} target, {m.precision} "
                            f"(MatMulNBits accuracy level {m.extra.get('accuracy_level', '-')}), ONNX Runtime")
        self.runner = Runner(self.model, tokens)

    def ttft(self, n: int) -> float:
        return self.runner.ttft(n)[1]

    def decode(self, prompt: int, steps: int) -> float:
        return self.runner.decode(prompt, steps)


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, gguf: Path, threads: int, tokens: list[int]):
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=512,
                                   verbose=False)
        self.tokens = tokens
        self.description = f"llama-cpp-python {llama_cpp.__version__}, the GGUF's own quantized weights"

    def _next(self) -> int:
        logits = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.llm.n_vocab(),))))

    def ttft(self, n: int) -> float:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(self.tokens[:n])
        self._next()
        return time.perf_counter() - start

    def decode(self, prompt: int, steps: int) -> float:
        self.llm.reset()
        self.llm.eval(self.tokens[:prompt])
        token = self._next()
        start = time.perf_counter()
        for _ in range(steps):
            self.llm.eval([token])
            token = self._next()
        return steps / (time.perf_counter() - start)


class Transformers:
    name = "transformers"

    def __init__(self, gguf: Path, threads: int, tokens: list[int]):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                          dtype=torch.float32).eval()
        self.ids = torch.tensor([tokens])
        import inspect  # transformers 5 renamed past_key_values to cache

        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.description = (f"transformers {transformers.__version__} float32 (GGUF dequantized), "
                            f"torch {torch.__version__}, eager, DynamicCache")

    def _prefill(self, n: int):
        out = self.model(input_ids=self.ids[:, :n], use_cache=True, logits_to_keep=1)
        return getattr(out, self.cache_arg), int(out.logits[0, -1].argmax())

    def ttft(self, n: int) -> float:
        with self.torch.inference_mode():
            start = time.perf_counter()
            self._prefill(n)
            return time.perf_counter() - start

    def decode(self, prompt: int, steps: int) -> float:
        with self.torch.inference_mode():
            past, token = self._prefill(prompt)
            start = time.perf_counter()
            for _ in range(steps):
                out = self.model(input_ids=self.torch.tensor([[token]]), use_cache=True, **{self.cache_arg: past})
                past, token = getattr(out, self.cache_arg), int(out.logits[0, -1].argmax())
            return steps / (time.perf_counter() - start)


class OrtGenAI:
    name = "ORT GenAI"

    def __init__(self, gguf: Path, threads: int, tokens: list[int], work: Path):
        import onnxruntime_genai as og

        folder = build_ort_genai_model(gguf, work)
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.og, self.model, self.tokens = og, og.Model(config), tokens
        self.description = (f"onnxruntime-genai {og.__version__}, its builder's int4 CPU model (MatMulNBits, "
                            f"GroupQueryAttention)")

    def _generator(self, length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=length, do_sample=False)
        return self.og.Generator(self.model, params)

    def ttft(self, n: int) -> float:
        generator = self._generator(n + 1)
        start = time.perf_counter()
        generator.append_tokens(self.tokens[:n])  # the prefill
        generator.generate_next_token()  # greedy choice from its logits
        return time.perf_counter() - start

    def decode(self, prompt: int, steps: int) -> float:
        generator = self._generator(prompt + steps + 1)
        generator.append_tokens(self.tokens[:prompt])
        generator.generate_next_token()
        start = time.perf_counter()
        for _ in range(steps):
            generator.generate_next_token()  # runs the model on the last token, then chooses the next
        return steps / (time.perf_counter() - start)


def build_ort_genai_model(gguf: Path, work: Path) -> Path:
    """ORT GenAI's own int4 CPU model of the GGUF: transformers writes a Hugging Face folder (the GGUF
    dequantized), onnxruntime-genai's builder quantizes and exports it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, out = work / "hf", work / "ort_genai_int4"
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer, model.is_quantized = None, False  # loaded from a GGUF but held in float: saveable
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(hf)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(hf)
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                    "-p", "int4", "-e", "cpu"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def llama_bench(gguf: Path, threads: int, repetitions: int) -> dict | None:
    """llama.cpp's own benchmark (pp512, tg128) on the GGUF, when a llama-bench binary is on PATH."""
    binary = shutil.which("llama-bench")
    if binary is None:
        return None
    run = subprocess.run([binary, "-m", str(gguf), "-t", str(threads), "-p", "512", "-n", "128",
                          "-r", str(repetitions), "-o", "json"], check=True, capture_output=True, text=True)
    rows = json.loads(run.stdout)
    return {f"{'pp' if r['n_prompt'] else 'tg'}{r['n_prompt'] or r['n_gen']}_tok_per_s": r["avg_ts"] for r in rows}


def run_rounds(engines: dict, repetitions: int, measure: Callable[[object], dict[str, float]],
               on_engine: Callable[[int, str], None] = lambda rep, name: None) -> dict[str, dict[str, list[float]]]:
    """One warm-up round, then `repetitions` rounds; every round runs `measure` on every engine, the engine order
    rotating by one each round so drift hits all alike. Returns each engine's samples per figure (no warm-up).
    `on_engine(round, name)` runs after each measurement (a progress bar)."""
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in engines}
    names = list(engines)
    for rep in range(repetitions + 1):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            time.sleep(SETTLE_S)
            figures = measure(engines[name])
            if rep:
                for key, value in figures.items():
                    samples[name].setdefault(key, []).append(value)
            on_engine(rep, name)
    return samples


def cpu_times() -> dict[str, float]:
    """System-wide CPU seconds so far (Linux /proc/stat): busy, idle and steal (taken by the hypervisor)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return {}
    tick = 100.0  # USER_HZ
    return {"busy_s": (sum(fields[:3]) + sum(fields[5:7])) / tick, "idle_s": sum(fields[3:5]) / tick,
            "steal_s": fields[7] / tick if len(fields) > 7 else 0.0}


def versions() -> dict[str, str]:
    import contextlib
    import importlib.metadata as md
    import platform

    names = ("ondevice-llama", "onnxruntime", "onnxruntime-genai", "llama_cpp_python", "transformers", "torch",
             "numpy", "gguf")
    out = {"python": platform.python_version()}
    for name in names:
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def summarize(raw: dict[str, dict[str, list[float]]]) -> dict[str, dict]:
    out = {}
    for name, samples in raw.items():
        ttft = {str(n): median_spread(samples[f"ttft{n}"]) for n in TTFT_LENGTHS}
        decode = median_spread(samples["decode"])
        out[name] = {"ttft_s": {n: s["median"] for n, s in ttft.items()}, "ttft_spread_s": ttft,
                     "prefill_tok_per_s": {n: int(n) / s["median"] for n, s in ttft.items()},
                     "decode_tok_per_s": decode["median"], "decode_tok_per_s_spread": decode,
                     "samples": samples}
    return out


def ratios(figures: dict[str, dict]) -> dict[str, dict]:
    """Speedups of ours over each peer (>1: ours is faster): TTFT theirs/ours, decode ours/theirs.

    `*_speedup` is the ratio of the medians; `paired` holds the spread of the ratios taken round by round (both
    engines measured within seconds of each other), which is robust to slow drift of the machine's speed."""
    ours = figures["ours"]["samples"]
    out = {}
    for name, fig in figures.items():
        if name == "ours":
            continue
        theirs = fig["samples"]
        paired = {f"ttft_{n}_speedup": [t / o for o, t in zip(ours[f"ttft{n}"], theirs[f"ttft{n}"], strict=True)]
                  for n in TTFT_LENGTHS}
        paired["decode_speedup"] = [o / t for o, t in zip(ours["decode"], theirs["decode"], strict=True)]
        r: dict = {f"ttft_{n}_speedup": fig["ttft_s"][str(n)] / figures["ours"]["ttft_s"][str(n)]
                   for n in TTFT_LENGTHS}
        r["decode_speedup"] = figures["ours"]["decode_tok_per_s"] / fig["decode_tok_per_s"]
        r["paired"] = {key: median_spread(values) for key, values in paired.items()}
        out[name] = r
    return out


def table(report: dict) -> str:
    def cell(s: dict, scale: float, digits: int) -> str:
        f = f"{{:.{digits}f}}"
        return f"{f.format(s['median'] * scale)} [{f.format(s['min'] * scale)}-{f.format(s['max'] * scale)}]"

    head = ["engine"] + [f"TTFT {n} (ms)" for n in TTFT_LENGTHS] + ["decode (tok/s)"]
    rows = [[name] + [cell(f["ttft_spread_s"][str(n)], 1000, 1) for n in TTFT_LENGTHS]
            + [cell(f["decode_tok_per_s_spread"], 1, 1)] for name, f in report["engines"].items()]
    lines = [f"{report['gguf']}: {report['threads']} threads, {report['repetitions']} repetitions after 1 warm-up; "
             "median [min-max]"]
    widths = [max(len(r[i]) for r in [head] + rows) + 2 for i in range(len(head))]
    for r in [head] + rows:
        lines.append("".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    lines.append("")
    lines.append("speedup of ours over each peer, >1 means ours is faster (TTFT: theirs/ours; decode: ours/theirs);")
    lines.append("ratio of the medians, then [min-max] of the same ratio taken round by round")

    def ratio(r: dict, key: str) -> str:
        p = r["paired"][key]
        return f"{r[key]:.2f}x [{p['min']:.2f}-{p['max']:.2f}]"

    keys = [f"ttft_{n}_speedup" for n in TTFT_LENGTHS] + ["decode_speedup"]
    head = ["peer"] + [f"TTFT {n}" for n in TTFT_LENGTHS] + ["decode"]
    rows = [[name] + [ratio(r, k) for k in keys] for name, r in report["ratios"].items()]
    widths = [max(len(r[i]) for r in [head] + rows) + 2 for i in range(len(head))]
    for r in [head] + rows:
        lines.append("".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    bench, speedups = report.get("llama_bench"), report.get("llama_bench_ratios")
    lines.append("llama-bench: not on PATH" if bench is None else
                 f"llama-bench: pp512 {bench['pp512_tok_per_s']:.1f} tok/s, "
                 f"tg128 {bench['tg128_tok_per_s']:.1f} tok/s; "
                 f"ours over it: prompt {speedups['pp512_speedup']:.2f}x, decode {speedups['tg128_speedup']:.2f}x")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    from ondevice_llama.plotting import require_pyplot

    plt = require_pyplot()

    engines = list(report["engines"])
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:gray"]
    panels = [(f"TTFT {n} tokens (ms, lower is better)", "ttft_spread_s", str(n), 1000) for n in TTFT_LENGTHS]
    panels.append((f"decode after {DECODE_PROMPT} (tok/s, higher is better)", "decode_tok_per_s_spread", None, 1))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4))
    for ax, (title, key, sub, scale) in zip(axes, panels, strict=True):
        spreads = [report["engines"][e][key][sub] if sub else report["engines"][e][key] for e in engines]
        med = [s["median"] * scale for s in spreads]
        err = [[(s["median"] - s["min"]) * scale for s in spreads], [(s["max"] - s["median"]) * scale for s in spreads]]
        bars = ax.bar(engines, med, yerr=err, capsize=4, color=colors[:len(engines)])
        ax.bar_label(bars, labels=[f"{m:.0f}" if m >= 100 else f"{m:.1f}" for m in med], label_type="center",
                     color="white", fontsize=9, fontweight="bold")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
    fig.suptitle(f"{report['gguf']}, {report['threads']} threads, {report['machine']['cpu_count']} CPUs "
                 f"(median, min-max over {report['repetitions']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "vs_peers.json", help="JSON; the PNG goes beside it")
    parser.add_argument("--model", type=Path, default=None, help="an existing CPU-target export of the same GGUF")
    parser.add_argument("--checkpoint", type=Path, default=None, help="GGUF file (default: the default model)")
    parser.add_argument("--engines", default="ours,llama.cpp,ort-genai,transformers")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    from ondevice_llama.loading import default_checkpoint_path

    gguf = (args.checkpoint or default_checkpoint_path()).resolve()
    wanted = [e.strip() for e in args.engines.split(",")]
    if "ours" not in wanted:
        parser.error("--engines must include ours (the ratios are against it)")
    with tempfile.TemporaryDirectory(prefix="vs_peers_") as tmp:
        folder = args.model
        if folder is None:
            from ondevice_llama.export import ExportOptions, export_model
            from ondevice_llama.loading import open_checkpoint

            folder = Path(tmp) / "cpu"
            print(f"exporting the CPU target of {gguf.name} into {folder}", file=sys.stderr)
            export_model(open_checkpoint(gguf), folder, ExportOptions(target="cpu"), progress=not args.quiet)
        from ondevice_llama.runtime import ExportedModel

        probe = ExportedModel(folder, threads=1)
        vocab = min(probe.config.vocab_size, probe.tokenizer.get_vocab_size())
        tokens = draw_tokens(max(TTFT_LENGTHS + (DECODE_PROMPT,)), vocab,
                             special_ids(probe.tokenizer, probe.manifest.special_tokens))
        del probe
        classes = {"ours": lambda: Ours(folder, args.threads, tokens),
                   "llama.cpp": lambda: LlamaCpp(gguf, args.threads, tokens),
                   "ort-genai": lambda: OrtGenAI(gguf, args.threads, tokens, Path(tmp)),
                   "transformers": lambda: Transformers(gguf, args.threads, tokens)}
        engines = {}
        for name in wanted:
            print(f"loading {name}", file=sys.stderr)
            engines[name] = classes[name]()

        cpu_before, wall_before = cpu_times(), time.perf_counter()

        def measure(engine) -> dict[str, float]:
            return {f"ttft{n}": engine.ttft(n) for n in TTFT_LENGTHS} | {
                "decode": engine.decode(DECODE_PROMPT, DECODE_STEPS)}

        with tqdm(total=(args.repetitions + 1) * len(engines), desc="vs peers", unit="engine", file=sys.stderr,
                  disable=args.quiet, dynamic_ncols=True) as bar:
            def progress(rep: int, name: str) -> None:
                bar.set_description("warm-up" if rep == 0 else f"repetition {rep}/{args.repetitions}: {name}")
                bar.update(1)

            raw = run_rounds(engines, args.repetitions, measure, progress)

        cpu_after, wall = cpu_times(), time.perf_counter() - wall_before
        bench = llama_bench(gguf, args.threads, args.repetitions)
    during = {key: round(cpu_after[key] - cpu_before[key], 2) for key in cpu_before} | {"wall_s": round(wall, 1)}
    figures = summarize(raw)
    for name, engine in engines.items():
        figures[name]["description"] = engine.description
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "gguf": gguf.name, "threads": args.threads, "repetitions": args.repetitions, "warmup_runs": 1,
        "method": {"ttft": "prefill of N random non-special token ids from an empty cache + greedy first token",
                   "decode": f"{DECODE_STEPS} greedy decode steps after a {DECODE_PROMPT}-token prompt",
                   "interleaving": "every round runs every engine; the engine order rotates by one each round",
                   "ratios": "speedup of ours over the peer, >1 means ours is faster: TTFT theirs/ours, "
                             "decode ours/theirs"},
        "engines": figures, "ratios": ratios(figures), "llama_bench": bench,
        "llama_bench_ratios": None if bench is None else {
            "pp512_speedup": figures["ours"]["prefill_tok_per_s"]["512"] / bench["pp512_tok_per_s"],
            "tg128_speedup": figures["ours"]["decode_tok_per_s"] / bench["tg128_tok_per_s"]},
        "machine": machine_info() | {"cpu_during_measurement": during}, "versions": versions(),
    }
    print(table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    png = args.out.with_suffix(".png")
    plot(report, png)
    print(f"wrote {args.out} and {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

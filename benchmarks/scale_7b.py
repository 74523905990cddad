"""Llama-2-7B-Chat at full scale on this host: export time and peak memory per target, and CPU-target speed.

    python benchmarks/scale_7b.py [--checkpoint DIR] [--work DIR] [--targets npu,cpu]

The checkpoint is a synthetic one with Llama-2-7B-Chat's exact configuration (random weights: right for
time and memory, meaningless for quality); it is written first if missing (`ondevice-llama synthesize`).
Each export runs in its own process, so its peak RSS (os.wait4's ru_maxrss) is the export's alone; the
manifest gives the memory check's estimate beside it. For the CPU target, a further process measures the
time to first token of a 1024-token prompt and decode tokens/s after it, beside what bounds them on this machine:
its measured memory read rate over the bytes a 4-bit 7B reads per token (every weight at 4.5 bits: 4-bit codes
and a float16 scale per 32), and its measured float32 GEMM rate. Writes benchmarks/results/scale_7b.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "data" / "llama2-tokenizer" / "tokenizer.model"
EXPORT_ARGS = {"npu": ["--target", "npu", "--precision", "w4a16", "--algorithm", "rtn"],
               "cpu": ["--target", "cpu", "--precision", "w4"]}
PROMPT = 1024
BOUND_BITS_PER_WEIGHT = 4.5  # the bandwidth bound's format: 4-bit codes, one float16 scale per 32

SPEED = """
import json, sys, time
from ondevice_llama.runtime.bench import Runner, draw_tokens, special_ids
from ondevice_llama.runtime import ExportedModel
model = ExportedModel(sys.argv[1], threads=int(sys.argv[2]) or None)
runner = Runner(model, draw_tokens({prompt}, model.config.vocab_size, special_ids(model.tokenizer)))
runner.ttft(16)  # sessions warm
prefill, ttft = runner.ttft({prompt})
tok_s = runner.decode(128, int(sys.argv[3]))  # after a 128-token prompt, as `ondevice-llama bench`
print(json.dumps({{"ttft_{prompt}_s": ttft, "prefill_{prompt}_s": prefill, "decode_tok_per_s": tok_s}}))
"""


def run_measured(command: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS in GB of that process alone, stdout) of one command."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(command)}")
    return seconds, usage.ru_maxrss * 1024 / 1e9, out


def ensure_checkpoint(path: Path) -> None:
    if (path / "config.json").exists():
        return
    command = [sys.executable, "-m", "ondevice_llama.cli.main", "synthesize", "--config", "llama-2-7b-chat",
               "--out", str(path)] + (["--tokenizer", str(TOKENIZER)] if TOKENIZER.exists() else [])
    subprocess.run(command, check=True)


def measure_target(target: str, checkpoint: Path, work: Path, threads: int, steps: int, reuse: Path | None) -> dict:
    out = work / target
    command = [sys.executable, "-m", "ondevice_llama.cli.main", "export", "--checkpoint", str(checkpoint),
               "--out", str(out), "--quiet", *EXPORT_ARGS[target]]
    print(f"{target}: {' '.join(command[2:])}", file=sys.stderr, flush=True)
    if reuse and (out / "manifest.json").exists():  # keep the earlier run's export figures
        earlier = next(e for e in json.loads(reuse.read_text())["entries"] if e["target"] == target)
        seconds, peak = earlier["export_s"], earlier["peak_rss_gb"]
    else:
        seconds, peak, _ = run_measured(command)
    manifest = json.loads((out / "manifest.json").read_text())
    memory = manifest["extra"]["memory"]
    entry = {"target": target, "precision": manifest["precision"], "parts": len(manifest["parts"]),
             "context_length": manifest["context_length"],
             "quantization": manifest["extra"].get("quantization", {}).get("description"),
             "export_s": round(seconds, 1), "peak_rss_gb": round(peak, 2),
             "estimated_peak_gb": memory["estimated_peak_gb"], "sampled_peak_gb": memory["measured_peak_gb"],
             "estimate_error": round(memory["estimated_peak_gb"] / peak - 1, 3),
             "size_gb": round(sum(f.stat().st_size for f in out.iterdir()) / 1e9, 2)}
    if target == "cpu":
        speed_command = [sys.executable, "-c", SPEED.format(prompt=PROMPT), str(out), str(threads), str(steps)]
        print(f"{target}: TTFT of a {PROMPT}-token prompt and {steps} decode steps", file=sys.stderr, flush=True)
        _, runtime_peak, text = run_measured(speed_command)
        speed = json.loads(text.strip().splitlines()[-1])
        entry |= {k: round(v, 3) for k, v in speed.items()} | {"runtime_peak_rss_gb": round(runtime_peak, 2)}
        entry |= bounds(entry, checkpoint, out, threads)
    return entry


def read_bandwidth_gbs(threads: int, gigabytes: float = 2.0) -> float:
    """Memory read rate in GB/s with `threads` threads: the best of 5 passes taking the maximum of a byte buffer far
    larger than the caches, split between the threads (a SIMD compare per 32 bytes: the memory, not the core,
    sets its pace; numpy releases the GIL in the reduction)."""
    import numpy as np

    data = np.ones(int(gigabytes * 1e9), dtype=np.uint8)
    chunks = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            start = time.perf_counter()
            list(pool.map(np.max, chunks))
            best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def gemm_gflops(size: int = 2048) -> float:
    """float32 GEMM rate of numpy's BLAS on this machine (all its threads), GFLOP/s: the best of 5."""
    import numpy as np

    a, b = (np.random.default_rng(0).standard_normal((size, size), dtype=np.float32) for _ in range(2))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def bounds(entry: dict, checkpoint: Path, out: Path, threads: int) -> dict:
    """The CPU entry's weight bytes, and what this machine allows: decode at its read rate over a 4.5-bit 7B's
    bytes, prefill at its GEMM rate."""
    from ondevice_llama.loading import open_checkpoint
    from ondevice_llama.loading.names import num_parameters
    from ondevice_llama.manifest import load_manifest

    params = num_parameters(open_checkpoint(checkpoint).config)
    bandwidth = read_bandwidth_gbs(threads or os.cpu_count() or 1)
    bound = bandwidth * 1e9 / (params * BOUND_BITS_PER_WEIGHT / 8)
    weights = sum((out / part.weights_file).stat().st_size for part in load_manifest(out).parts)
    gemm = gemm_gflops()
    result = {"parameters": params, "weights_gb": round(weights / 1e9, 2), "read_bandwidth_gbs": round(bandwidth, 1),
              "bandwidth_bound_tok_per_s": round(bound, 2), "gemm_gflops": round(gemm, 1),
              "gemm_bound_ttft_s": round(2 * params * PROMPT / (gemm * 1e9), 1)}
    if "decode_tok_per_s" in entry:
        result["decode_share_of_bound"] = round(entry["decode_tok_per_s"] / bound, 3)
        result["runtime_rss_over_weights"] = round(entry["runtime_peak_rss_gb"] * 1e9 / weights, 2)
    return result


def table(entries: list[dict]) -> str:
    rows = [["target", "precision", "export", "peak RSS", "estimate", "error", f"TTFT {PROMPT}", "decode"]]
    for e in entries:
        rows.append([e["target"], e["quantization"] or e["precision"], f"{e['export_s'] / 60:.1f} min",
                     f"{e['peak_rss_gb']:.2f} GB", f"{e['estimated_peak_gb']:.2f} GB",
                     f"{100 * e['estimate_error']:+.0f}%",
                     f"{e[f'ttft_{PROMPT}_s']:.1f} s" if f"ttft_{PROMPT}_s" in e else "-",
                     f"{e['decode_tok_per_s']:.2f} tok/s" if "decode_tok_per_s" in e else "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/ondevice-llama-bench/llama-2-7b-chat"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/ondevice-llama-bench/exports"))
    parser.add_argument("--targets", default="npu,cpu")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: all cores)")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--reuse-exports", action="store_true",
                        help="keep exports (and their figures in --json) from an earlier run; measure speed again")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "scale_7b.json")
    args = parser.parse_args()
    ensure_checkpoint(args.checkpoint)
    args.work.mkdir(parents=True, exist_ok=True)
    targets = args.targets.split(",")
    reuse = args.json if args.reuse_exports and args.json.exists() else None
    entries = [measure_target(t, args.checkpoint, args.work, args.threads, args.decode_steps, reuse) for t in targets]
    if args.json.exists():  # keep the latest entry of each target not measured in this run
        earlier = json.loads(args.json.read_text()).get("entries", [])
        entries = [e for e in earlier if e["target"] not in targets] + entries
    from ondevice_llama.runtime.bench import machine_info

    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
              "checkpoint": str(args.checkpoint), "model": "synthetic Llama-2-7B-Chat (exact config, random weights)",
              "swap_gb": _swap_gb(), "entries": entries}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(table(entries))
    for e in entries:
        if "bandwidth_bound_tok_per_s" in e:
            print(f"cpu: {e['parameters'] / 1e9:.2f}B weights at {BOUND_BITS_PER_WEIGHT} bits over a read rate of "
                  f"{e['read_bandwidth_gbs']} GB/s: bound {e['bandwidth_bound_tok_per_s']} tok/s; decode "
                  f"{e['decode_tok_per_s']:.2f} tok/s is {e['decode_share_of_bound']:.0%} of it (goal 60%). Weights "
                  f"{e['weights_gb']} GB, runtime peak RSS {e['runtime_peak_rss_gb']} GB "
                  f"({e['runtime_rss_over_weights']}x; goal 1.2x). GEMM {e['gemm_gflops']} GFLOP/s: a {PROMPT}-token "
                  f"prompt needs at least {e['gemm_bound_ttft_s']} s (TTFT {e[f'ttft_{PROMPT}_s']:.1f} s)")
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _swap_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("SwapTotal:"):
            return round(int(line.split()[1]) * 1024 / 1e9, 2)
    return 0.0


if __name__ == "__main__":
    sys.exit(main())

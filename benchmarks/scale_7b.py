"""Llama-2-7B-Chat at full scale on this host: export time and peak memory per target, and CPU-target speed.

    python benchmarks/scale_7b.py [--checkpoint DIR] [--work DIR] [--targets npu,cpu]

The checkpoint is a synthetic one with Llama-2-7B-Chat's exact configuration (random weights: right for
time and memory, meaningless for quality); it is written first if missing (`ondevice-llama synthesize`).
Each export runs in its own process, so its peak RSS (os.wait4's ru_maxrss) is the export's alone; the
manifest gives the memory check's estimate beside it. For the CPU target, a further process measures the
time to first token of a 1024-token prompt and decode tokens/s after it. Writes
benchmarks/results/scale_7b.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "data" / "llama2-tokenizer" / "tokenizer.model"
EXPORT_ARGS = {"npu": ["--target", "npu", "--precision", "w4a16", "--algorithm", "rtn"],
               "cpu": ["--target", "cpu", "--precision", "w4"]}
PROMPT = 1024

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
    return entry


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
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _swap_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("SwapTotal:"):
            return round(int(line.split()[1]) * 1024 / 1e9, 2)
    return 0.0


if __name__ == "__main__":
    sys.exit(main())

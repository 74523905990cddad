"""What a long prompt leaves in memory on the CPU target: whole prompts against the engine's chunks.

    python benchmarks/prefill_memory.py [--layers 4] [--prompts 4] [--out benchmarks/results/prefill_memory.json]

ONNX Runtime's CPU arena keeps what a run needed, so the resident size after a prompt follows the largest run's
activations, not the weights. This writes a synthetic checkpoint with Llama-2-7B-Chat's widths and --layers
layers, exports its cpu target (one graph, as 7B-class models get by default), and in one fresh process per
mode loads it, runs --prompts prompts of 1,024 tokens (TTFT each) and 16 decode steps, and reads the process's
resident size at each stage: `whole` runs each prompt in one go, `chunked` in the engine's chunks
(`runtime.cpu_engine.prefill_chunk_length`). The modes alternate twice; timings are medians.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "prefill_memory.json"
PROMPT = 1024

MEASURE = """
import json, resource, sys, time
from ondevice_llama.runtime import ExportedModel
from ondevice_llama.runtime.bench import Runner, draw_tokens, special_ids

def resident_gb():
    status = open("/proc/self/status").read()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024 / 1e9

model = ExportedModel(sys.argv[1], threads=2)
if sys.argv[2] == "whole":
    model.engine.chunk_length = 10**9
loaded = resident_gb()
runner = Runner(model, draw_tokens({prompt}, model.config.vocab_size, special_ids(model.tokenizer)))
ttft = [runner.ttft({prompt})[1] for _ in range(int(sys.argv[3]))]
after = resident_gb()
decode = runner.decode(128, 16)
print(json.dumps({{"chunk_length": min(model.engine.chunk_length, {prompt}), "loaded_gb": loaded,
                  "after_prompts_gb": after, "after_decode_gb": resident_gb(),
                  "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "ttft_s": ttft,
                  "decode_tok_per_s": decode}}))
"""


def run(command: list[str]) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import numpy as np

    from ondevice_llama.runtime.bench import machine_info

    cli = [sys.executable, "-m", "ondevice_llama.cli.main"]
    with tempfile.TemporaryDirectory(prefix="prefill_memory_") as tmp:
        checkpoint, export = Path(tmp) / "checkpoint", Path(tmp) / "cpu"
        run([*cli, "synthesize", "--config", "llama-2-7b-chat", "--layers", str(args.layers), "--out",
             str(checkpoint), "--quiet"])
        run([*cli, "export", "--checkpoint", str(checkpoint), "--target", "cpu", "--prefill-accuracy-level", "4",
             "--context-length", str(PROMPT), "--out", str(export), "--quiet"])
        weights = sum(f.stat().st_size for f in export.glob("weights_part*.bin")) / 1e9
        runs: dict[str, list[dict]] = {"whole": [], "chunked": []}
        for _ in range(2):
            for mode, results in runs.items():
                command = [sys.executable, "-c", MEASURE.format(prompt=PROMPT), str(export), mode, str(args.prompts)]
                results.append(json.loads(run(command).strip().splitlines()[-1]))
    rows = {}
    for mode, results in runs.items():
        rows[mode] = {key: round(float(np.median([r[key] for r in results])), 3)
                      for key in ("chunk_length", "loaded_gb", "after_prompts_gb", "after_decode_gb", "peak_gb",
                                  "decode_tok_per_s")}
        rows[mode]["ttft_s"] = round(float(np.median([t for r in results for t in r["ttft_s"]])), 3)
    print(f"Llama-2-7B widths, {args.layers} layers, cpu target ({weights:.2f} GB of weights), {args.prompts} prompts "
          f"of {PROMPT} tokens, 2 threads")
    print(f"{'mode':8s} {'chunk':>6s} {'loaded':>8s} {'after prompts':>14s} {'peak':>8s} {'TTFT':>8s} {'decode':>10s}")
    for mode, row in rows.items():
        print(f"{mode:8s} {row['chunk_length']:6.0f} {row['loaded_gb']:6.2f} GB {row['after_prompts_gb']:11.2f} GB "
              f"{row['peak_gb']:5.2f} GB {row['ttft_s']:6.2f} s {row['decode_tok_per_s']:6.1f} tok/s")
    data = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
            "model": f"synthetic Llama-2-7B-Chat widths, {args.layers} layers", "weights_gb": round(weights, 3),
            "prompt_tokens": PROMPT, "prompts": args.prompts, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

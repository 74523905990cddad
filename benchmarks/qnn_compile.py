"""QNN HTP compile time and memory: the default model whole, one part of Llama-2-7B, and 1x1 Conv against MatMul.

    python benchmarks/qnn_compile.py [--work DIR] [--soc SM8650] [--skip-7b] [--conv-comparison]

(--skip-7b keeps the 7B part of an earlier results file, dated.)

- default model: `ondevice-llama export` (npu defaults: w4a16 GPTQ block 32, N = 128, C = 1024) once, then
  `ondevice-llama compile` in its own process (wall time and peak RSS from os.wait4), with the simulator's
  per-graph binaries, as the README's commands do;
- Llama-2-7B: a synthetic checkpoint with its exact configuration (`ondevice-llama synthesize`), exported for
  the npu target (w4a16 RTN, 4 parts of 8 layers), then `compile --part 1 --device-only`: one 8-layer part,
  both graphs into one weight-shared binary;
- with --conv-comparison: the default model's first 2 layers exported with projections as MatMul and as 1x1
  Conv, each graph compiled alone (minutes for Conv).

Per graph: nodes, seconds, peak RSS, context binary size and CPU-assigned nodes (0: the compile refuses any), and
each part's estimated context size (export.part_size) beside the binary's. The machine's memory and CPU pressure
(/proc/pressure) is recorded: this 2-core VM's page cache thrashed once under host pressure and a compile took
5x longer, so a run with high pressure is marked. Writes benchmarks/results/qnn_compile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "qnn_compile.json"
CLI = [sys.executable, "-m", "ondevice_llama.cli.main"]


def pressure() -> dict[str, float]:
    """avg60 of 'some' memory and CPU pressure, in percent (Linux PSI); empty where unavailable."""
    out = {}
    for kind in ("memory", "cpu"):
        try:
            line = Path(f"/proc/pressure/{kind}").read_text().splitlines()[0]
            out[kind] = float(dict(f.split("=") for f in line.split()[1:])["avg60"])
        except (OSError, KeyError, ValueError, IndexError):
            pass
    return out


def run_measured(command: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of one command in its own process."""
    start = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(command)}")
    return seconds, usage.ru_maxrss * 1024 / 1e9


def graph_rows(part: dict, estimate: float) -> list[dict]:
    rows = []
    for kind, g in part["graphs"].items():
        rows.append({"graph": kind, "nodes": g["nodes"], "seconds": g["seconds"], "peak_rss_gb": g["peak_rss_gb"],
                     "cpu_nodes": g["cpu_nodes"], "binary": part["binary"], "binary_mb": part["binary_bytes"] / 1e6,
                     "estimated_mb": estimate / 1e6, "qnn_graph": g["qnn_graph"]})
    for kind, g in part.get("simulator", {}).items():
        rows.append({"graph": f"{kind} (simulator)", "nodes": part["graphs"][kind]["nodes"],
                     "seconds": g["seconds"], "peak_rss_gb": g["peak_rss_gb"], "cpu_nodes": 0,
                     "binary": g["file"].replace(".onnx", "_qnn.bin"), "binary_mb": g["binary_bytes"] / 1e6})
    return rows


def estimates(export: Path) -> list[float]:
    from ondevice_llama.export.exporter import plan_parts
    from ondevice_llama.export.part_size import part_bytes, storage_of
    from ondevice_llama.manifest import load_manifest
    from ondevice_llama.quantization.recipe import Recipe

    m = load_manifest(export)
    recipe = m.extra.get("quantization", {}).get("recipe")
    storage = storage_of(m.precision, Recipe.from_dict(recipe) if recipe else None)
    return [part_bytes(m.config, p, storage) for p in plan_parts(m.config.num_layers, len(m.parts))]


def default_model(work: Path, soc: str) -> dict:
    export, compiled = work / "default_export", work / "default_compiled"
    if not (export / "manifest.json").exists():
        run_measured(CLI + ["export", "--out", str(export), "--quiet"])
    before = pressure()
    seconds, rss = run_measured(CLI + ["compile", str(export), "--soc", soc, "--out", str(compiled), "--quiet"])
    manifest = json.loads((compiled / "manifest.json").read_text())
    sizes = estimates(export)
    return {"export": str(export), "compiled": str(compiled), "soc": soc, "seconds": round(seconds, 1),
            "peak_rss_gb": round(rss, 3), "pressure_before": before, "pressure_after": pressure(),
            "graphs": [r for p, e in zip(manifest["compiled"]["parts"], sizes, strict=True) for r in graph_rows(p, e)]}


def llama2_part(work: Path, soc: str) -> dict:
    checkpoint, export, compiled = work / "llama2_7b", work / "llama2_7b_npu", work / "llama2_7b_compiled"
    if not (checkpoint / "config.json").exists():
        subprocess.run(CLI + ["synthesize", "--config", "llama-2-7b-chat", "--out", str(checkpoint), "--quiet"],
                       check=True)
    if not (export / "manifest.json").exists():
        run_measured(CLI + ["export", "--checkpoint", str(checkpoint), "--out", str(export), "--precision", "w4a16",
                            "--algorithm", "rtn", "--quiet"])
    before = pressure()
    seconds, rss = run_measured(CLI + ["compile", str(export), "--soc", soc, "--out", str(compiled), "--part", "1",
                                       "--device-only", "--quiet"])
    progress = json.loads((work / f".{compiled.name}.partial" / "progress.json").read_text())
    part = next(e["record"] for e in progress["parts"] if e["index"] == 0)
    return {"export": str(export), "part": 1, "layers": "0-7", "soc": soc, "seconds": round(seconds, 1),
            "peak_rss_gb": round(rss, 3), "pressure_before": before, "pressure_after": pressure(),
            "graphs": graph_rows(part, estimates(export)[0])}


def conv_against_matmul(work: Path, soc: str) -> list[dict]:
    from ondevice_llama.export import ExportOptions, export_model
    from ondevice_llama.loading import open_checkpoint

    checkpoint = open_checkpoint(None)
    checkpoint = replace(checkpoint, config=replace(checkpoint.config, num_layers=2))
    rows = []
    for name, conv in (("matmul", False), ("conv", True)):
        export = work / f"two_layers_{name}"
        if not (export / "manifest.json").exists():
            export_model(checkpoint, export, ExportOptions(num_parts=1, use_conv=conv, algorithm="rtn"),
                         progress=False)
        seconds, rss = run_measured(CLI + ["compile", str(export), "--soc", soc, "--out",
                                           str(work / f"two_layers_{name}_compiled"), "--device-only", "--quiet"])
        part = json.loads((work / f"two_layers_{name}_compiled" / "manifest.json").read_text())["compiled"]["parts"][0]
        for kind, g in part["graphs"].items():
            rows.append({"projections": name, "graph": kind, "nodes": g["nodes"], "seconds": g["seconds"],
                         "peak_rss_gb": g["peak_rss_gb"]})
    return rows


def table(title: str, rows: list[dict]) -> str:
    lines = [title, f"{'graph':<34}{'nodes':>7}{'seconds':>9}{'peak RSS':>10}{'binary':>11}{'estimate':>10}{'CPU':>5}"]
    for r in rows:
        estimate = f"{r['estimated_mb']:.1f} MB" if "estimated_mb" in r else ""
        lines.append(f"{r['graph']:<34}{r['nodes']:>7}{r['seconds']:>9.1f}{r['peak_rss_gb']:>8.2f} GB"
                     f"{r['binary_mb']:>8.1f} MB{estimate:>10}{r['cpu_nodes']:>5}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "ondevice-llama" / "qnn_compile")
    parser.add_argument("--soc", default="SM8650")
    parser.add_argument("--skip-7b", action="store_true")
    parser.add_argument("--conv-comparison", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    import onnxruntime_qnn

    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": {
        "cpu_count": os.cpu_count(), "onnxruntime_qnn": onnxruntime_qnn.__version__}}
    report["default_model"] = default_model(args.work, args.soc)
    print(table(f"default model, whole compile: {report['default_model']['seconds']:.0f} s, peak RSS "
                f"{report['default_model']['peak_rss_gb']:.2f} GB", report["default_model"]["graphs"]), flush=True)
    if not args.skip_7b:
        report["llama2_7b_part"] = llama2_part(args.work, args.soc)
        r = report["llama2_7b_part"]
        print(table(f"Llama-2-7B part 1 (8 layers): {r['seconds']:.0f} s, peak RSS {r['peak_rss_gb']:.2f} GB",
                    r["graphs"]), flush=True)
    if args.conv_comparison:
        report["conv_against_matmul"] = conv_against_matmul(args.work, args.soc)
        for r in report["conv_against_matmul"]:
            print(f"2 layers, {r['projections']:<7}{r['graph']:<18}{r['seconds']:>8.1f} s {r['peak_rss_gb']:>6.2f} GB")
    if args.skip_7b and args.out.exists():  # keep the 7B part measured by an earlier run, with that run's date
        earlier = json.loads(args.out.read_text())
        if "llama2_7b_part" in earlier:
            report["llama2_7b_part"] = {"date": earlier.get("date")} | earlier["llama2_7b_part"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

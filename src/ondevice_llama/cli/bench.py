"""`ondevice-llama bench`: time to first token, prefill and decode speed, per-part latency and peak memory.

The measurement is ondevice_llama.runtime.bench's (what each figure means is said there); this prints the
table and writes the JSON report and the plot. Only the standard library is imported at module level;
the runtime and matplotlib inside functions, and never torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--prompt-lengths: takes comma-separated integers, got {text!r}") from None
    if not lengths or lengths[0] < 1:
        raise ValueError(f"--prompt-lengths: must be positive, got {text!r}")
    return lengths


# ---------------------------------------------------------------- output


def _row(label: str, s: dict[str, float] | None, unit: str, scale: float = 1.0, digits: int = 1,
         width: int = 34) -> str:
    if s is None:
        return f"{label:<{width}}{'-':>10}"
    f = f"{{:.{digits}f}}"
    return (f"{label:<{width}}{f.format(s['median'] * scale):>10} {unit:<6} "
            f"[{f.format(s['min'] * scale)} - {f.format(s['max'] * scale)}]  "
            f"IQR {f.format(s['q1'] * scale)} - {f.format(s['q3'] * scale)}")


def format_table(report: dict[str, Any]) -> str:
    rows: list[tuple[str, dict[str, float] | None, str, float, int]] = []
    for n, s in report["ttft_spread_s"].items():
        rows.append((f"TTFT {n} tokens", s, "ms", 1000, 1))
    for n, s in report["prefill_tok_per_s_spread"].items():
        rows.append((f"prefill {n} tokens", s, "tok/s", 1, 0))
    rows.append(("pp512", report["pp512_spread"], "tok/s", 1, 0))
    rows.append((f"decode after {report['decode_prompt_tokens']} ({report['decode_steps']} steps)",
                 report["decode_tok_per_s_spread"], "tok/s", 1, 1))
    rows.append((f"tg{report['tg_steps']} (from an empty context)", report["tg128_spread"], "tok/s", 1, 1))
    pl = report["part_latency_ms"]
    for kind, label in (("decode_step", f"decode step at {pl['decode_position']}"),
                        ("prefill", f"prefill {pl['prefill_tokens']}")):
        for i, s in enumerate(pl[kind]["parts_ms"]):
            rows.append((f"{label}: part {i + 1} session", s, "ms", 1, 3))
        rows.append((f"{label}: host (outside sessions)", pl[kind]["host_ms"], "ms", 1, 3))
        rows.append((f"{label}: whole call", pl[kind]["wall_ms"], "ms", 1, 3))
    width = max(len(r[0]) for r in rows) + 2
    threads = report["threads"] or "default"
    lines = [f"{report['model']}: {report['target']} target, {report['precision']}, {report['parts']} part(s), "
             f"C={report['context_length']}, threads {threads}, {report['repetitions']} repetitions after 1 warm-up",
             f"{'figure':<{width}}{'median':>10} {'unit':<6} [min - max]  IQR"]
    lines += [_row(*row, width=width) for row in rows]
    lines.append(f"{'peak RSS':<{width}}{report['peak_rss_gb']:>10.2f} GB")
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Two panels: TTFT vs prompt length; prefill tokens/s vs prompt length with decode tokens/s as a line."""
    from ..plotting import require_pyplot

    plt = require_pyplot()

    def series(spreads: dict[str, dict[str, float]], scale: float = 1.0):
        xs = [int(n) for n in spreads]
        med = [spreads[n]["median"] * scale for n in spreads]
        err = [[(spreads[n]["median"] - spreads[n]["min"]) * scale for n in spreads],
               [(spreads[n]["max"] - spreads[n]["median"]) * scale for n in spreads]]
        return xs, med, err

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs, med, err = series(report["ttft_spread_s"], 1000)
    left.errorbar(xs, med, yerr=err, marker="o", capsize=3)
    left.set(xlabel="prompt tokens", ylabel="time to first token (ms)", title="TTFT (median, min-max)")
    xs, med, err = series(report["prefill_tok_per_s_spread"])
    right.errorbar(xs, med, yerr=err, marker="o", capsize=3, label="prefill")
    decode = report["decode_tok_per_s"]
    right.axhline(decode, color="tab:red", linestyle="--",
                  label=f"decode after {report['decode_prompt_tokens']}: {decode:.1f} tok/s")
    right.set(xlabel="prompt tokens", ylabel="tokens/s", title="prefill and decode speed")
    right.set_ylim(bottom=0)
    right.legend(loc="best")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    threads = report["threads"] or "default"
    fig.suptitle(f"{report['model']} - {report['target']} {report['precision']}, threads {threads}, "
                 f"{report['machine']['cpu_count']} CPUs")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_bench(args) -> int:
    from ..runtime import ExportedModel
    from ..runtime.bench import measure, summarize

    if args.repetitions < 1:
        raise ValueError(f"--repetitions: must be at least 1, got {args.repetitions}")
    lengths = parse_lengths(args.prompt_lengths)
    if args.plot:
        from ..plotting import require_pyplot

        require_pyplot()  # before measuring, not after
    model = ExportedModel(args.model, threads=args.threads)
    report = summarize(model, args.threads, args.repetitions,
                       measure(model, args.repetitions, lengths, progress=not args.quiet))
    print(format_table(report), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


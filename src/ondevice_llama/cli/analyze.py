"""`ondevice-llama analyze`: the 4-bit sensitivity of every projection, and a recipe that keeps the worst at 8 bits.

The measure and the recipe are `ondevice_llama.quantization.sensitivity`'s; the reporting is here: the table
it prints (`format_table`), the JSON report (`report_dict`, `save_report`) and the heatmap (`plot_heatmap`).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from ..loading import open_checkpoint
from ..loading.names import PROJECTIONS
from ..quantization import sensitivity
from ..quantization.pipeline import calibration_batch
from ..quantization.recipe import Recipe
from ..quantization.sensitivity import BITS, SensitivityReport

REPORT_FORMAT = "ondevice-llama-sensitivity"
REPORT_VERSION = 1


def run_analyze(args: argparse.Namespace) -> int:
    """`ondevice-llama analyze`: measure, print the table, write the recipe (and the JSON report and heatmap)."""
    block_size = args.block_size or None
    if not 0 <= args.budget <= 1:
        raise ValueError(f"--budget: must be a fraction between 0 and 1, got {args.budget}")
    if args.max_tokens < 0:
        raise ValueError(f"--max-tokens: must be 0 (all) or positive, got {args.max_tokens}")
    for option, path in (("--out", args.out), ("--json", args.json), ("--plot", args.plot)):
        if path is not None and Path(path).is_dir():
            raise ValueError(f"{path}: is a folder; {option} takes a file name")
    if args.plot is not None:
        from ..plotting import require_pyplot

        require_pyplot()  # before measuring, not after
    checkpoint = open_checkpoint(args.checkpoint)
    sensitivity.check_block_size(checkpoint, block_size)
    calibration, info = calibration_batch(checkpoint, args.calibration_file)
    report = sensitivity.analyze_sensitivity(checkpoint, calibration, block_size, args.algorithm, args.max_tokens,
                                             info, progress=not args.quiet, sink_token=info["attention_sink_token"],
                                             rotation=args.rotation)
    recipe = sensitivity.sensitivity_recipe(report, args.budget)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    recipe.save(args.out)
    if args.json is not None:
        save_report(report, args.json, recipe, args.budget)
    if args.plot is not None:
        plot_heatmap(report, args.plot, recipe.overrides)
    print(format_table(report, recipe.overrides))
    eight_bit = sum(p.parameters for p in report.pieces if p.name in recipe.overrides)
    print(f"recipe {recipe.describe()}: {len(recipe.overrides)} of {len(report.pieces)} projections at 8 bits, "
          f"{eight_bit / report.projection_parameters:.1%} of the projection parameters (budget {args.budget:.0%}); "
          f"measured in {report.seconds:.0f} s -> {args.out}")
    return 0


def _finite(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None


def report_dict(report: SensitivityReport, recipe: Recipe | None = None, budget: float | None = None) -> dict:
    ranks = {p.name: i + 1 for i, p in enumerate(report.ranked())}
    data = {
        "format": REPORT_FORMAT, "format_version": REPORT_VERSION, "model": report.model,
        "checkpoint": report.checkpoint, "bits": BITS, "block_size": report.recipe.block_size,
        "algorithm": report.recipe.algorithm, "measure": "SQNR (dB) of the decoder block output with only this "
        "piece quantized, float hidden states in; projection_sqnr_db: the projection's own output",
        "calibration": report.calibration, "seconds": round(report.seconds, 2),
        "pieces": [{"name": p.name, "layer": p.layer, "projection": p.projection, "shape": list(p.shape),
                    "parameters": p.parameters, "sqnr_db": _finite(p.sqnr_db),
                    "projection_sqnr_db": _finite(p.projection_sqnr_db), "rank": ranks[p.name]}
                   for p in report.pieces],
        "heads": [{"name": h.name, "bits": h.bits, "measured_on": h.measured_on, "sqnr_db": _finite(h.sqnr_db),
                   "parameters": h.parameters} for h in report.heads],
    }
    if recipe is not None:
        eight_bit = sum(p.parameters for p in report.pieces if p.name in recipe.overrides)
        data["recipe"] = {"budget": budget, "description": recipe.describe(), "overrides": recipe.overrides,
                          "eight_bit_parameters": eight_bit, "projection_parameters": report.projection_parameters,
                          "eight_bit_fraction": eight_bit / report.projection_parameters, "recipe": recipe.to_dict()}
    return data


def save_report(report: SensitivityReport, path: Path, recipe: Recipe | None = None, budget: float | None = None
                ) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report_dict(report, recipe, budget), indent=1))


def _grouping(recipe: Recipe) -> str:
    return f"block {recipe.block_size}" if recipe.block_size else "per channel"


def format_table(report: SensitivityReport, overrides: dict[str, int] | None = None, worst: int = 5) -> str:
    """Layers x projections SQNR (dB); `*` marks the pieces kept at 8 bits, `<` the layer's worst piece."""
    overrides = overrides or {}
    names = [p.replace("_proj", "") for p in PROJECTIONS]
    lines = [f"4-bit sensitivity of {report.model}: SQNR (dB) of each layer's output with only that projection "
             f"quantized ({_grouping(report.recipe)}, {report.recipe.algorithm}, "
             f"{report.calibration['tokens_measured']} calibration tokens); higher is better",
             f"{'layer':>5} " + "".join(f"{n:>9}" for n in names)]
    grid = report.grid()
    for layer in range(report.num_layers):
        low = np.nanargmin(grid[layer]) if np.isfinite(grid[layer]).any() else -1
        cells = []
        for j, proj in enumerate(PROJECTIONS):
            mark = "*" if f"layers.{layer}.{proj}" in overrides else "<" if j == low else " "
            cells.append(f"{grid[layer, j]:>8.1f}{mark}")
        lines.append(f"{layer:>5} " + "".join(cells))
    lines.append("* kept at 8 bits by the recipe; < the layer's most sensitive projection")
    ranked = report.ranked()
    lines.append("most sensitive: " + ", ".join(f"{p.name} {p.sqnr_db:.1f}" for p in ranked[:worst]))
    lines.append("least sensitive: " + ", ".join(f"{p.name} {p.sqnr_db:.1f}" for p in ranked[::-1][:worst]))
    by_projection = np.ma.masked_invalid(grid).mean(axis=0).filled(np.inf)
    lines.append("mean per projection: " + ", ".join(f"{n} {v:.1f}" for n, v in zip(names, by_projection, strict=True)))
    for h in report.heads:
        figure = f"{h.sqnr_db:.1f} dB" if math.isfinite(h.sqnr_db) else "exact (the weights are on this grid already)"
        lines.append(f"{h.name} at {h.bits} bits: {h.measured_on} SQNR {figure}")
    return "\n".join(lines)


def plot_heatmap(report: SensitivityReport, path: Path, overrides: dict[str, int] | None = None) -> None:
    """Layers x projections heatmap of the SQNR; pieces kept at 8 bits are outlined."""
    from ..plotting import require_pyplot

    plt = require_pyplot()
    from matplotlib.patches import Rectangle

    overrides = overrides or {}
    grid = report.grid()
    finite = grid[np.isfinite(grid)]
    shown = np.clip(grid, None, finite.max() if finite.size else 0)
    layers = report.num_layers
    fig, ax = plt.subplots(figsize=(7.5, max(3.0, 0.28 * layers + 1.6)))
    image = ax.imshow(shown, aspect="auto", cmap="RdYlGn", interpolation="nearest")
    ax.set_xticks(range(len(PROJECTIONS)), [p.replace("_proj", "") for p in PROJECTIONS])
    ax.set_yticks(range(layers))
    ax.tick_params(axis="y", labelsize=7 if layers > 24 else 9)
    ax.set(xlabel="projection", ylabel="layer")
    if layers <= 48:
        for i in range(layers):
            for j in range(len(PROJECTIONS)):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=6 if layers > 24 else 8)
    for name in overrides:
        _, layer, proj = name.split(".")
        if proj in PROJECTIONS:
            ax.add_patch(Rectangle((PROJECTIONS.index(proj) - 0.5, int(layer) - 0.5), 1, 1, fill=False,
                                   edgecolor="black", linewidth=1.6))
    fig.colorbar(image, ax=ax, label="SQNR of the layer output (dB)")
    title = f"{report.model}: 4-bit ({_grouping(report.recipe)}, {report.recipe.algorithm}) sensitivity"
    if overrides:
        title += f"\noutlined: {len(overrides)} pieces kept at 8 bits"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


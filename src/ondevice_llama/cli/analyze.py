"""`ondevice-llama analyze`: the 4-bit sensitivity of every projection, and a recipe that keeps the worst at 8 bits.

The measure and the recipe are `ondevice_llama.quantization.sensitivity`'s; this prints the table and writes
the recipe, and the JSON report and heatmap when asked.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def run_analyze(args: argparse.Namespace) -> int:
    """`ondevice-llama analyze`: measure, print the table, write the recipe (and the JSON report and heatmap)."""
    from ..loading import open_checkpoint
    from ..quantization import sensitivity
    from ..quantization.pipeline import calibration_batch

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
                                             info, progress=not args.quiet, sink_token=info["attention_sink_token"])
    recipe = sensitivity.sensitivity_recipe(report, args.budget)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    recipe.save(args.out)
    if args.json is not None:
        sensitivity.save_report(report, args.json, recipe, args.budget)
    if args.plot is not None:
        sensitivity.plot_heatmap(report, args.plot, recipe.overrides)
    print(sensitivity.format_table(report, recipe.overrides))
    eight_bit = sum(p.parameters for p in report.pieces if p.name in recipe.overrides)
    print(f"recipe {recipe.describe()}: {len(recipe.overrides)} of {len(report.pieces)} projections at 8 bits, "
          f"{eight_bit / report.projection_parameters:.1%} of the projection parameters (budget {args.budget:.0%}); "
          f"measured in {report.seconds:.0f} s -> {args.out}")
    return 0

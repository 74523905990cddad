"""`ondevice-llama analyze`: per-layer, per-projection 4-bit sensitivity and the mixed-precision recipe."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from ondevice_llama.cli.main import main
from ondevice_llama.export import ExportOptions, export_model
from ondevice_llama.loading import open_checkpoint
from ondevice_llama.loading.names import PROJECTIONS
from ondevice_llama.model.reference import build_block, rope_cos_sin
from ondevice_llama.quantization import dequantize, quantize_weight
from ondevice_llama.quantization.calibration import TEXTS
from ondevice_llama.quantization.quantized_checkpoint import QuantizedModel
from ondevice_llama.quantization.recipe import Recipe
from ondevice_llama.quantization.sensitivity import (
    LayerForward,
    Piece,
    analyze_sensitivity,
    choose_overrides,
    select_rows,
)

SCALE = 32.0  # a power of two: scaling by it is exact in float


def _tokens(checkpoint, rows: int = 4, length: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, checkpoint.config.vocab_size, (rows, length), generator=generator)


class _Edited:
    """A tensor source with some tensors replaced."""

    def __init__(self, source, edits: dict[str, np.ndarray]):
        self.source, self.edits = source, edits

    def names(self):
        return self.source.names()

    def shape(self, name):
        return self.source.shape(name)

    def get(self, name):
        return self.edits[name] if name in self.edits else self.source.get(name)


def _fragile_o_proj(checkpoint, layer: int):
    """The same float model with layer `layer`'s o_proj made fragile at 4 bits.

    For half of each head's dimensions, v_proj's rows are scaled up by SCALE and o_proj's matching
    columns down by SCALE: the float function is unchanged (exactly, SCALE being a power of two), v_proj
    quantizes exactly as before (its scales are per row), but in o_proj those columns now sit next to
    32x larger ones in every quantization block and row, so they round to zero: 4-bit o_proj loses about
    half of its output.
    """
    c, tensors = checkpoint.config, checkpoint.tensors
    v = tensors.get(f"layers.{layer}.v_proj").copy()
    o = tensors.get(f"layers.{layer}.o_proj").copy()
    small = np.arange(c.head_dim) < c.head_dim // 2
    v[np.tile(small, c.num_kv_heads)] *= SCALE
    o[:, np.tile(small, c.num_heads)] /= SCALE
    edits = {f"layers.{layer}.v_proj": v, f"layers.{layer}.o_proj": o}
    return replace(checkpoint, tensors=_Edited(tensors, edits))


@pytest.mark.parametrize("name", ["mha_untied", "gqa_tied"])
def test_layer_forward_matches_the_reference_block(tiny_checkpoints, name):
    """The split forward equals `Block` in float and with each projection alone quantized."""
    checkpoint = open_checkpoint(tiny_checkpoints[name])
    c, length = checkpoint.config, 24
    cos, sin = rope_cos_sin(c, torch.arange(length))
    allowed = torch.arange(length)[None, :] <= torch.arange(length)[:, None]
    mask = torch.zeros(length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)
    x = torch.randn(2, length, c.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        block = build_block(c, checkpoint.tensors, 1)
        forward = LayerForward(block, cos, sin)
        f = forward.float(x)
        torch.testing.assert_close(f["out"], block(x, cos, sin, mask, None), atol=1e-5, rtol=1e-5)
        for proj in PROJECTIONS:
            q = quantize_weight(checkpoint.tensors.get(f"layers.1.{proj}"), 4, 32)
            weight = dequantize(q.codes, q.scales, None, q.group_size)
            expected = build_block(c, checkpoint.tensors, 1, {f"layers.1.{proj}": weight})(x, cos, sin, mask, None)
            out, _ = forward.with_weight(f, proj, torch.from_numpy(weight))
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(out, f["out"], atol=1e-3)  # the quantization does show
            unchanged, _ = forward.with_weight(f, proj, forward.weights[proj])
            torch.testing.assert_close(unchanged, f["out"], atol=0, rtol=0)


@pytest.mark.parametrize(("name", "algorithm", "block_size"),
                         [("mha_untied", "rtn", 32), ("gqa_tied", "gptq", None)])
def test_every_piece_gets_a_finite_sqnr(tiny_checkpoints, name, algorithm, block_size):
    checkpoint = open_checkpoint(tiny_checkpoints[name])
    report = analyze_sensitivity(checkpoint, _tokens(checkpoint), block_size, algorithm, progress=False)
    c = checkpoint.config
    assert sorted((p.layer, p.projection) for p in report.pieces) == sorted(
        (layer, proj) for layer in range(c.num_layers) for proj in PROJECTIONS)
    for p in report.pieces:
        assert math.isfinite(p.sqnr_db) and math.isfinite(p.projection_sqnr_db)
        assert p.parameters == np.prod(checkpoint.tensors.shape(p.name))
        # Random Gaussian weights at 4 bits: about 20 dB on the projection's own output.
        assert 12 < p.projection_sqnr_db < 32
        assert p.sqnr_db > 10
    assert report.recipe.algorithm == algorithm and report.recipe.block_size == block_size
    heads = {h.measured_on: h for h in report.heads}
    assert set(heads) == {"embedding output", "logits"}
    assert all(h.bits == 8 and 35 < h.sqnr_db < 60 for h in heads.values())  # 8 bits: about 24 dB better than 4
    assert np.isfinite(report.grid()).all() and report.grid().shape == (c.num_layers, len(PROJECTIONS))


@pytest.mark.parametrize(("name", "layer"), [("mha_untied", 2), ("gqa_tied", 1)])
def test_a_fragile_projection_ranks_worst_and_is_kept_at_8_bits(tiny_checkpoints, name, layer):
    checkpoint = open_checkpoint(tiny_checkpoints[name])
    tokens = _tokens(checkpoint, seed=1)
    before = analyze_sensitivity(checkpoint, tokens, 32, "rtn", heads=False, progress=False)
    fragile = _fragile_o_proj(checkpoint, layer)
    after = analyze_sensitivity(fragile, tokens, 32, "rtn", heads=False, progress=False)
    target = f"layers.{layer}.o_proj"
    worst = after.ranked()[0]
    assert worst.name == target
    assert worst.sqnr_db < after.ranked()[1].sqnr_db - 3  # by a clear margin
    assert worst.projection_sqnr_db < 6  # about half of o_proj's output is lost
    # The float model is the same, and so is every other piece's figure (v_proj's included).
    was = {p.name: p.sqnr_db for p in before.pieces}
    for p in after.pieces:
        if p.name != target:
            assert p.sqnr_db == pytest.approx(was[p.name], abs=0.01), p.name
    assert was[target] - worst.sqnr_db > 10
    overrides = choose_overrides(after.pieces, (worst.parameters + 0.5) / after.projection_parameters)
    assert overrides == {target: 8}  # a budget of its size is enough, and it goes to the worst piece
    assert choose_overrides(after.pieces, 0.1).get(target) == 8


def test_budget_rule():
    def piece(layer, sqnr, shape):
        return Piece(layer, "q_proj", shape, sqnr, sqnr)

    pieces = [piece(0, 10.0, (10, 5)), piece(1, 11.0, (5, 2)), piece(2, 12.0, (8, 5)), piece(3, 30.0, (1, 10))]
    total = 50 + 10 + 40 + 10
    assert choose_overrides(pieces, 0) == {}
    assert choose_overrides(pieces, 50 / total) == {"layers.0.q_proj": 8}
    # 60 parameters: the two most sensitive fit; the third (40) does not, the fourth (10) does not either.
    assert set(choose_overrides(pieces, 60 / total)) == {"layers.0.q_proj", "layers.1.q_proj"}
    # 70: the third is skipped, the less sensitive but smaller fourth takes what is left.
    assert set(choose_overrides(pieces, 70 / total)) == {"layers.0.q_proj", "layers.1.q_proj", "layers.3.q_proj"}
    assert len(choose_overrides(pieces, 1.0)) == 4
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="--budget"):
            choose_overrides(pieces, bad)


def test_budget_is_respected_on_a_model(tiny_checkpoints):
    checkpoint = open_checkpoint(tiny_checkpoints["gqa_tied"])  # GQA: k/v are smaller than q/o
    report = analyze_sensitivity(checkpoint, _tokens(checkpoint, rows=2), 32, "rtn", heads=False, progress=False)
    sizes = {p.name: p.parameters for p in report.pieces}
    assert len(set(sizes.values())) == 3  # q/o, k/v and the MLP projections differ
    total = report.projection_parameters
    for budget in (0.0, 0.05, 0.1, 0.25, 0.5, 1.0):
        overrides = choose_overrides(report.pieces, budget)
        used = sum(sizes[n] for n in overrides)
        assert used <= budget * total + 1e-6 and set(overrides.values()) <= {8}
        # Nothing left out would still fit, and the most sensitive piece that fits is always in.
        assert all(used + sizes[n] > budget * total + 1e-6 for n in sizes if n not in overrides)
        first_fit = next((p.name for p in report.ranked() if p.parameters <= budget * total), None)
        assert first_fit is None or first_fit in overrides


def test_select_rows_spreads_over_the_set():
    calibration = torch.arange(10 * 4).view(10, 4)
    assert select_rows(calibration, 0).shape == (10, 4)
    rows = select_rows(calibration, 12)[:, 0] // 4
    assert rows.tolist() == [0, 4, 9]  # first, middle and last rows
    assert select_rows(calibration, 1).shape == (1, 4)


def test_cli_writes_a_recipe_that_export_accepts(tiny_checkpoints, tmp_path, capsys):
    path = tiny_checkpoints["mha_untied"]
    text = tmp_path / "calibration.txt"
    text.write_text("\n\n".join(TEXTS * 2))
    recipe_file, report_file, plot_file = tmp_path / "recipe.json", tmp_path / "report.json", tmp_path / "s.png"
    code = main(["analyze", "--checkpoint", str(path), "--out", str(recipe_file), "--algorithm", "rtn",
                 "--calibration-file", str(text), "--budget", "0.2", "--json", str(report_file),
                 "--plot", str(plot_file), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "most sensitive:" in out and "recipe w4a16, block 32, rtn" in out
    recipe = Recipe.load(recipe_file)
    assert (recipe.weight_bits, recipe.activation_bits, recipe.block_size, recipe.algorithm) == (4, 16, 32, "rtn")
    assert recipe.overrides and set(recipe.overrides.values()) == {8}
    report = json.loads(report_file.read_text())
    assert report["format"] == "ondevice-llama-sensitivity" and len(report["pieces"]) == 4 * len(PROJECTIONS)
    assert report["recipe"]["overrides"] == recipe.overrides and report["recipe"]["eight_bit_fraction"] <= 0.2
    ranked = sorted(report["pieces"], key=lambda p: p["rank"])
    assert ranked[0]["name"] in recipe.overrides
    assert plot_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    checkpoint = open_checkpoint(path)
    options = ExportOptions(recipe=recipe_file, precision="w4a16", num_parts=1, sequence_length=8, context_length=32,
                            algorithm=None, calibration_file=text)
    manifest = export_model(checkpoint, tmp_path / "export", options, progress=False)
    quantization = manifest.extra["quantization"]
    assert quantization["recipe"]["overrides"] == recipe.overrides
    weights = QuantizedModel.load(quantization["quantized_checkpoint"]).weights
    for name in (f"layers.{i}.{p}" for i in range(4) for p in PROJECTIONS):
        assert weights[name].bits == (8 if name in recipe.overrides else 4), name


def test_cli_errors(tiny_checkpoints, tmp_path, capsys):
    path = str(tiny_checkpoints["gqa_tied"])
    out = str(tmp_path / "r.json")
    cases = [(["--budget", "1.5"], "--budget"), (["--calibration-file", str(tmp_path / "missing.txt")], "missing.txt"),
             (["--max-tokens", "-1"], "--max-tokens")]
    for extra, message in cases:
        assert main(["analyze", "--checkpoint", path, "--out", out, "--quiet", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert main(["analyze", "--checkpoint", path, "--out", str(tmp_path), "--quiet"]) == 2
    assert "--out takes a file name" in capsys.readouterr().err
    assert main(["analyze", "--checkpoint", str(tmp_path / "nothing"), "--out", out, "--quiet"]) == 2
    assert "nothing" in capsys.readouterr().err
    # argparse: a block size that is not 0, 32, 64 or 128
    assert main(["analyze", "--checkpoint", path, "--out", out, "--block-size", "48"]) == 2
    assert capsys.readouterr().err.startswith("error: --block-size: must be 32, 64, 128 or 0")

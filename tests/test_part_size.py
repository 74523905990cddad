"""Parts that fit QNN HTP's 2 GiB context: the size estimate follows the export, and the planner keeps under it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ondevice_llama.config import LlamaConfig
from ondevice_llama.export import ExportOptions, export_model, plan_parts
from ondevice_llama.export.exporter import export_recipe, fit_parts, resolve_options
from ondevice_llama.export.part_size import CONTEXT_OVERHEAD, HTP_CONTEXT_LIMIT, part_bytes, storage_of
from ondevice_llama.loading import open_checkpoint
from ondevice_llama.loading.synthetic import PRESETS, write_synthetic_checkpoint
from ondevice_llama.manifest import load_manifest

WIDE = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_layers=3, num_heads=8,
                   num_kv_heads=4, max_position_embeddings=256)


@pytest.mark.parametrize(("precision", "block_size"), [("w4a16", 32), ("w8a16", None), ("fp16", 32), ("fp32", 32)])
def test_estimate_follows_the_exported_weights(tmp_path, precision, block_size):
    checkpoint = open_checkpoint(write_synthetic_checkpoint(WIDE, tmp_path / "wide", seed=2))
    options = ExportOptions(num_parts=2, sequence_length=8, context_length=64, precision=precision,
                            block_size=block_size, algorithm="rtn")
    manifest = export_model(checkpoint, tmp_path / "export", options, progress=False)
    resolved = resolve_options(checkpoint.config, options)
    storage = storage_of(resolved.precision, export_recipe(resolved))
    for spec, part in zip(plan_parts(WIDE.num_layers, 2), manifest.parts, strict=True):
        written = (tmp_path / "export" / part.weights_file).stat().st_size
        assert part_bytes(WIDE, spec, storage) / CONTEXT_OVERHEAD == pytest.approx(written, rel=0.08)


def test_the_planner_keeps_every_7b_part_under_the_limit():
    config = PRESETS["llama-2-7b-chat"]

    def fitted(precision: str, parts: int | None) -> ExportOptions:
        options = resolve_options(config, ExportOptions(precision=precision, num_parts=parts, algorithm="rtn"))
        return fit_parts(config, options, export_recipe(options), parts)

    assert fitted("w4a16", None).num_parts == 4  # the default fits: about 1.3 GB a part
    assert fitted("fp16", None).num_parts == 8  # 14 GB of float16 weights need 8
    with pytest.raises(ValueError, match=r"--num-parts 2: part 1 would be about 2\.40 GB, .* --num-parts 3 or more"):
        fitted("w4a16", 2)
    w8 = fitted("w8a16", None)  # 9 bits a weight with a float32 scale per 32: over 2 GiB in 4 parts
    storage = storage_of("w8a16", export_recipe(w8))
    assert w8.num_parts == 5 and all(part_bytes(config, p, storage) <= HTP_CONTEXT_LIMIT for p in plan_parts(32, 5))


def test_a_requested_count_that_fits_is_kept(tmp_path):
    checkpoint = open_checkpoint(write_synthetic_checkpoint(replace(WIDE, num_layers=2), tmp_path / "w", seed=3))
    export_model(checkpoint, tmp_path / "e", ExportOptions(num_parts=2, sequence_length=8, context_length=64,
                                                           precision="fp32"), progress=False)
    assert len(load_manifest(tmp_path / "e").parts) == 2

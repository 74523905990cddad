"""Quantized npu export: QDQ graphs that ONNX Runtime runs, matching the simulated model, with encodings files."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from ondevice_llama.evaluation import evaluate, exported_logits, simulated_logits
from ondevice_llama.export import ExportOptions, export_model
from ondevice_llama.loading import open_checkpoint
from ondevice_llama.manifest import load_manifest
from ondevice_llama.quantization.quantize_model import QuantizedModel

C, N = 64, 8


def _export(checkpoint, folder, **options):
    defaults = dict(num_parts=2, sequence_length=N, context_length=C, all_logits=True, algorithm="rtn")
    return export_model(checkpoint, folder, ExportOptions(**(defaults | options)), progress=False)


@pytest.mark.parametrize(("name", "block_size", "use_conv"), [("gqa_tied", None, True), ("mha_untied", 32, False)])
def test_quantized_export_matches_simulated_model(tiny_checkpoints, tmp_path, name, block_size, use_conv):
    checkpoint = open_checkpoint(tiny_checkpoints[name])
    manifest = _export(checkpoint, tmp_path / "w4a16", precision="w4a16", block_size=block_size, use_conv=use_conv)
    quantized = QuantizedModel.load(manifest.extra["quantization"]["quantized_checkpoint"])
    tokens = list(np.random.default_rng(0).integers(0, checkpoint.config.vocab_size, 3 * C))
    sources = {"simulated": simulated_logits(checkpoint, quantized), "exported": exported_logits(tmp_path / "w4a16")}
    report = evaluate(sources, tokens, C, reference="simulated", progress=False)
    exported = report.sources["exported"]
    assert exported.top1_agreement >= 0.99 and exported.kl_to_reference < 1e-4


def test_encodings_cover_every_quantized_tensor(tiny_checkpoints, tmp_path):
    """Each QuantizeLinear input has an activation encoding with the graph's scale and offset; each weight
    DequantizeLinear output has a parameter encoding with the graph's scales; nothing else is listed."""
    checkpoint = open_checkpoint(tiny_checkpoints["gqa_tied"])
    _export(checkpoint, tmp_path / "e", precision="w4a16", block_size=32, kv_bits=8)
    manifest = load_manifest(tmp_path / "e")
    for part in manifest.parts:
        encodings = json.loads((tmp_path / "e" / part.encodings_file).read_text())
        assert encodings["version"] == "1.0.0"
        activation_entries = {e["name"]: e for e in encodings["activation_encodings"]}
        param_entries = {e["name"]: e for e in encodings["param_encodings"]}
        activations, params = set(), set()
        for graph_manifest in part.graphs.values():
            graph = onnx.load(tmp_path / "e" / graph_manifest.file)
            constants = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
            for node in graph.graph.node:
                if node.op_type == "QuantizeLinear":
                    activations.add(node.input[0])
                    entry = activation_entries[node.input[0]]
                    scale, zero_point = constants[node.input[1]], constants[node.input[2]]
                    assert entry["scale"][0] == pytest.approx(float(scale), rel=1e-6)
                    assert entry["offset"] == [-int(zero_point)] and entry["is_sym"] is False
                    assert entry["bw"] == (16 if zero_point.dtype == np.uint16 else 8)
                elif node.op_type == "DequantizeLinear" and node.input[0] in constants:
                    params.add(node.output[0])
                    entry, codes = param_entries[node.output[0]], constants[node.input[0]]
                    scales = constants[node.input[1]]
                    blocked = any(a.name == "block_size" for a in node.attribute)
                    assert entry["enc_type"] == ("PER_BLOCK" if blocked else "PER_CHANNEL") and entry["is_sym"]
                    assert entry["bw"] == (8 if codes.dtype == np.int8 else 4)
                    assert entry["offset"] == [-(2 ** (entry["bw"] - 1))]
                    # Scales are listed [out, blocks] row-major; the graph holds them in its weight layout.
                    assert sorted(entry["scale"]) == pytest.approx(sorted(scales.reshape(-1).tolist()), rel=1e-6)
        assert activations == set(activation_entries) and params == set(param_entries)
        kv = {e["bw"] for name, e in activation_entries.items() if "k_rope" in name or "v_proj" in name}
        assert kv == {8}  # --kv-bits 8


def test_weight_only_and_fp16_precisions(tiny_checkpoints, tmp_path):
    checkpoint = open_checkpoint(tiny_checkpoints["mha_untied"])
    tokens = list(np.random.default_rng(1).integers(0, checkpoint.config.vocab_size, C))
    w4 = _export(checkpoint, tmp_path / "w4", precision="w4", num_parts=1)
    graph = onnx.load(tmp_path / "w4" / w4.parts[0].graphs["prompt_processor"].file, load_external_data=False)
    assert not any(n.op_type == "QuantizeLinear" for n in graph.graph.node)  # float activations
    quantized = QuantizedModel.load(w4.extra["quantization"]["quantized_checkpoint"])
    assert quantized.recipe.activation_bits is None
    simulated = simulated_logits(checkpoint, quantized)(tokens)
    np.testing.assert_allclose(exported_logits(tmp_path / "w4")(tokens), simulated, atol=1e-3)
    fp16 = _export(checkpoint, tmp_path / "fp16", precision="fp16", num_parts=1)
    assert "quantization" not in fp16.extra
    weights = (tmp_path / "fp16" / fp16.parts[0].weights_file).stat().st_size
    fp32 = _export(checkpoint, tmp_path / "fp32", precision="fp32", num_parts=1)
    assert weights < 0.6 * (tmp_path / "fp32" / fp32.parts[0].weights_file).stat().st_size
    np.testing.assert_allclose(exported_logits(tmp_path / "fp16")(tokens), exported_logits(tmp_path / "fp32")(tokens),
                               atol=0.05)

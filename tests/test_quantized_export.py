"""Quantized npu export: QDQ graphs that ONNX Runtime runs, matching the simulated model, with encodings files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from ondevice_llama.attention_sink import SINK_FILE
from ondevice_llama.evaluation import evaluate, exported_logits, simulated_logits
from ondevice_llama.export import ExportOptions, export_model
from ondevice_llama.loading import open_checkpoint
from ondevice_llama.manifest import load_manifest
from ondevice_llama.quantization.calibration import builtin_sequences, pack_sequences
from ondevice_llama.quantization.quantize_model import quantize_model
from ondevice_llama.quantization.quantized_checkpoint import QuantizedModel
from ondevice_llama.quantization.recipe import Recipe

from .tiny_files import restamp

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
    bos = checkpoint.special_tokens.bos_id
    assert bos is not None and manifest.attention_sink_file == "attention_sink.npz"
    assert quantized.attention_sink.token == bos
    report = evaluate(sources, tokens, C, reference="simulated", progress=False, bos=bos)
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
            for value in graph.graph.input:  # the KV cache crosses the boundary as codes
                if value.type.tensor_type.elem_type in (onnx.TensorProto.UINT8, onnx.TensorProto.UINT16):
                    activations.add(value.name)
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
                    if codes.dtype in (np.uint8, np.uint16):  # a table held as activation codes
                        assert entry["enc_type"] == "PER_TENSOR" and not entry["is_sym"]
                        assert entry["scale"][0] == pytest.approx(float(scales), rel=1e-6)
                        assert entry["offset"] == [-int(constants[node.input[2]])]
                        continue
                    blocked = any(a.name == "block_size" for a in node.attribute)
                    assert entry["enc_type"] == ("PER_BLOCK" if blocked else "PER_CHANNEL") and entry["is_sym"]
                    assert entry["bw"] == (8 if codes.dtype == np.int8 else 4)
                    assert entry["offset"] == [-(2 ** (entry["bw"] - 1))]
                    if not blocked:  # explicit zero points of 0 (QNN HTP misreads per-channel int4 without them)
                        assert not constants[node.input[2]].any()
                    # Scales are listed [out, blocks] row-major; the graph holds them in its weight layout.
                    assert sorted(entry["scale"]) == pytest.approx(sorted(scales.reshape(-1).tolist()), rel=1e-6)
        assert activations == set(activation_entries) and params == set(param_entries)
        kv = {e["bw"] for name, e in activation_entries.items() if name.startswith(("past_key_", "past_value_"))}
        assert kv == {8}  # --kv-bits 8: the cache crosses the graph boundary as uint8 codes


def test_quantized_norms_are_one_op_over_16_bit_weights(tiny_checkpoints, tmp_path):
    """With its output quantized, each RMSNorm is one SimplifiedLayerNormalization (QNN HTP's quantized RmsNorm)
    over its weight's 16-bit codes, the values the simulated model uses; no float Sqrt is left to run in float16."""
    from ondevice_llama.quantization.encodings import norm_weight_encoding, quantized_norm_weight

    checkpoint = open_checkpoint(tiny_checkpoints["mha_untied"])
    manifest = _export(checkpoint, tmp_path / "m", precision="w4a16", block_size=32, num_parts=1)
    graph = onnx.load(tmp_path / "m" / manifest.parts[0].graphs["token_generator"].file)
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
    producers = {o: n for n in graph.graph.node for o in n.output}
    norms = [n for n in graph.graph.node if n.op_type == "SimplifiedLayerNormalization"]
    assert len(norms) == 2 * checkpoint.config.num_layers + 1
    assert not any(n.op_type == "Sqrt" for n in graph.graph.node)
    final = next(n for n in norms if n.input[1] == "norm.weight")
    dequantize = producers[final.input[1]]
    weight = checkpoint.tensors.get("norm")
    assert dequantize.op_type == "DequantizeLinear" and constants[dequantize.input[0]].dtype == np.uint16
    np.testing.assert_array_equal(constants[dequantize.input[0]], norm_weight_encoding(weight).quantize(weight))
    restored = (constants[dequantize.input[0]].astype(np.float32) - constants[dequantize.input[2]]) * \
        constants[dequantize.input[1]]
    np.testing.assert_allclose(restored, quantized_norm_weight(weight), rtol=0, atol=1e-7)
    np.testing.assert_allclose(restored, weight, rtol=0, atol=norm_weight_encoding(weight).scale / 2 + 1e-7)


def test_the_residual_stream_stays_float_and_each_norm_quantizes_its_input(tiny_checkpoints, tmp_path):
    """The residual adds feed each other in float (float16 on QNN HTP), not through a 16-bit QDQ pair whose coarse
    step would be added up over the layers; what each RMSNorm reads of the stream goes through its own pair."""
    checkpoint = open_checkpoint(tiny_checkpoints["mha_untied"])
    manifest = _export(checkpoint, tmp_path / "m", precision="w4a16", block_size=32, num_parts=2)
    for part in manifest.parts:
        graph = onnx.load(tmp_path / "m" / part.graphs["prompt_processor"].file, load_external_data=False)
        producers = {o: n for n in graph.graph.node for o in n.output}
        residuals = [n for n in graph.graph.node if n.op_type == "Add" and ("/attn_residual" in n.name
                                                                            or "/mlp_residual" in n.name)]
        assert len(residuals) == 2 * len(part.layers)
        readers = {i: [n for n in graph.graph.node if i in n.input] for n in residuals for i in n.output}
        for i, add in enumerate(residuals):
            kinds = sorted(n.op_type for n in readers[add.output[0]])
            assert kinds.count("QuantizeLinear") <= 1, (add.name, kinds)  # the next norm's input
            assert i == len(residuals) - 1 or "Add" in kinds, (add.name, kinds)  # the next residual add, in float
        for norm in (n for n in graph.graph.node if n.op_type == "SimplifiedLayerNormalization"):
            dequantize = producers[norm.input[0]]
            assert dequantize.op_type == "DequantizeLinear" and dequantize.name.endswith("/input/qdq/DequantizeLinear")


def test_weight_only_and_fp16_precisions(tiny_checkpoints, tmp_path):
    checkpoint = open_checkpoint(tiny_checkpoints["mha_untied"])
    tokens = list(np.random.default_rng(1).integers(0, checkpoint.config.vocab_size, C - 1))  # + the sink: C
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


def _with_massive_token(source, out, token: int, value: float):
    """A copy of a tiny checkpoint whose embedding of `token` holds one massive value: as the sequences'
    first token it carries a massive activation through the residual stream, as real Llamas' first tokens do."""
    from ondevice_llama.loading.safetensors_reader import SafetensorsFile, write_safetensors

    shutil.copytree(source, out)
    path = out / "model.safetensors"
    file = SafetensorsFile(path)
    tensors = {name: file.read(name) for name in file.names()}
    tensors["model.embed_tokens.weight"][token, 5] = value
    write_safetensors(path, tensors)
    return out


def test_massive_first_token_activation_stays_out_of_the_encodings(tiny_checkpoints, tmp_path):
    """Position 0 carries a massive activation. Calibrated over it, the residual stream's 16-bit step is
    thousands of times coarser (on the default model: 0.46 with values of median 1.7, so that float rounding
    differences flip whole steps and the export stops following its simulation). With the attention sink,
    position 0 is left out of the encodings, and the export still matches the simulation."""
    first = 0  # a token the calibration text never holds, so that only position 0 is massive
    checkpoint = open_checkpoint(_with_massive_token(tiny_checkpoints["mha_untied"], tmp_path / "m", first, 5e3))
    calibration = pack_sequences(builtin_sequences(checkpoint, generated=False), 64, first_token=first)
    assert (calibration[:, 0] == first).all() and (calibration[:, 1:] != first).all()
    recipe = Recipe.from_precision("w4a16", block_size=32, algorithm="rtn")
    with_sink = quantize_model(checkpoint, recipe, calibration, progress=False, sink_token=first)
    without = quantize_model(checkpoint, recipe, calibration, progress=False)
    for layer in range(checkpoint.config.num_layers):
        for tap in ("attn_input", "mlp_input"):
            name = f"layers.{layer}.{tap}"
            assert with_sink.activations[name].scale * 200 < without.activations[name].scale
    with_sink.save(tmp_path / "q")
    _export(checkpoint, tmp_path / "w4a16", precision="w4a16", block_size=32, num_parts=1, quantized=tmp_path / "q")
    tokens = list(np.random.default_rng(2).integers(1, checkpoint.config.vocab_size, 4 * C))
    sources = {"simulated": simulated_logits(checkpoint, with_sink), "exported": exported_logits(tmp_path / "w4a16")}
    exported = evaluate(sources, tokens, C, reference="simulated", progress=False, bos=first).sources["exported"]
    assert exported.top1_agreement >= 0.99 and exported.kl_to_reference < 1e-4


def test_generation_after_the_attention_sink(tiny_checkpoints, tmp_path):
    """A quantized export's graphs hold the attention sink's K/V (moved to position -1), so caches start empty and
    a prompt's leading sink token is dropped; prompts with or without it give the same tokens, and greedy
    generation (prompt processor, then token generator) follows the simulated model's greedy choice step by step."""
    from ondevice_llama.runtime import ExportedModel, Generator

    checkpoint = open_checkpoint(tiny_checkpoints["gqa_tied"])
    manifest = _export(checkpoint, tmp_path / "w4a16", precision="w4a16", block_size=32, num_parts=2)
    model = ExportedModel(tmp_path / "w4a16")
    bos = checkpoint.special_tokens.bos_id
    assert model.attention_sink.token == bos and model.new_cache().length == 0
    prompt = [int(t) for t in np.random.default_rng(3).integers(3, checkpoint.config.vocab_size, 11)]
    assert model.model_tokens([bos, *prompt]) == model.model_tokens(prompt) == prompt
    np.testing.assert_array_equal(model.logits(prompt), model.logits([bos, *prompt])[1:])
    np.testing.assert_array_equal(model.logits([bos])[0], model.attention_sink.logits)
    generator = Generator(model)
    generated = generator.generate(prompt, max_new_tokens=12).token_ids
    assert generator.history[:len(prompt)] == prompt
    assert Generator(model).generate([bos, *prompt], max_new_tokens=12).token_ids == generated
    generator.reset()
    assert generator.cache.length == 0 and generator.generate(prompt, max_new_tokens=12).token_ids == generated
    quantized = QuantizedModel.load(manifest.extra["quantization"]["quantized_checkpoint"])
    simulated = simulated_logits(checkpoint, quantized)
    tokens = list(prompt)
    for _ in range(12):
        tokens.append(int(np.argmax(simulated(tokens)[-1])))
    assert tokens[len(prompt):] == generated


def test_a_broken_sink_file_is_named(tiny_checkpoints, tmp_path):
    from ondevice_llama.runtime import ExportedModel

    checkpoint = open_checkpoint(tiny_checkpoints["gqa_tied"])
    _export(checkpoint, tmp_path / "e", precision="w8a16", num_parts=1)
    sink = tmp_path / "e" / "attention_sink.npz"
    with np.load(sink) as data:
        arrays = dict(data)
    np.savez(sink, **(arrays | {"keys": arrays["keys"][:-1]}))
    with pytest.raises(ValueError, match="attention_sink.npz: .* bytes, the export wrote"):  # the size check
        ExportedModel(tmp_path / "e")
    restamp(tmp_path / "e", SINK_FILE)  # as if exported so: the sink's own checks
    with pytest.raises(ValueError, match="attention_sink.npz: keys"):
        ExportedModel(tmp_path / "e")
    sink.write_bytes(b"not a zip")
    restamp(tmp_path / "e", SINK_FILE)
    with pytest.raises(ValueError, match="attention_sink.npz: not an attention sink file"):
        ExportedModel(tmp_path / "e")

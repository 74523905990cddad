"""The CPU target: fused ONNX Runtime graphs that must equal the reference (fp32) or the simulated model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from ondevice_llama.config import LlamaConfig
from ondevice_llama.export import ExportOptions, export_model
from ondevice_llama.loading import open_checkpoint
from ondevice_llama.loading.names import num_parameters
from ondevice_llama.model import build_reference
from ondevice_llama.runtime import ExportedModel, Generator, format_chat
from ondevice_llama.runtime.cpu_engine import prefill_chunk_length

from .simulate import FakeQuantSource, WeightScheme, fake_quantize, uniform_recipe
from .test_default_model import NEW_TOKENS, PROMPTS

C = 64
TOLERANCE = 1e-4  # max |difference| / max |logits|
BITS = {"w4": 4, "w8": 8}


def cpu_recipe(bits: int, mode: str = "affine"):
    """What the CPU target stores: block-32 projections (affine by default), 8-bit symmetric embedding and head."""
    return uniform_recipe(WeightScheme(bits, 32, mode), WeightScheme(8, 32, "symmetric"))


def run_all(model: ExportedModel, tokens: list[int]) -> np.ndarray:
    """Logits of positions 20.. : a 21-token prefill, then one token at a time."""
    cache = model.new_cache()
    logits = [model.prefill(tokens[:21], cache)] + [model.decode(t, cache) for t in tokens[21:]]
    return np.stack(logits)


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize("name", ["mha_untied", "gqa_tied"])
@pytest.mark.parametrize("precision", ["fp32", "w8", "w4"])
@pytest.mark.parametrize("num_parts", [1, 2])
def test_cpu_target_matches_reference_or_simulated(tiny_checkpoints, tmp_path, name, precision, num_parts):
    checkpoint = open_checkpoint(tiny_checkpoints[name])
    options = ExportOptions(num_parts=num_parts, context_length=C, target="cpu", precision=precision,
                            accuracy_level=0)
    export_model(checkpoint, tmp_path / "cpu", options, progress=False)
    tokens = torch.randint(0, 300, (30,), generator=torch.Generator().manual_seed(5))
    source = checkpoint.tensors if precision == "fp32" else FakeQuantSource(checkpoint.tensors,
                                                                            cpu_recipe(BITS[precision]))
    with torch.no_grad():
        expected = build_reference(checkpoint.config, source)(tokens[None])[0].numpy()
    assert relative_error(run_all(ExportedModel(tmp_path / "cpu"), tokens.tolist()), expected[20:]) <= TOLERANCE


@pytest.mark.parametrize(("precision", "mode"), [("w4", "symmetric"), ("w4", "asymmetric"), ("w8", "asymmetric")])
def test_each_cpu_weight_grid_matches_its_simulation(tiny_checkpoints, tmp_path, precision, mode):
    """--cpu-weights: the export holds the chosen grid (the simulated model on that grid agrees), and a grid
    other than the default's gives other logits (the option reaches the graph)."""
    checkpoint = open_checkpoint(tiny_checkpoints["gqa_tied"])
    tokens = torch.randint(0, 300, (30,), generator=torch.Generator().manual_seed(7))
    logits = {}
    for grid in (mode, "affine"):
        options = ExportOptions(context_length=C, target="cpu", precision=precision, accuracy_level=0,
                                cpu_weights=grid)
        export_model(checkpoint, tmp_path / grid, options, progress=False)
        logits[grid] = run_all(ExportedModel(tmp_path / grid), tokens.tolist())
    source = FakeQuantSource(checkpoint.tensors, cpu_recipe(BITS[precision], mode))
    with torch.no_grad():
        expected = build_reference(checkpoint.config, source)(tokens[None])[0].numpy()
    assert relative_error(logits[mode], expected[20:]) <= TOLERANCE
    assert relative_error(logits["affine"], expected[20:]) > 10 * TOLERANCE


def test_int8_activations_stay_close_to_the_simulated_model(tiny_checkpoints, tmp_path):
    """accuracy_level 4 quantizes activations to int8 inside MatMulNBits: close, not equal."""
    checkpoint = open_checkpoint(tiny_checkpoints["gqa_tied"])
    export_model(checkpoint, tmp_path / "cpu", ExportOptions(context_length=C, target="cpu"), progress=False)
    tokens = torch.randint(0, 300, (30,), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = build_reference(checkpoint.config, FakeQuantSource(checkpoint.tensors, cpu_recipe(4)))(
            tokens[None])[0].numpy()
    error = relative_error(run_all(ExportedModel(tmp_path / "cpu"), tokens.tolist()), expected[20:])
    assert 0 < error < 0.05


def _accuracy_levels(folder, kind: str) -> set[int]:
    graph = onnx.load(folder / f"{kind}_part1.onnx", load_external_data=False).graph
    return {a.i for n in graph.node if n.op_type == "MatMulNBits" and not n.name.endswith("down_proj/MatMulNBits")
            for a in n.attribute if a.name == "accuracy_level"}


def test_prompts_compute_in_float_on_their_own_graph(tiny_checkpoints, tmp_path):
    """By default a prompt runs on the prefill graph, in float: its logits are an all-float export's (the 8-bit
    head as two 4-bit halves included), while decode steps run on the int8 decoder; --prefill-accuracy-level 4
    leaves the decoder alone."""
    checkpoint = open_checkpoint(tiny_checkpoints["gqa_tied"])
    for name, extra in (("default", {}), ("float", dict(accuracy_level=0)), ("one", dict(prefill_accuracy_level=4))):
        export_model(checkpoint, tmp_path / name, ExportOptions(context_length=C, target="cpu", **extra),
                     progress=False)
    assert _accuracy_levels(tmp_path / "default", "decoder") == {4}
    assert _accuracy_levels(tmp_path / "default", "prefill") == {0}
    assert sorted(p.name for p in (tmp_path / "one").glob("*.onnx")) == ["decoder_part1.onnx"]
    assert sorted(p.name for p in (tmp_path / "float").glob("*.onnx")) == ["decoder_part1.onnx"]
    tokens = torch.randint(0, 300, (30,), generator=torch.Generator().manual_seed(8)).tolist()
    default, float_model = ExportedModel(tmp_path / "default"), ExportedModel(tmp_path / "float")
    assert default.manifest.extra["prefill_accuracy_level"] == 0
    caches = default.new_cache(), float_model.new_cache()
    assert relative_error(default.prefill(tokens[:21], caches[0]), float_model.prefill(tokens[:21], caches[1])) < 1e-5
    decoded = [np.stack([m.decode(t, cache) for t in tokens[21:]])
               for m, cache in zip((default, float_model), caches, strict=True)]
    assert 0 < relative_error(decoded[0], decoded[1]) < 0.05
    one = ExportedModel(tmp_path / "one")
    assert relative_error(one.prefill(tokens[:21], one.new_cache()), float_model.prefill(tokens[:21],
                                                                                         float_model.new_cache())) > 0


def test_prompts_run_in_chunks_that_bound_activations(tiny_checkpoints, tmp_path):
    """A prompt longer than the engine's chunk runs in pieces: the logits and the cache it leaves are those of one
    run; and a 7B-class shape gets chunks of a few hundred tokens, the default model's whole prompts."""
    checkpoint = open_checkpoint(tiny_checkpoints["gqa_tied"])
    export_model(checkpoint, tmp_path / "cpu", ExportOptions(context_length=C, target="cpu", accuracy_level=0),
                 progress=False)
    tokens = torch.randint(0, 300, (30,), generator=torch.Generator().manual_seed(9)).tolist()
    logits = []
    for chunk in (10**6, 8):
        model = ExportedModel(tmp_path / "cpu")
        model.engine.chunk_length = chunk
        cache = model.new_cache()
        logits.append(np.stack([model.prefill(tokens[:21], cache)] + [model.decode(t, cache) for t in tokens[21:]]))
    assert relative_error(logits[1], logits[0]) < 1e-5
    seven_b = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                          num_kv_heads=32)
    assert prefill_chunk_length(seven_b, 1024) == 192
    smollm2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                          num_kv_heads=3)
    assert prefill_chunk_length(smollm2, 2048) == 640


def test_tied_embedding_is_stored_once(tiny_checkpoints, tmp_path):
    """The embedding lookup reads the LM head's packed 8-bit weight: no float [V, H] table on disk."""
    checkpoint = open_checkpoint(tiny_checkpoints["gqa_tied"])
    export_model(checkpoint, tmp_path / "cpu", ExportOptions(context_length=C, target="cpu"), progress=False)
    model = onnx.load(tmp_path / "cpu" / "decoder_part1.onnx", load_external_data=False)
    nodes = {n.op_type: n for n in model.graph.node}
    head = [n for n in model.graph.node if n.name.endswith("lm_head/MatMulNBits")][0]
    assert nodes["GatherBlockQuantized"].input[0] == head.input[1]
    v, h = checkpoint.config.vocab_size, checkpoint.config.hidden_size
    assert not [t.name for t in model.graph.initializer if list(t.dims) == [v, h]]
    stored = (tmp_path / "cpu" / "weights_part1.bin").stat().st_size
    assert stored < 0.6 * 4 * num_parameters(checkpoint.config)  # 4/8-bit weights, nothing twice


def test_default_gguf_transcodes_losslessly(default_checkpoint):
    """SmolLM2's Q4_1 projections and Q8_0 embedding come back exactly from our affine-4 / symmetric-8 codes."""
    for name, scheme in (("layers.3.gate_proj", WeightScheme(4, 32, "affine")),
                         ("embed_tokens", WeightScheme(8, 32, "symmetric"))):
        weight = default_checkpoint.tensors.get(name)
        np.testing.assert_allclose(fake_quantize(weight, scheme), weight, rtol=0, atol=2e-6 * np.abs(weight).max())


@pytest.fixture(scope="module")
def default_cpu_model(default_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu") / "export"
    export_model(default_checkpoint, out, ExportOptions(target="cpu", accuracy_level=0), progress=False)
    return ExportedModel(out)


def test_default_model_greedy_equals_simulated(default_checkpoint, default_cpu_model):
    """The CPU target (w4, float activations) and the simulated w4 model agree token for token."""
    c = default_checkpoint
    simulated = build_reference(c.config, FakeQuantSource(c.tensors, cpu_recipe(4)))
    simulated.setup_cache(1024)
    for prompt in PROMPTS:
        ids = format_chat(c.tokenizer, [{"role": "user", "content": prompt}], c.special_tokens, c.chat_template)
        ours = Generator(default_cpu_model).generate(ids, max_new_tokens=NEW_TOKENS).token_ids
        expected = []
        with torch.no_grad():
            logits = simulated(torch.tensor([ids]), torch.arange(len(ids)))[0, -1]
            for step in range(NEW_TOKENS):
                expected.append(int(logits.argmax()))
                position = torch.tensor([len(ids) + step])
                logits = simulated(torch.tensor([[expected[-1]]]), position)[0, -1]
        assert ours == expected


def test_default_model_chat_answers_paris_on_cpu_target(default_cpu_model):
    manifest = default_cpu_model.manifest
    ids = format_chat(default_cpu_model.tokenizer, [{"role": "user", "content": "What is the capital of France?"}],
                      manifest.special_tokens, manifest.chat_template)
    result = Generator(default_cpu_model).generate(ids, max_new_tokens=20, stop_ids=manifest.special_tokens.eos_ids)
    assert "Paris" in result.text

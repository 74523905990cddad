"""QNN HTP (onnxruntime-qnn's HTP backend, the x86_64 simulator here): every npu graph runs whole on it, `compile`
writes weight-shared context binaries whose graphs Genie orders, and the compiled folder runs (our runtime, and
Genie through its C API) with the export's own answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from ondevice_llama import qnn
from ondevice_llama.cli.main import main
from ondevice_llama.compile import compile_export, graph_names, weight_options
from ondevice_llama.config import LlamaConfig
from ondevice_llama.evaluation.metrics import log_softmax
from ondevice_llama.export import ExportOptions, export_model
from ondevice_llama.loading import open_checkpoint
from ondevice_llama.loading.synthetic import write_synthetic_checkpoint
from ondevice_llama.manifest import load_manifest
from ondevice_llama.runtime import ExportedModel, Generator

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_qnn", reason="the qnn extra (onnxruntime-qnn) is not installed")

TINY = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, num_kv_heads=2,
                   tie_word_embeddings=True, max_position_embeddings=256)
# Wide enough that weights, not fixed overheads, make the size of a context binary.
WIDER = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                    num_kv_heads=2, max_position_embeddings=256)
N, C = 8, 64
QUANTIZED = {"w4a16-block32": dict(precision="w4a16", block_size=32),
             "w4a16-per-channel": dict(precision="w4a16", block_size=None),
             "w8a16": dict(precision="w8a16", block_size=None),
             "w4a16-kv8": dict(precision="w4a16", block_size=32, kv_bits=8),
             # the default recipe: GPTQ on the rotated model (an untied head, other weights, the same operators)
             "w4a16-block32-gptq-rotated": dict(precision="w4a16", block_size=32, algorithm="gptq")}


def _export(checkpoint: Path, out: Path, parts: int = 2, **options) -> Path:
    options = {"algorithm": "rtn"} | options
    export_model(open_checkpoint(checkpoint), out, ExportOptions(num_parts=parts, sequence_length=N, context_length=C,
                                                                 **options), progress=False)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_synthetic_checkpoint(TINY, tmp_path_factory.mktemp("qnn") / "tiny", seed=0)


@pytest.fixture(scope="module")
def compiled(tiny, tmp_path_factory) -> tuple[Path, Path]:
    """(export, compiled folder): w4a16 block 32, 2 parts, for SM8650."""
    root = tmp_path_factory.mktemp("compiled")
    export = _export(tiny, root / "export", **QUANTIZED["w4a16-block32"])
    assert main(["compile", str(export), "--soc", "SM8650", "--out", str(root / "compiled"), "--quiet"]) == 0
    return export, root / "compiled"


@pytest.mark.parametrize("precision", list(QUANTIZED))
def test_every_graph_runs_whole_on_htp(tiny, tmp_path, precision):
    """Each part's prompt processor and token generator, with CPU fallback disabled: a node left for the CPU fails."""
    export = _export(tiny, tmp_path / precision, **QUANTIZED[precision])
    manifest = load_manifest(export)
    options = qnn.session_options(qnn.soc_by_name("SM8650"), provider=weight_options(manifest))
    for part in manifest.parts:
        for graph in part.graphs.values():
            ort.InferenceSession(str(export / graph.file), sess_options=options)


def _block_matmul(path: Path, scales: np.ndarray, codes: np.ndarray, x_encoding, y_encoding) -> Path:
    """uint16 x ─ DequantizeLinear ─ MatMul(int4 codes [K, M] in blocks of 32 along K) ─ QuantizeLinear ─ uint16 y."""
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    k, m = codes.shape
    inits = [helper.make_tensor("w", TensorProto.INT4, [k, m], codes.flatten().tolist()), nh.from_array(scales, "ws")]
    for name, e in (("x", x_encoding), ("y", y_encoding)):
        inits += [nh.from_array(np.array(e.scale, np.float32), f"{name}_s"),
                  nh.from_array(np.array(e.zero_point, np.uint16), f"{name}_z")]
    nodes = [helper.make_node("DequantizeLinear", ["x", "x_s", "x_z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=0, block_size=32),
             helper.make_node("MatMul", ["xd", "wd"], ["yf"]),
             helper.make_node("QuantizeLinear", ["yf", "y_s", "y_z"], ["y"])]
    graph = helper.make_graph(nodes, "block_matmul",
                              [helper.make_tensor_value_info("x", TensorProto.UINT16, [1, 16, k])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT16, [1, 16, m])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, path)
    return path


def test_lpbq_block_scales_make_htp_exact(tmp_path):
    """A 16-bit x int4 block-32 MatMul: with block scales on the LPBQ grid and `weight_options`' provider option,
    HTP lands within one output step of float64; with free scales it runs on float16 activations, further off."""
    from ondevice_llama.quantization.encodings import ActivationEncoding
    from ondevice_llama.quantization.quantizers import lpbq_scales, quantize_weight

    rng = np.random.default_rng(0)
    k, m = 256, 64
    x = rng.standard_normal((1, 16, k))
    x_encoding = ActivationEncoding(16, float(x.min()), float(x.max()))
    codes_in = x_encoding.quantize(x).astype(np.uint16)
    xd = x_encoding.dequantize(codes_in).astype(np.float64)
    steps = {}
    for lpbq in (True, False):
        weight = rng.standard_normal((m, k)).astype(np.float32) * 0.05
        q = quantize_weight(weight, 4, 32, scale_bits=4 if lpbq else None)
        assert np.array_equal(lpbq_scales(q.scales, 4), q.scales) == lpbq
        exact = xd @ (q.codes.astype(np.float64) * np.repeat(q.scales.astype(np.float64), 32, axis=1)).T
        y_encoding = ActivationEncoding(16, float(exact.min()), float(exact.max()))
        path = _block_matmul(tmp_path / f"lpbq_{lpbq}.onnx", np.ascontiguousarray(q.scales.T), q.codes.T, x_encoding,
                             y_encoding)
        options = qnn.session_options(qnn.soc_by_name("SM8650"), provider=qnn.LPBQ_OPTIONS if lpbq else None)
        y = ort.InferenceSession(str(path), sess_options=options).run(None, {"x": codes_in})[0]
        steps[lpbq] = int(np.abs(y.astype(np.int64) - y_encoding.quantize(exact).astype(np.int64)).max())
    assert steps[True] <= 1 < 4 <= steps[False], steps


def test_a_cpu_node_is_refused(tmp_path):
    """The check above can fail: a graph with an operator QNN HTP lacks is refused, not split with the CPU."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Det", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)]), tmp_path / "g.onnx")
    with pytest.raises(Exception, match="CPU"):
        ort.InferenceSession(str(tmp_path / "g.onnx"), sess_options=qnn.session_options(qnn.soc_by_name("SM8650")))


def test_compile_writes_one_weight_shared_binary_per_part(compiled):
    export, folder = compiled
    manifest = load_manifest(folder)
    c = manifest.compiled
    assert (c["soc"], c["soc_model"], c["htp_arch"], c["qnn_sdk"]) == ("SM8650", 57, 75, qnn.sdk_version())
    assert [p["binary"] for p in c["parts"]] == ["part_1_of_2.bin", "part_2_of_2.bin"]
    for part, record in zip(manifest.parts, c["parts"], strict=True):
        assert part.weights_file == record["binary"] and (folder / record["binary"]).is_file()
        for kind, graph in part.graphs.items():
            wrapper = onnx.load(str(folder / graph.file))
            assert [n.op_type for n in wrapper.graph.node] == ["EPContext"]  # nothing left outside QNN
            attributes = {a.name: a for a in wrapper.graph.node[0].attribute}
            assert attributes["ep_cache_context"].s.decode() == record["binary"]  # both graphs, one binary
            assert record["graphs"][kind]["cpu_nodes"] == 0 and record["graphs"][kind]["seconds"] > 0
    # Genie orders a model's splits by sorting graph names: each graph kind's names sort in part order.
    for kind in ("prompt_processor", "token_generator"):
        assert graph_names.sorts_in_order([p["graphs"][kind]["qnn_graph"] for p in c["parts"]])


def test_shared_binary_holds_one_copy_of_the_weights(tmp_path):
    export = _export(write_synthetic_checkpoint(WIDER, tmp_path / "wider", seed=1), tmp_path / "export", parts=1,
                     precision="w8a16", block_size=None)
    c = compile_export(export, tmp_path / "compiled", "SM8750", progress=False).compiled
    part = c["parts"][0]
    alone = sum(g["binary_bytes"] for g in part["simulator"].values())  # each graph with its own weights
    weights = part["export_weights_bytes"]
    assert part["binary_bytes"] < 1.3 * weights < 0.75 * alone


def test_compiled_folder_runs_on_htp_as_the_export_on_cpu(compiled):
    """KL 1e-7 here; 7.5e-6 when attention's context MatMul was a 16-bit x 16-bit quantized op on HTP."""
    export, folder = compiled
    on_cpu, on_htp = ExportedModel(export), ExportedModel(folder)
    tokens = [int(t) for t in np.random.default_rng(5).integers(3, TINY.vocab_size, 40)]
    p, q = log_softmax(on_cpu.logits(tokens)), log_softmax(on_htp.logits(tokens))
    kl = float(np.mean(np.sum(np.exp(p) * (p - q), axis=-1)))
    assert kl < 1e-6 and np.mean(p.argmax(-1) == q.argmax(-1)) >= 0.975
    assert Generator(on_htp).generate(tokens[:12], max_new_tokens=8).token_ids == \
        Generator(on_cpu).generate(tokens[:12], max_new_tokens=8).token_ids


def test_genie_runs_the_bundle_as_our_runtime_does(compiled):
    """libGenie (its C API through ctypes) accepts the device bundle's config and, on the simulator's binaries,
    generates our export's greedy tokens: each one our export's argmax after Genie's own tokens so far, up to a
    near tie (a random tiny model has ties within 0.001 logits that HTP, Genie and the CPU break differently)."""
    from ondevice_llama.runtime.genie import GenieDialog, config_accepted

    export, folder = compiled
    config = json.loads((folder / "genie_config.json").read_text())["dialog"]
    assert config["engine"]["model"]["binary"]["ctx-bins"] == ["part_1_of_2.bin", "part_2_of_2.bin"]
    assert config["context"]["bos-token"] == -1  # the attention sink is in the graphs
    assert config_accepted(folder)
    tokens = [int(t) for t in np.random.default_rng(6).integers(3, TINY.vocab_size, 12)]
    with GenieDialog(folder) as dialog:
        generated = dialog.generate(tokens, 8)
    assert len(generated) == 8
    logits = ExportedModel(export).logits(tokens + generated)
    for i, token in enumerate(generated):
        row = logits[len(tokens) - 1 + i]
        assert row.max() - row[token] <= 0.01 * (row.max() - row.min()), f"step {i}: not a greedy choice"


def test_every_soc_in_the_table_is_one_qnn_knows(tiny, tmp_path):
    """QNN's HTP backend refuses a soc_model it does not know; each row of our table compiles."""
    export = _export(tiny, tmp_path / "export", parts=1, precision="w8a16", block_size=None)
    source = export / load_manifest(export).parts[0].graphs["token_generator"].file
    for soc in qnn.SOCS.values():
        options = qnn.session_options(soc, {"ep.context_enable": "1", "ep.context_embed_mode": "0",
                                            "ep.context_file_path": str(tmp_path / f"{soc.name}.onnx")},
                                      {"enable_htp_prepare_only": "1"})
        ort.InferenceSession(str(source), sess_options=options)
    with pytest.raises(Exception, match="CPU"):  # an unknown soc_model leaves every node to the CPU
        ort.InferenceSession(str(source), sess_options=qnn.session_options(qnn.Soc("X", "x", 9999, 75)))


def test_compile_refuses_bad_input_in_one_line(compiled, tiny, tmp_path, capsys):
    export, folder = compiled
    cpu = tmp_path / "cpu"
    export_model(open_checkpoint(tiny), cpu, ExportOptions(target="cpu", context_length=C), progress=False)
    (tmp_path / "file").write_text("x")
    cases = [([str(export), "--soc", "SM9999"], "--soc: unknown SoC 'SM9999'; known: SM8450"),
             ([str(cpu), "--soc", "SM8650"], "a cpu export"),
             ([str(folder), "--soc", "SM8650"], "already compiled"),
             ([str(tmp_path / "missing"), "--soc", "SM8650"], "not an exported model folder"),
             ([str(export), "--soc", "SM8650", "--out", str(tmp_path / "file")], "exists and is a file")]
    for args, message in cases:
        out = ["--out", str(tmp_path / "out")] if "--out" not in args else []
        assert main(["compile", *args, *out, "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
        assert not (tmp_path / "out").exists()


def test_an_interrupted_compile_resumes_with_the_finished_parts(tiny, tmp_path, monkeypatch):
    from ondevice_llama.compile import compiler

    export = _export(tiny, tmp_path / "export", **QUANTIZED["w4a16-block32"])
    real, calls = compiler._compile_part, []

    def stop_at_part_two(export, staging, manifest, part, *args):
        calls.append(part.index)
        if part.index == 1 and calls.count(1) == 1:
            raise KeyboardInterrupt
        return real(export, staging, manifest, part, *args)

    monkeypatch.setattr(compiler, "_compile_part", stop_at_part_two)
    with pytest.raises(KeyboardInterrupt):
        compile_export(export, tmp_path / "out", "SM8650", simulator=False, progress=False)
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.partial" / "part_1_of_2.bin").exists()
    compile_export(export, tmp_path / "out", "SM8650", simulator=False, progress=False)
    assert calls == [0, 1, 1]  # part 1 verified and kept, part 2 compiled on the rerun
    assert load_manifest(tmp_path / "out").compiled["simulator"] is None


def test_device_only_folders_say_why_they_do_not_run_here(tiny, tmp_path):
    if not qnn.simulated():
        pytest.skip("on a Snapdragon the device binaries run")
    export = _export(tiny, tmp_path / "export", parts=1, **QUANTIZED["w8a16"])
    compile_export(export, tmp_path / "out", "SM8650", simulator=False, progress=False)
    with pytest.raises(ValueError, match="--device-only"):
        ExportedModel(tmp_path / "out")


def test_graph_names_follow_the_path_hash():
    """MurmurHash3 x86_128 reference values, and ranked spellings of one path that sort as asked."""
    assert graph_names.murmur3_x86_128(b"") == (0, 0, 0, 0)
    assert graph_names.path_hash("v_w4b32/token_generator_part1.onnx") == 14347872836187104496  # seen from QNN
    spellings = [graph_names.ranked_path(Path("/a/b/model.onnx"), k, 12) for k in range(12)]
    assert all(Path(s).resolve() == Path("/a/b/model.onnx") for s in spellings)
    assert graph_names.sorts_in_order([f"QNN_QNN_{graph_names.path_hash(s)}_1_0" for s in spellings])


def test_compile_checks_memory_first(compiled):
    from ondevice_llama.compile.compiler import check_compile_memory, compile_memory

    export, _ = compiled
    need = compile_memory(export, load_manifest(export))
    assert 1.0e9 < need < 1.2e9  # a tiny model: the base, and little more
    check_compile_memory(need, available=2 * need)
    with pytest.raises(ValueError, match=r"compiling needs about 1\.\d GB .* --num-parts .* swap"):
        check_compile_memory(need, available=need / 2)


def test_chat_through_genie_says_what_our_runtime_says(compiled, capsys):
    _, folder = compiled
    replies = []
    for extra in ([], ["--genie"]):
        assert main(["chat", "--model", str(folder), "--prompt", "hello", "--max-new-tokens", "6", *extra]) == 0
        out, err = capsys.readouterr()
        assert "TTFT" in err.strip().splitlines()[-1]
        replies.append(out)
    assert replies[0] == replies[1] and replies[0].strip()


def test_bench_measures_a_compiled_folder(compiled, tmp_path, capsys):
    _, folder = compiled
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(folder), "--repetitions", "1", "--prompt-lengths", "8,16",
                 "--json", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["target"] == "npu" and report["parts"] == 2 and set(report["ttft_s"]) == {"8", "16"}
    assert report["decode_tok_per_s"] > 0 and "TTFT 8 tokens" in capsys.readouterr().out

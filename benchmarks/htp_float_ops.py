"""How far QNN HTP lands from float in 16-bit output steps where our npu graph computes in float between QDQ pairs.

Each graph reads 16-bit codes and writes 16-bit codes, as inside our quantized graphs, and runs on ONNX Runtime's
CPU and on QNN HTP (the x86_64 simulator, SM8650); its output codes are scored against a float64 reference on the
same quantized inputs: the share one or more (two or more) steps off, the most, and the mean signed difference
(a bias: rounding low or high where float64 rounds to nearest).

- RMSNorm over a residual-stream-like input (128 x 576, normal with one outlier channel), two ways: "float
  chain" (Mul, ReduceMean, Add, Sqrt, Div, Mul in float: HTP runs them in float16) and "fused" (one
  SimplifiedLayerNormalization over the weight's 16-bit codes: HTP's quantized RmsNorm, what the export does);
- RoPE on one head (128 x 64, rotate-half), two ways: "float" (float cos/sin, the products and sums in float:
  HTP runs them in float16) and "quantized" (cos/sin, the four products and their difference and sum each
  16-bit: integer ops on HTP, which the export tried and dropped; scored against float64 with the same
  roundings);
- a projection (16-bit activations [128 x 576] times int4 weights in blocks of 32 -> 192), two ways: "free scales"
  (a float scale per block: HTP computes it on float16 activations) and "LPBQ scales" (on the per-channel grid of
  4-bit integers, prepared with `qnn.LPBQ_OPTIONS`: integer arithmetic, the recipe's `block_scale_bits` 4);
- attention's mask and softmax on one head (128 x 1024 quantized scores, the causal mask added in float, Softmax,
  16-bit probabilities, as the export does);
- attention's context on two heads (16-bit probabilities [128 x 1024] times 16-bit values [1024 x 64], merged),
  two ways: "quantized" (each head's MatMul a QDQ unit: HTP's 16-bit x 16-bit quantized MatMul) and "float"
  (quantized once merged, as the export does: the MatMuls run in float, float16 on HTP); and quantized with
  8-bit values (an 8-bit KV cache), to see whether HTP's 16-bit x 8-bit quantized MatMul does better.

    python benchmarks/htp_float_ops.py        # needs the qnn extra; writes results/htp_float_ops.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from ondevice_llama import qnn
from ondevice_llama.quantization.encodings import ActivationEncoding, norm_weight_encoding, quantized_norm_weight

RESULTS = Path(__file__).resolve().parent / "results"
N, H, EPS = 128, 576, 1e-5
KEYS, HEAD_DIM = 1024, 64  # attention: cached + new keys, and a head's width
TABLE = ActivationEncoding(16, -1.0, 1.0)  # RoPE's cos and sin in the export
PRESCALE = 2.0**-6  # what the export picks for this input's range (RMS_NORM_RANGE 8)


def _qdq(x: str, y: str, encoding: str) -> list:
    return [helper.make_node("QuantizeLinear", [x, f"{encoding}_s", f"{encoding}_z"], [f"{y}_q"]),
            helper.make_node("DequantizeLinear", [f"{y}_q", f"{encoding}_s", f"{encoding}_z"], [y])]


def _encoding(name: str, e: ActivationEncoding) -> list:
    return [nh.from_array(np.array(e.scale, np.float32), f"{name}_s"),
            nh.from_array(np.array(e.zero_point, e.dtype), f"{name}_z")]


def build(kind: str, folder: Path, inp: ActivationEncoding, out: ActivationEncoding, weight: np.ndarray) -> Path:
    w = norm_weight_encoding(weight)
    inits = _encoding("in", inp) + _encoding("out", out) + _encoding("w", w) + [
        nh.from_array(w.quantize(weight), "w_codes")]
    nodes = _qdq("x", "xd", "in") + [helper.make_node("DequantizeLinear", ["w_codes", "w_s", "w_z"], ["wd"])]
    if kind == "fused":
        nodes.append(helper.make_node("SimplifiedLayerNormalization", ["xd", "wd"], ["y0"], axis=-1, epsilon=EPS))
    else:
        inits += [nh.from_array(np.array([-1], np.int64), "axes"),
                  nh.from_array(np.array(PRESCALE, np.float32), "prescale"),
                  nh.from_array(np.array(EPS * PRESCALE**2, np.float32), "eps")]
        nodes += [helper.make_node("Mul", ["xd", "prescale"], ["xs"]), helper.make_node("Mul", ["xs", "xs"], ["sq"]),
                  helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], keepdims=1),
                  helper.make_node("Add", ["mean", "eps"], ["var"]), helper.make_node("Sqrt", ["var"], ["std"]),
                  helper.make_node("Div", ["xs", "std"], ["normed"]), helper.make_node("Mul", ["normed", "wd"], ["y0"])]
    nodes += _qdq("y0", "y", "out")[:1]
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, N, H])],
                              [helper.make_tensor_value_info("y_q", TensorProto.UINT16, [1, N, H])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = folder / f"rms_norm_{kind.replace(' ', '_')}.onnx"
    onnx.save(model, path)
    return path


def build_rope(folder: Path, kind: str, inp: ActivationEncoding, out: ActivationEncoding,
               products: ActivationEncoding, d: int) -> Path:
    half = d // 2
    quantized = kind == "quantized"
    inits = _encoding("in", inp) + _encoding("out", out) + _encoding("prod", products) + _encoding(
        "table", TABLE) + [nh.from_array(np.array([v], np.int64), n) for n, v in (("s0", 0), ("s1", half), ("s2", d),
                                                                               ("axis", -1))]
    nodes = _qdq("x", "xd", "in") + [helper.make_node("Slice", ["xd", "s0", "s1", "axis"], ["x1s"]),
                                     helper.make_node("Slice", ["xd", "s1", "s2", "axis"], ["x2s"])]
    if quantized:
        nodes += _qdq("x1s", "x1", "in") + _qdq("x2s", "x2", "in") + _qdq("cos", "c", "table") + \
            _qdq("sin", "s", "table")
    else:
        nodes += [helper.make_node("Identity", [a], [b]) for a, b in (("x1s", "x1"), ("x2s", "x2"), ("cos", "c"),
                                                                      ("sin", "s"))]
    for label, a, b in (("x1cos", "x1", "c"), ("x2sin", "x2", "s"), ("x2cos", "x2", "c"), ("x1sin", "x1", "s")):
        nodes.append(helper.make_node("Mul", [a, b], [f"{label}_f" if quantized else label]))
        nodes += _qdq(f"{label}_f", label, "prod") if quantized else []
    nodes += [helper.make_node("Sub", ["x1cos", "x2sin"], ["first_f" if quantized else "first"]),
              helper.make_node("Add", ["x2cos", "x1sin"], ["second_f" if quantized else "second"])]
    nodes += _qdq("first_f", "first", "out") + _qdq("second_f", "second", "out") if quantized else []
    nodes += [helper.make_node("Concat", ["first", "second"], ["y0"], axis=-1)] + _qdq("y0", "y", "out")[:1]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
              for n, shape in (("x", [1, N, d]), ("cos", [1, N, half]), ("sin", [1, N, half]))]
    graph = helper.make_graph(nodes, "rope", inputs, [helper.make_tensor_value_info("y_q", TensorProto.UINT16,
                                                                                    [1, N, d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = folder / f"rope_{kind}.onnx"
    onnx.save(model, path)
    return path


def build_projection(folder: Path, kind: str, inp: ActivationEncoding, out: ActivationEncoding,
                     codes: np.ndarray, scales: np.ndarray) -> Path:
    """x [1, N, K] 16-bit ─ MatMul(int4 codes [K, M], a scale per 32 rows of K) ─ 16-bit y."""
    k, m = codes.shape
    inits = _encoding("in", inp) + _encoding("out", out) + [
        helper.make_tensor("w", TensorProto.INT4, [k, m], codes.flatten().tolist()), nh.from_array(scales, "ws")]
    nodes = _qdq("x", "xd", "in") + [helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=0, block_size=32),
                                     helper.make_node("MatMul", ["xd", "wd"], ["y0"])] + _qdq("y0", "y", "out")[:1]
    graph = helper.make_graph(nodes, "projection", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, N, k])],
                              [helper.make_tensor_value_info("y_q", TensorProto.UINT16, [1, N, m])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = folder / f"projection_{kind.replace(' ', '_')}.onnx"
    onnx.save(model, path)
    return path


def build_softmax(folder: Path, inp: ActivationEncoding, out: ActivationEncoding, c: int) -> Path:
    nodes = _qdq("x", "xd", "in") + [helper.make_node("Add", ["xd", "mask"], ["masked"]),
                                     helper.make_node("Softmax", ["masked"], ["y0"], axis=-1)]
    nodes += _qdq("y0", "y", "out")[:1]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, N, c]) for n in ("x", "mask")]
    graph = helper.make_graph(nodes, "softmax", inputs, [helper.make_tensor_value_info("y_q", TensorProto.UINT16,
                                                                                       [1, 1, N, c])],
                              _encoding("in", inp) + _encoding("out", out))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = folder / "softmax.onnx"
    onnx.save(model, path)
    return path


def build_context(folder: Path, kind: str, probs: ActivationEncoding, values: ActivationEncoding,
                  out: ActivationEncoding, heads: int) -> Path:
    nodes = _qdq("v", "vd", "values")
    contexts = []
    for h in range(heads):
        nodes += _qdq(f"p{h}", f"p{h}d", "probs") + [helper.make_node("MatMul", [f"p{h}d", "vd"], [f"c{h}"])]
        if kind == "quantized":
            nodes += _qdq(f"c{h}", f"c{h}d", "out")
        contexts.append(f"c{h}d" if kind == "quantized" else f"c{h}")
    nodes += [helper.make_node("Concat", contexts, ["y0"], axis=-1)] + _qdq("y0", "y", "out")[:1]
    shapes = [(f"p{h}", [1, N, KEYS]) for h in range(heads)] + [("v", [1, KEYS, HEAD_DIM])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in shapes]
    graph = helper.make_graph(nodes, "context", inputs, [helper.make_tensor_value_info(
        "y_q", TensorProto.UINT16, [1, N, HEAD_DIM * heads])], _encoding("probs", probs) + _encoding("values", values) +
        _encoding("out", out))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = folder / f"context_{kind}.onnx"
    onnx.save(model, path)
    return path


def score(path: Path, feeds: dict[str, np.ndarray], reference: np.ndarray, soc, provider: dict | None = None
          ) -> list[dict]:
    """Steps off the reference on ONNX Runtime's CPU and on QNN HTP (prepared with `provider` options)."""
    import onnxruntime as ort

    rows = []
    for backend in ("ONNX Runtime CPU", "QNN HTP (simulator)"):
        if backend.startswith("QNN"):
            session = ort.InferenceSession(str(path), sess_options=qnn.session_options(soc, provider=provider))
        else:
            options = ort.SessionOptions()  # DequantizeLinear + MatMul in float, not int8 MatMulNBits
            options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        signed = session.run(None, feeds)[0].astype(np.int64) - reference
        off = np.abs(signed)
        rows.append({"backend": backend, "off_by_1_or_more": float((off >= 1).mean()),
                     "off_by_2_or_more": float((off >= 2).mean()), "max_steps_off": int(off.max()),
                     "mean_steps": float(signed.mean())})
    return rows


def main() -> int:
    import tempfile

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, N, H)) * 2).astype(np.float32)
    x[:, :, 7] *= 40
    weight = (1 + 0.3 * rng.standard_normal(H)).astype(np.float32)
    inp = ActivationEncoding(16, float(x.min()), float(x.max()))
    out = ActivationEncoding(16, -12.0, 12.0)
    xq = inp.dequantize(inp.quantize(x)).astype(np.float64)
    wq = quantized_norm_weight(weight).astype(np.float64)
    reference = out.quantize(xq / np.sqrt((xq**2).mean(-1, keepdims=True) + EPS) * wq).astype(np.int64)
    soc = qnn.soc_by_name("SM8650")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("float chain", "fused"):
            path = build(kind, Path(tmp), inp, out, weight)
            rows += [{"graph": f"RMSNorm, {kind}"} | r for r in score(path, {"x": x}, reference, soc)]
        d = 64
        q = (rng.standard_normal((1, N, d)) * 3).astype(np.float32)
        angles = rng.uniform(0, 50, (1, N, d // 2))
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        q_in = ActivationEncoding(16, float(q.min()), float(q.max()))
        q_out = ActivationEncoding(16, 1.4 * q_in.min, 1.4 * q_in.max)
        largest = max(-q_in.min, q_in.max)
        products = ActivationEncoding(16, -largest, largest)
        qd = q_in.dequantize(q_in.quantize(q)).astype(np.float64)
        for kind in ("float", "quantized"):
            c, sn = (TABLE.dequantize(TABLE.quantize(t)).astype(np.float64) for t in (cos, sin)) \
                if kind == "quantized" else (cos, sin)
            rounded = (lambda t: products.dequantize(products.quantize(t)).astype(np.float64)) if kind == "quantized" \
                else (lambda t: t)
            q1, q2 = qd[..., :d // 2], qd[..., d // 2:]
            rope_reference = q_out.quantize(np.concatenate([rounded(q1 * c) - rounded(q2 * sn),
                                                            rounded(q2 * c) + rounded(q1 * sn)], -1))
            path = build_rope(Path(tmp), kind, q_in, q_out, products, d)
            rows += [{"graph": f"RoPE, {kind}"} | r for r in score(path, {"x": q, "cos": cos, "sin": sin},
                                                                 rope_reference.astype(np.int64), soc)]
        from ondevice_llama.adapt.mask import MASK_VALUE

        c = 1024
        scores = (rng.standard_normal((1, 1, N, c)) * 2).astype(np.float32)
        mask = np.where(np.arange(c)[None, :] <= np.arange(c - N, c)[:, None], 0.0, MASK_VALUE).astype(np.float32)
        s_in = ActivationEncoding(16, float(scores.min()), float(scores.max()))
        probs_out = ActivationEncoding(16, 0.0, 1.0)
        sd = s_in.dequantize(s_in.quantize(scores)).astype(np.float64) + mask[None, None]
        e = np.exp(sd - sd.max(-1, keepdims=True))
        softmax_reference = probs_out.quantize(e / e.sum(-1, keepdims=True)).astype(np.int64)
        path = build_softmax(Path(tmp), s_in, probs_out, c)
        rows += [{"graph": "mask + softmax, float"} | r for r in score(
            path, {"x": scores, "mask": np.broadcast_to(mask, (1, 1, N, c)).copy()}, softmax_reference, soc)]
        probs, values = softmax_reference, rng.standard_normal((1, c, HEAD_DIM)) * np.linspace(0.2, 3, HEAD_DIM)
        feeds = {f"p{h}": probs_out.dequantize(probs[0, 0] if h == 0 else probs[0, 0, ::-1]).reshape(1, N, c)
                 for h in range(2)}
        v_enc = ActivationEncoding(16, float(values.min()), float(values.max()))
        feeds["v"] = v_enc.dequantize(v_enc.quantize(values))
        exact = np.concatenate([feeds[f"p{h}"].astype(np.float64) @ feeds["v"].astype(np.float64) for h in range(2)],
                               -1)
        c_out = ActivationEncoding(16, float(exact.min()), float(exact.max()))
        for kind in ("quantized", "float"):
            path = build_context(Path(tmp), kind, probs_out, v_enc, c_out, 2)
            rows += [{"graph": f"context MatMul, {kind}"} | r for r in score(
                path, feeds, c_out.quantize(exact).astype(np.int64), soc)]
        # The same with 8-bit values (--kv-bits 8): is HTP's quantized 16-bit x 8-bit MatMul any closer?
        v8 = ActivationEncoding(8, float(values.min()), float(values.max()))
        feeds8 = feeds | {"v": v8.dequantize(v8.quantize(values))}
        exact8 = np.concatenate([feeds8[f"p{h}"].astype(np.float64) @ feeds8["v"].astype(np.float64)
                                 for h in range(2)], -1)
        path = build_context(Path(tmp), "quantized", probs_out, v8, c_out, 2)
        rows += [{"graph": "context MatMul, quantized, v8"} | r for r in score(
            path, feeds8, c_out.quantize(exact8).astype(np.int64), soc)]
        from ondevice_llama.quantization.quantizers import quantize_weight

        x_proj = rng.standard_normal((1, N, H)).astype(np.float32)
        p_in = ActivationEncoding(16, float(x_proj.min()), float(x_proj.max()))
        xd = p_in.dequantize(p_in.quantize(x_proj)).astype(np.float64)
        weight = (rng.standard_normal((192, H)) * 0.05).astype(np.float32)
        for kind, scale_bits, provider in (("free scales", None, None), ("LPBQ scales", 4, qnn.LPBQ_OPTIONS)):
            w = quantize_weight(weight, 4, 32, scale_bits=scale_bits)
            exact = xd @ (w.codes * np.repeat(w.scales.astype(np.float64), 32, axis=1)).T
            p_out = ActivationEncoding(16, float(exact.min()), float(exact.max()))
            path = build_projection(Path(tmp), kind, p_in, p_out, w.codes.T, np.ascontiguousarray(w.scales.T))
            rows += [{"graph": f"int4 block MatMul, {kind}"} | r for r in score(
                path, {"x": x_proj}, p_out.quantize(exact).astype(np.int64), soc, provider)]
    print(f"{'graph':31s} {'backend':20s} {'>=1 step':>9s} {'>=2 steps':>10s} {'max':>5s} {'mean':>7s}")
    for r in rows:
        print(f"{r['graph']:31s} {r['backend']:20s} {r['off_by_1_or_more']:9.2%} {r['off_by_2_or_more']:10.2%} "
              f"{r['max_steps_off']:5d} {r['mean_steps']:+7.3f}")
    RESULTS.mkdir(exist_ok=True)
    result = {"shape": [1, N, H], "soc": soc.name, "qnn_sdk": qnn.sdk_version(), "rows": rows}
    (RESULTS / "htp_float_ops.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS / 'htp_float_ops.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How far QNN HTP's RMSNorm lands from float32's, in 16-bit output steps: the float-op chain against the fused op.

One RMSNorm over a residual-stream-like input (128 x 576, normal with one outlier channel, as Llama residual
streams have), its input and output quantized to 16 bits as our npu graphs quantize them, built two ways:

- "float chain": Mul, ReduceMean, Add, Sqrt, Div and Mul in float (HTP runs them in float16);
- "fused": one SimplifiedLayerNormalization over the weight's 16-bit codes (HTP's quantized RmsNorm);

each run on ONNX Runtime's CPU and on QNN HTP (the x86_64 simulator, SM8650), and scored against a float64
reference on the same quantized input and weight: the share of output codes one or more (two or more) steps off.

    python benchmarks/htp_rms_norm.py        # needs the qnn extra; writes results/htp_rms_norm.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from ondevice_llama import qnn
from ondevice_llama.quantization.encodings import ActivationEncoding, norm_weight_encoding

RESULTS = Path(__file__).resolve().parent / "results"
N, H, EPS = 128, 576, 1e-5
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


def main() -> int:
    import tempfile

    import onnxruntime as ort

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, N, H)) * 2).astype(np.float32)
    x[:, :, 7] *= 40
    weight = (1 + 0.3 * rng.standard_normal(H)).astype(np.float32)
    inp = ActivationEncoding(16, float(x.min()), float(x.max()))
    out = ActivationEncoding(16, -12.0, 12.0)
    xq = inp.dequantize(inp.quantize(x)).astype(np.float64)
    wq = norm_weight_encoding(weight).dequantize(norm_weight_encoding(weight).quantize(weight)).astype(np.float64)
    reference = out.quantize(xq / np.sqrt((xq**2).mean(-1, keepdims=True) + EPS) * wq).astype(np.int64)
    soc = qnn.soc_by_name("SM8650")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("float chain", "fused"):
            path = build(kind, Path(tmp), inp, out, weight)
            for backend in ("ONNX Runtime CPU", "QNN HTP (simulator)"):
                if backend.startswith("QNN"):
                    session = ort.InferenceSession(str(path), sess_options=qnn.session_options(soc))
                else:
                    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                off = np.abs(session.run(None, {"x": x})[0].astype(np.int64) - reference)
                rows.append({"graph": kind, "backend": backend, "off_by_1_or_more": float((off >= 1).mean()),
                             "off_by_2_or_more": float((off >= 2).mean()), "max_steps_off": int(off.max())})
    print(f"{'graph':12s} {'backend':20s} {'>=1 step':>9s} {'>=2 steps':>10s} {'max':>5s}")
    for r in rows:
        print(f"{r['graph']:12s} {r['backend']:20s} {r['off_by_1_or_more']:9.2%} {r['off_by_2_or_more']:10.2%} "
              f"{r['max_steps_off']:5d}")
    RESULTS.mkdir(exist_ok=True)
    result = {"shape": [1, N, H], "soc": soc.name, "qnn_sdk": qnn.sdk_version(), "rows": rows}
    (RESULTS / "htp_rms_norm.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS / 'htp_rms_norm.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

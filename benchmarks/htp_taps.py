"""Where QNN HTP parts from ONNX Runtime's CPU inside one graph: every quantized tensor of a few layers, compared.

    python benchmarks/htp_taps.py EXPORT [--layers 0,1,15,29] [--soc SM8650] [--out results/htp_taps.json]

Takes an npu export's first prompt processor, adds the outputs of its QuantizeLinear nodes in the chosen layers
(the first key/value head and query head of each) as graph outputs, and runs it once on a 128-token wikitext
chunk from an empty cache on the CPU (the runtime's session options) and on QNN HTP (the x86_64 simulator). Per
tensor: the share of 16-bit codes one or more and two or more steps apart, the most, and the RMS difference over
the codes' span. Layer 0's inputs are the same on both, so the first tensor whose difference jumps is where HTP
computes differently; the logits' KL and top-1 agreement say what it adds up to. The simulator takes about 2
minutes to prepare the graph and 2 to run it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def tapped_model(export: Path, layers: list[int], folder: Path) -> tuple[Path, list[str]]:
    """The export's first prompt processor with the chosen QuantizeLinear outputs added as graph outputs."""
    import onnx

    model = onnx.load(str(export / "prompt_processor_part1.onnx"), load_external_data=False)
    prefixes = tuple(f"/part0/layers.{layer}/" for layer in layers)
    taps = [node.output[0] for node in model.graph.node if node.op_type == "QuantizeLinear"
            and node.name.startswith(prefixes) and "sink_" not in node.name
            and ("head" not in node.name or "/head0/" in node.name or "/kv_head0/" in node.name)]
    for tap in taps:
        model.graph.output.append(onnx.helper.make_tensor_value_info(tap, onnx.TensorProto.UINT16, None))
    for record in {i.location for i in _external(model)}:
        os.link(export / record, folder / record)  # the weights beside the model, as ONNX Runtime requires
    path = folder / "taps.onnx"
    onnx.save(model, str(path))
    return path, taps


def _external(model):
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    return [ExternalDataInfo(t) for t in model.graph.initializer if uses_external_data(t)]


def chunk_feeds(export: Path, n: int) -> dict[str, np.ndarray]:
    """The first prompt processor's inputs for the first n tokens of wikitext, from an empty cache, as the
    runtime feeds them."""
    from ondevice_llama.runtime import ExportedModel
    from ondevice_llama.runtime.npu_engine import PROMPT_PROCESSOR

    model = ExportedModel(export, threads=1)
    ids = model.tokenizer.encode(WIKITEXT.read_text(encoding="utf-8")[:20_000]).ids[:n]
    return model.engine.inputs(PROMPT_PROCESSOR, ids, model.new_cache())[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--layers", default="0,1,15,29")
    parser.add_argument("--soc", default="SM8650")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "htp_taps.json")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from ondevice_llama import qnn
    from ondevice_llama.compile import weight_options
    from ondevice_llama.evaluation.metrics import log_softmax
    from ondevice_llama.manifest import load_manifest
    from ondevice_llama.runtime.exported_model import session_options

    layers = [int(x) for x in args.layers.split(",")]
    with tempfile.TemporaryDirectory(prefix="htp_taps_") as tmp:
        path, taps = tapped_model(args.export, layers, Path(tmp))
        feeds = chunk_feeds(args.export, 128)
        names = ["logits", *taps]
        cpu = dict(zip(names, ort.InferenceSession(str(path), session_options(), providers=[
            "CPUExecutionProvider"]).run(names, feeds), strict=True))
        print("preparing the graph on QNN HTP (minutes)", file=sys.stderr)
        provider = weight_options(load_manifest(args.export))  # as compile prepares it (LPBQ weights)
        htp_session = ort.InferenceSession(str(path), sess_options=qnn.session_options(qnn.soc_by_name(args.soc),
                                                                                       provider=provider))
        htp = dict(zip(names, htp_session.run(names, feeds), strict=True))
    rows = []
    for tap in taps:
        a, b = cpu[tap].astype(np.int64), htp[tap].astype(np.int64)
        off = np.abs(a - b)
        rows.append({"tensor": tap.removesuffix("/QuantizeLinear/output_0"),
                     "off_by_1_or_more": float((off >= 1).mean()),
                     "off_by_2_or_more": float((off >= 2).mean()), "max_steps_off": int(off.max()),
                     "rms_over_span": float(np.sqrt((off.astype(float) ** 2).mean()) / max(a.max() - a.min(), 1))})
        r = rows[-1]
        print(f"{r['tensor']:70s} >=1 {r['off_by_1_or_more']:6.1%} >=2 {r['off_by_2_or_more']:6.1%} "
              f"max {r['max_steps_off']:6d} rms/span {r['rms_over_span']:.2e}")
    p, q = log_softmax(cpu["logits"][0]), log_softmax(htp["logits"][0])
    kl = float(np.mean(np.sum(np.exp(p) * (p - q), axis=-1)))
    top1 = float(np.mean(p.argmax(-1) == q.argmax(-1)))
    print(f"logits of the 128 positions, HTP against CPU: KL {kl:.2e}, top-1 agreement {top1:.2%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"export": str(args.export), "soc": args.soc, "layers": layers, "positions": 128,
                                    "kl_htp_to_cpu": kl, "top1_agreement": top1, "tensors": rows}, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

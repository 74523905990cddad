"""AIMET as a measured peer: the default model quantized by Qualcomm's AIMET (aimet-onnx, its PyPI build), its
perplexity on the same windows as ours, in one run.

AIMET's LLM flow on the float ONNX graph of our reference model (one fixed window: [1, W] token ids -> logits,
no KV cache):

1. QuantizationSimModel(int4 weights, int16 activations, min-max ("tf") calibration, an HTP config file);
2. weights of every projection int4 LPBQ, block 32 (AIMET's low-power blockwise quantization: per-block
   integer scales under a per-channel float scale), or plain blockwise / per-channel with `--aimet-weights`;
   the LM head int8 per-channel (as ours is 8-bit; AIMET's `configure_llm` does both when it finds the
   topology, otherwise `set_lpbq_for_params` / `set_param_type` do the same by node name);
3. sequential MSE on the weight encodings (`aimet_onnx.apply_seq_mse`, `--seq-mse-candidates` candidates);
4. `compute_encodings` over the calibration windows (activations);
5. the QuantSim ONNX Runtime session scores every evaluation window.

Rows "AIMET ... min-max" skip step 3 (weights min-max, the rest the same); "AIMET ... + SeqMSE" run it.
Our rows (skip with `--skip-ours`): RTN and GPTQ at block 32, GPTQ on the Hadamard-rotated model, and that
with asymmetric calibration (GPTAQ, our default), all
w4a16 with 8-bit embedding and head, simulated in the PyTorch reference (`evaluation.simulated_logits`).

Calibration: our built-in set, rows of 256 tokens packed as our pipeline packs them (each starts with the
attention-sink token); AIMET's graph takes windows of W = --context-length tokens, so consecutive rows are
concatenated two by two into rows of 512 (an odd last row wraps around to the first). Evaluation windows: BOS
(the sink token) + W-1 text tokens, a short last window padded at the end for the fixed-shape graph and the
padded rows dropped (the model is causal).

The exported graph differs from the reference in one place: the causal mask adds -100 rather than the float's
lowest value (an int16 quantizer on "scores + mask" would otherwise spend its range on -3.4e38); exp(-100)
underflows to 0 in float32 softmax all the same, and the ONNX graph's float logits are checked against the
reference's on a calibration window. The embedding lookup (Gather) stays float in AIMET's HTP configs (it
quantizes no Gather data); the script records whether it could add an 8-bit quantizer there.

Run it in a venv that has aimet-onnx (its own torch, onnx, onnxruntime) with this project on the path:

    PYTHONPATH=src python benchmarks/aimet_peer.py [--max-tokens 8192] [--context-length 512]
        [--text wikitext --text python-docs] [--seq-mse-candidates 20] [--skip-ours]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from quantization_quality import TEXTS, add_model_and_text_arguments, plot, simulated_sources, text_file, text_result

from ondevice_llama.evaluation import evaluate, float_logits, load_text_tokens
from ondevice_llama.loading import open_checkpoint
from ondevice_llama.quantization.calibration import builtin_sequences, pack_sequences
from ondevice_llama.quantization.pipeline import attention_sink_token

RESULTS = Path(__file__).resolve().parent / "results"
CALIBRATION_LENGTH = 256  # tokens per calibration row, as quantization.pipeline packs them
MASK_VALUE = -100.0


def tail(error: BaseException, lines: int = 12) -> str:
    return "".join(traceback.format_exception(error)[-lines:])


class Steps:
    """Wall time and outcome of every AIMET step, in order."""

    def __init__(self):
        self.log: list[dict] = []

    def run(self, name: str, fn, *args, **kwargs):
        print(f"AIMET: {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        entry = {"step": name}
        self.log.append(entry)
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - recorded, the run goes on with what it has
            entry.update(seconds=time.perf_counter() - start, ok=False, error=f"{type(e).__name__}: {e}",
                         traceback=tail(e))
            print(f"AIMET: {name} FAILED after {entry['seconds']:.0f} s:\n{entry['traceback']}", file=sys.stderr)
            raise
        entry.update(seconds=time.perf_counter() - start, ok=True)
        print(f"AIMET: {name}: {entry['seconds']:.0f} s", file=sys.stderr, flush=True)
        return result


# --- the float ONNX graph ----------------------------------------------------------------------------------------

def export_float_onnx(checkpoint, window: int, folder: Path, check_tokens: np.ndarray) -> tuple[Path, dict]:
    """Our reference model as a fixed-shape ONNX graph [1, window] ids -> [1, window, vocab] logits."""
    import onnx
    import onnxruntime as ort

    import ondevice_llama.model.reference as reference
    from ondevice_llama.model import build_reference

    model = build_reference(checkpoint.config, checkpoint.tensors, torch.float32)
    if checkpoint.config.tie_word_embeddings:  # its own initializer, so the head gets its own (8-bit) quantizer
        model.lm_head.weight = torch.nn.Parameter(model.embed_tokens.weight.detach().clone())
    original_mask = reference.causal_mask

    def causal_mask(input_pos, keys, dtype):
        allowed = torch.arange(keys)[None, :] <= input_pos[:, None]
        return torch.zeros(len(input_pos), keys, dtype=dtype).masked_fill(~allowed, MASK_VALUE)

    raw, path = folder / "raw.onnx", folder / "float.onnx"
    ids = torch.from_numpy(check_tokens.astype(np.int64)).reshape(1, window)
    reference.causal_mask = causal_mask
    try:
        torch.onnx.export(model, (ids,), str(raw), input_names=["input_ids"], output_names=["logits"],
                          dynamo=False, opset_version=17)
    finally:
        reference.causal_mask = original_mask
    import onnxscript.optimizer

    onnx.save(onnxscript.optimizer.optimize(onnx.load(str(raw))), str(path))  # folds the shape arithmetic
    with torch.no_grad():
        expected = model(ids)[0].numpy()  # the real mask
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    got = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids.numpy()})[0][0]
    check = {"max_abs_logit_difference_vs_reference": float(np.abs(got - expected).max()),
             "top1_agreement_vs_reference": float((got.argmax(-1) == expected.argmax(-1)).mean())}
    return path, check


# --- AIMET -------------------------------------------------------------------------------------------------------

def aimet_calibration(calibration: torch.Tensor, window: int) -> list[dict[str, np.ndarray]]:
    """Rows of `CALIBRATION_LENGTH` tokens concatenated into rows of `window` (wrapping around at the end)."""
    per = window // calibration.shape[1]
    if per * calibration.shape[1] != window:
        raise ValueError(f"window {window} is not a multiple of the calibration rows' {calibration.shape[1]}")
    rows = calibration.numpy().astype(np.int64)
    count = -(-rows.shape[0] // per)
    order = [i % rows.shape[0] for i in range(count * per)]
    return [{"input_ids": rows[order[i * per:(i + 1) * per]].reshape(1, window)} for i in range(count)]


def build_sim(float_path: Path, args, steps: Steps, facts: dict):
    """QuantizationSimModel configured as AIMET's LLM flow does: int4 block-32 backbone, int8 head, int16 acts."""
    import onnx
    from aimet_onnx import QSpec, int4, int8
    from aimet_onnx.quantsim import QuantizationSimModel, set_lpbq_for_params, set_param_type

    model = onnx.load(str(float_path))
    sim = steps.run("QuantizationSimModel", QuantizationSimModel, model, param_type="int4", activation_type="int16",
                    quant_scheme="min_max", config_file=args.aimet_config, providers=["CPUExecutionProvider"],
                    session_options_kwargs={"intra_op_num_threads": args.threads, "inter_op_num_threads": 1})
    matmuls = [op for op in sim.connected_graph.ordered_ops if op.type in ("MatMul", "Gemm")
               and sim.get_op_quantizers(op)[2].get("weight") is not None]
    head = [op.name for op in matmuls if "lm_head" in op.name]
    backbone = {
        "lpbq": QSpec.lpbq(int4, block_size=args.block_size, scale_bits=4),
        "blockwise": QSpec.blockwise(int4, block_size=args.block_size, symmetric=True),
        "per-channel": QSpec.per_channel(int4, symmetric=True),
    }[args.aimet_weights]
    head_spec = QSpec.per_channel(int8, symmetric=True)

    def configure():
        try:
            from aimet_onnx.llm_configurator import configure_llm
            from aimet_onnx.llm_topology.topology import analyze_llm_topology_by_norm_count

            topology = analyze_llm_topology_by_norm_count(sim.model.model)
            configure_llm(sim, topology, backbone_weight_type=backbone, lm_head_weight_type=head_spec)
            facts["configured_by"] = "aimet_onnx.llm_configurator.configure_llm (topology by active norms)"
            facts["topology_lm_head"] = list(topology.lm_head)
            facts["topology_blocks"] = len(topology.blocks)
        except Exception as e:  # noqa: BLE001 - then by node name, the same precisions
            facts["configure_llm_error"] = f"{type(e).__name__}: {e}"
            others = {op.name for op in matmuls} - set(head)
            if args.aimet_weights == "lpbq":
                set_lpbq_for_params(sim, bitwidth=4, block_size=args.block_size, nodes_to_include=others)
            else:
                set_param_type(sim, backbone, nodes_to_include=others)
            set_param_type(sim, head_spec, nodes_to_include=set(head))
            facts["configured_by"] = "set_lpbq_for_params / set_param_type by node name"

    steps.run("configure weights (int4 backbone, int8 per-channel LM head)", configure)
    facts["weight_quantizers"] = describe_weight_quantizers(sim, matmuls)
    facts["embedding"] = embedding_quantizer(sim)
    return sim


def describe_weight_quantizers(sim, matmuls) -> dict[str, int]:
    """How many weight quantizers have which precision/granularity, e.g. {"int4 LPBQ(32)": 210, ...}."""
    counts: dict[str, int] = {}
    for op in matmuls:
        q = sim.get_op_quantizers(op)[2]["weight"]
        info = q.quant_info
        if not q.enabled:
            kind = "disabled"
        else:
            kind = str(q.precision())
            kind += (f" block {info.blockSize}" if info.blockSize else " per-channel" if info.usePerChannelMode
                     else " per-tensor")
            kind += " symmetric" if info.useSymmetricEncoding else " asymmetric"
            if getattr(q, "_scale_quantizer", None) is not None:
                kind += f" LPBQ ({type(q._scale_quantizer).__name__}, {q._scale_quantizer.__dict__})"
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def embedding_quantizer(sim) -> str:
    gathers = [op for op in sim.connected_graph.ordered_ops if op.type == "Gather"]
    notes = []
    for op in gathers:
        params = {k: v for k, v in sim.get_op_quantizers(op)[2].items() if v is not None}
        notes.append(f"{op.name}: " + (", ".join(f"{k} {v.bitwidth}-bit enabled={v.enabled}" for k, v in params.items())
                                       if params else "no parameter quantizer (the embedding table stays float)"))
    return "; ".join(notes) or "no Gather"


def aimet_source(sim, window: int, pad: int):
    """An evaluation source on AIMET's QuantSim session: fixed-shape windows, padding rows dropped."""

    def logits(tokens: list[int]) -> np.ndarray:
        ids = np.full((1, window), pad, dtype=np.int64)
        ids[0, :len(tokens)] = tokens
        return sim.session.run(None, {"input_ids": ids})[0][0, :len(tokens)].astype(np.float32)

    return logits


def run_aimet(float_path: Path, calibration: list[dict], args, with_seq_mse: bool, pad: int):
    """(source or None, record) for one AIMET variant; the record has every step's time and any error."""
    from aimet_onnx import apply_seq_mse

    steps, facts = Steps(), {}
    record = {"steps": steps.log, "facts": facts, "seq_mse": with_seq_mse,
              "calibration_windows": len(calibration)}
    try:
        sim = build_sim(float_path, args, steps, facts)
        if with_seq_mse:
            seq = calibration[:args.seq_mse_rows] if args.seq_mse_rows else calibration
            record["seq_mse_settings"] = {"num_candidates": args.seq_mse_candidates, "windows": len(seq),
                                          "tokens_per_window": args.context_length,
                                          "inp_symmetry": "symqt (default)", "loss_fn": "mse (default)"}
            steps.run("apply_seq_mse", apply_seq_mse, sim, seq, num_candidates=args.seq_mse_candidates)
        steps.run("compute_encodings", sim.compute_encodings, calibration)
    except Exception as e:  # noqa: BLE001
        record["stopped_at"] = steps.log[-1]["step"] if steps.log else "import"
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = tail(e)
        return None, record
    return aimet_source(sim, args.context_length, pad), record


# --- ours --------------------------------------------------------------------------------------------------------

def our_recipes(block: int) -> dict:
    """Our rows: RTN, GPTQ, GPTQ on the rotated model, and that with asymmetric calibration (GPTAQ, the
    default), at `block`."""
    from ondevice_llama.quantization.recipe import Recipe

    gptq = Recipe(block_size=block, asymmetric_calibration=0.0)
    return {f"ours w4a16 RTN block {block}": Recipe.from_precision("w4a16", algorithm="rtn", block_size=block,
                                                                   rotation=None),
            f"ours w4a16 GPTQ block {block}": replace(gptq, rotation=None),
            f"ours w4a16 GPTQ + rotation block {block}": replace(gptq, rotation="hadamard"),
            f"ours w4a16 GPTAQ + rotation block {block}": Recipe(block_size=block, rotation="hadamard")}


# --- main --------------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_and_text_arguments(parser, "window W (AIMET's graph is [1, W])")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--aimet-weights", choices=("lpbq", "blockwise", "per-channel"), default="lpbq",
                        help="AIMET's int4 backbone weight granularity")
    parser.add_argument("--aimet-config", default="htp_v81", help="AIMET quantsim config file or alias")
    parser.add_argument("--calibration-rows", type=int, default=None,
                        help="use only the first N built-in calibration rows of 256 tokens (default: all)")
    parser.add_argument("--seq-mse-candidates", type=int, default=20, help="apply_seq_mse num_candidates")
    parser.add_argument("--seq-mse-rows", type=int, default=None,
                        help="calibration windows SeqMSE sees (default: all of AIMET's calibration windows)")
    parser.add_argument("--skip-seq-mse", action="store_true", help="only the min-max AIMET row")
    parser.add_argument("--skip-min-max", action="store_true", help="only the SeqMSE AIMET row")
    parser.add_argument("--skip-ours", action="store_true", help="no rows of ours (development)")
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "aimet_peer.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "aimet_peer.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run_start = time.perf_counter()

    import aimet_onnx
    import onnxruntime

    checkpoint = open_checkpoint(args.model)
    sink = attention_sink_token(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        texts = {name: text_file(name, Path(tmp)) for name in args.text or list(TEXTS)}
        tokens = {name: load_text_tokens(path, checkpoint.tokenizer, args.max_tokens) for name, path in texts.items()}
    calibration = pack_sequences(builtin_sequences(checkpoint, generated=True), CALIBRATION_LENGTH, first_token=sink)
    if args.calibration_rows:
        calibration = calibration[:args.calibration_rows]
    aimet_cal = aimet_calibration(calibration, args.context_length)
    print(f"calibration: {calibration.shape[0]} x {calibration.shape[1]} tokens (built-in set); AIMET: "
          f"{len(aimet_cal)} x {args.context_length}", file=sys.stderr)

    sources = {"float": float_logits(checkpoint)}
    aimet_records, seconds = {}, {}
    where = {"lpbq": f"LPBQ block {args.block_size}", "blockwise": f"block {args.block_size}",
             "per-channel": "per-channel"}[args.aimet_weights]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        try:
            float_path, export_check = export_float_onnx(checkpoint, args.context_length, Path(tmp),
                                                         aimet_cal[0]["input_ids"])
            export_error = None
        except Exception as e:  # noqa: BLE001
            float_path, export_check, export_error = None, None, {"error": f"{type(e).__name__}: {e}",
                                                                  "traceback": tail(e)}
            print(f"ONNX export FAILED:\n{export_error['traceback']}", file=sys.stderr)
        seconds["onnx export"] = time.perf_counter() - start
        print(f"float ONNX graph: {seconds['onnx export']:.0f} s, check {export_check}", file=sys.stderr)
        variants = [] if float_path is None else (
            ([] if args.skip_min_max else [(f"AIMET w4a16 {where} min-max", False)])
            + ([] if args.skip_seq_mse else [(f"AIMET w4a16 {where} + SeqMSE", True)]))
        for name, with_seq_mse in variants:
            source, record = run_aimet(float_path, aimet_cal, args, with_seq_mse, pad=sink)
            aimet_records[name] = record
            if source is not None:
                sources[name] = source
        recipes = {} if args.skip_ours else our_recipes(args.block_size)
        our_sources, our_seconds = simulated_sources(checkpoint, recipes, calibration, sink)
        sources.update(our_sources)

        results = {}
        for text, ids in tokens.items():
            start = time.perf_counter()
            report = evaluate(sources, ids, args.context_length, reference="float", bos=sink)
            seconds[f"evaluate {text}"] = time.perf_counter() - start
            rows = []
            for name, r in report.sources.items():
                aimet = aimet_records.get(name)
                rows.append({"name": name, "perplexity": r.perplexity, "kl_to_float": r.kl_to_reference,
                             "top1_agreement": r.top1_agreement,
                             "quantize_seconds": (sum(s["seconds"] for s in aimet["steps"]) if aimet
                                                  else our_seconds.get(name))})
            results[text] = text_result(checkpoint.name, text, texts[text], report, rows)
    for name, record in aimet_records.items():
        if "error" in record:
            print(f"{name}: AIMET stopped at {record['stopped_at']}: {record['error']}")
        print(f"{name}: " + ", ".join(f"{s['step']} {s['seconds']:.0f} s" for s in record["steps"]))

    data = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": checkpoint.name,
            "model_path": str(checkpoint.path), "max_tokens": args.max_tokens, "bos_token": sink,
            "context_length": args.context_length, "block_size": args.block_size,
            "calibration_rows": calibration.shape[0], "calibration_length": calibration.shape[1],
            "calibration_source": "built-in (hand-written + generated)",
            "aimet_calibration": f"{len(aimet_cal)} windows of {args.context_length}: consecutive 256-token rows "
                                 "concatenated, the last wrapping around to the first",
            "aimet": {"version": aimet_onnx.__version__, "onnxruntime": onnxruntime.__version__,
                      "config_file": args.aimet_config, "weights": args.aimet_weights, "quant_scheme": "min_max (tf)",
                      "activation_type": "int16", "param_type": "int4", "lm_head": "int8 per-channel",
                      "mask_value": MASK_VALUE, "export_check": export_check, "export_error": export_error,
                      "variants": aimet_records},
            "ours": {n: {"quantize_seconds": our_seconds[n], "recipe": r.to_dict()} for n, r in recipes.items()},
            "seconds": seconds, "total_seconds": time.perf_counter() - run_start,
            "threads": args.threads, "machine": platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "texts": results,
            "command": " ".join(["python", *sys.argv])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    if results:
        try:
            plot(results, args.plot, f"{checkpoint.name}: AIMET {aimet_onnx.__version__} beside ours, w4a16")
        except Exception as e:  # noqa: BLE001 - matplotlib missing: no plot
            print(f"no plot: {type(e).__name__}: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

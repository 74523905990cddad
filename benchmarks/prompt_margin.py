"""How close a call the README prompt's first answer token is, in float and in each cpu-target compute type.

    python benchmarks/prompt_margin.py [--out benchmarks/results/prompt_margin.json]

The default model answers "What is the capital of France?" with "The capital of France is Paris." in float, but
its first token is a near tie: "The" leads "L" (the start of "L'Étoile, ...") by under a tenth of a logit. A
quantized model whose logits move by more than that may start the other answer, so with int8 activations whether
`chat` says Paris depends on how a CPU's int8 kernels round. This prints, for the float model (the GGUF
dequantized) and for cpu-target exports of it (the default, whose prompts run on a float prefill graph; prompts
in int8, the default before that graph; decode all int8; int8 everywhere; float everywhere), the top three first
tokens with their logits and the float leader's margin over the runner-up, the greedy reply with the smallest
margin among its decoded tokens, and names the CPU and its vector extensions
(`runtime.bench.machine_info`), since ONNX Runtime picks its int8 kernels by them. Machines differ, so the JSON
keeps one run per CPU (model and extensions), replacing only this CPU's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "prompt_margin.json"
PROMPT = "What is the capital of France?"
REPLY_TOKENS = 16
VARIANTS = {  # name -> (what it is, the cpu target's ExportOptions fields)
    "default": ("w4 affine (Q4_1 exact), prompts in float (prefill graph), decode int8 with down_proj in float", {}),
    "int8_prompt": ("the same with prompts in int8 too (--prefill-accuracy-level 4; the default before 2026-12-02)",
                    dict(prefill_accuracy_level=4)),
    "int8_down_proj": ("the default with down_proj in int8 too (--int8-down-proj): prompts in float, decode all int8",
                       dict(cpu_float_down_proj=False)),
    "int8_everywhere": ("w4 affine, int8 compute everywhere",
                        dict(prefill_accuracy_level=4, cpu_float_down_proj=False)),
    "float_everywhere": ("w4 affine, float compute everywhere (accuracy level 0)", dict(accuracy_level=0)),
}


def top_tokens(logits: np.ndarray, tokenizer, leader: int, runner_up: int) -> dict:
    top = np.argsort(-logits)[:3]
    return {"top3": [[tokenizer.decode([int(t)]), float(logits[t])] for t in top],
            "margin": float(logits[leader] - logits[runner_up])}


def greedy_reply(model, logits: np.ndarray, cache, eos_ids) -> dict:
    """The greedy reply from the prompt's `logits` on, and each decoded token's margin over its runner-up."""
    tokens, margins = [], []
    while len(tokens) < REPLY_TOKENS:
        top = np.argsort(-logits)[:2]
        tokens.append(int(top[0]))
        if len(tokens) > 1:
            margins.append(float(logits[top[0]] - logits[top[1]]))
        if tokens[-1] in eos_ids:
            break
        logits = np.asarray(model.decode(tokens[-1], cache))
    return {"reply": model.tokenizer.decode(tokens, skip_special_tokens=True),
            "smallest_decode_margin": min(margins)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import torch

    from ondevice_llama.chat_format import format_chat
    from ondevice_llama.export import ExportOptions, export_model
    from ondevice_llama.loading import default_checkpoint_path, open_checkpoint
    from ondevice_llama.model.reference import load_reference
    from ondevice_llama.runtime import ExportedModel
    from ondevice_llama.runtime.bench import machine_info

    checkpoint = open_checkpoint(default_checkpoint_path().resolve())
    ids = format_chat(checkpoint.tokenizer, [{"role": "user", "content": PROMPT}], checkpoint.special_tokens,
                      checkpoint.chat_template)
    with torch.no_grad():
        float_logits = load_reference(checkpoint)(torch.tensor([ids]))[0, -1].numpy()
    leader, runner_up = (int(t) for t in np.argsort(-float_logits)[:2])
    rows = {"float": {"description": "the GGUF dequantized, float32 (reference model)",
                      **top_tokens(float_logits, checkpoint.tokenizer, leader, runner_up)}}
    with tempfile.TemporaryDirectory(prefix="prompt_margin_") as tmp:
        for name, (description, options) in VARIANTS.items():
            folder = Path(tmp) / name
            export_model(checkpoint, folder, ExportOptions(target="cpu", **options), progress=False)
            model = ExportedModel(folder, threads=2)
            cache = model.new_cache()
            logits = np.asarray(model.prefill(ids, cache)).reshape(-1, float_logits.shape[-1])[-1]
            rows[name] = {"description": description, "options": options,
                          **top_tokens(logits, checkpoint.tokenizer, leader, runner_up),
                          **greedy_reply(model, logits, cache, checkpoint.special_tokens.eos_ids)}
    names = checkpoint.tokenizer.decode([leader]), checkpoint.tokenizer.decode([runner_up])
    machine = machine_info()
    print(f"first answer token of {PROMPT!r}; margin = logit({names[0]!r}) - logit({names[1]!r}); "
          f"CPU: {machine.get('cpu_model', '?')}, {' '.join(machine.get('cpu_extensions', [])) or 'no AVX2'}")
    for name, row in rows.items():
        top = ", ".join(f"{token!r} {logit:.3f}" for token, logit in row["top3"])
        reply = (f"   reply {row['reply'][:36]!r} (decode margins >= {row['smallest_decode_margin']:.2f})"
                 if "reply" in row else "")
        print(f"{name:18s} margin {row['margin']:+.3f}   {top}{reply}")
    run = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine, "rows": rows}
    data = {"prompt": PROMPT, "leader": names[0], "runner_up": names[1], "runs": _other_cpus(args.out, machine) + [run]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return 0


def _other_cpus(path: Path, machine: dict) -> list[dict]:
    """The runs already in `path` made on other CPUs."""
    def cpu(m: dict) -> tuple:
        return m.get("cpu_model"), tuple(m.get("cpu_extensions", []))

    runs = json.loads(path.read_text()).get("runs", []) if path.exists() else []
    return [r for r in runs if cpu(r["machine"]) != cpu(machine)]


if __name__ == "__main__":
    raise SystemExit(main())

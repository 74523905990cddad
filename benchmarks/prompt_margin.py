"""How close a call the README prompt's first answer token is, in float and in each cpu-target compute type.

    python benchmarks/prompt_margin.py [--out benchmarks/results/prompt_margin.json]

The default model answers "What is the capital of France?" with "The capital of France is Paris." in float, but
its first token is a near tie: "The" leads "L" (the start of "L'Étoile, ...") by under a tenth of a logit. A
quantized model whose logits move by more than that may start the other answer, so whether `chat` says Paris
depends on how a CPU's int8 kernels round. This prints, for the float model (the GGUF dequantized) and for
cpu-target exports of it (the default, int8 compute everywhere, float compute everywhere), the top three
first tokens with their logits and the float leader's margin over the runner-up, and names the CPU and its vector
extensions (`runtime.bench.machine_info`), since ONNX Runtime picks its int8 kernels by them.
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
VARIANTS = {  # name -> (what it is, the cpu target's ExportOptions fields)
    "default": ("w4 affine (Q4_1 exact), int8 compute, down_proj in float", {}),
    "int8_everywhere": ("w4 affine, int8 compute everywhere", dict(cpu_float_down_proj=False)),
    "float_everywhere": ("w4 affine, float compute everywhere (accuracy level 0)", dict(accuracy_level=0)),
}


def top_tokens(logits: np.ndarray, tokenizer, leader: int, runner_up: int) -> dict:
    top = np.argsort(-logits)[:3]
    return {"top3": [[tokenizer.decode([int(t)]), float(logits[t])] for t in top],
            "margin": float(logits[leader] - logits[runner_up])}


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
            logits = np.asarray(model.prefill(ids, model.new_cache())).reshape(-1, float_logits.shape[-1])[-1]
            rows[name] = {"description": description, "options": options,
                          **top_tokens(logits, checkpoint.tokenizer, leader, runner_up)}
    names = checkpoint.tokenizer.decode([leader]), checkpoint.tokenizer.decode([runner_up])
    machine = machine_info()
    print(f"first answer token of {PROMPT!r}; margin = logit({names[0]!r}) - logit({names[1]!r}); "
          f"CPU: {machine.get('cpu_model', '?')}, {' '.join(machine.get('cpu_extensions', [])) or 'no AVX2'}")
    for name, row in rows.items():
        top = ", ".join(f"{token!r} {logit:.3f}" for token, logit in row["top3"])
        print(f"{name:18s} margin {row['margin']:+.3f}   {top}")
    data = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "prompt": PROMPT,
            "machine": machine, "leader": names[0], "runner_up": names[1], "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The Genie bundle of a compiled folder: what Qualcomm's on-device LLM runtime needs beside the context binaries.

`genie_config.json` follows the layout of Qualcomm's published Llama configs (ai-hub-apps' llm_on_genie):
a basic dialog over the QnnHtp engine with the context binaries in part order, the model's own RoPE, and
`htp_backend_ext_config.json` naming the SoC. Genie reads the graphs' tensors by the names `adapt.layout` gives
them. Genie pushes the BOS token itself unless told not to: a quantized export holds the attention sink (the
BOS) in its graphs, so the bundle sets none and prompts start after it.
"""

from __future__ import annotations

from typing import Any

from ..manifest import Manifest
from ..qnn import Soc

CONFIG_FILE = "genie_config.json"
BACKEND_EXTENSIONS_FILE = "htp_backend_ext_config.json"
GENIE_ROPE_TYPES = ("default", "llama3")  # the rope scalings Genie computes itself (besides longrope)


def unsupported(manifest: Manifest) -> str | None:
    """Why Genie could not run this model as configured here, or None."""
    c = manifest.config
    if c.rope_scaling.rope_type not in GENIE_ROPE_TYPES:
        return f"Genie computes rope types {', '.join(GENIE_ROPE_TYPES)}, not {c.rope_scaling.rope_type!r}"
    if c.rope_theta != int(c.rope_theta):
        return f"Genie reads rope-theta as an integer; this model's is {c.rope_theta}"
    return None


def positional_encoding(manifest: Manifest) -> dict[str, Any]:
    c = manifest.config
    encoding: dict[str, Any] = {"type": "rope", "rope-dim": c.head_dim // 2, "rope-theta": int(c.rope_theta)}
    s = c.rope_scaling
    if s.rope_type == "llama3":
        encoding["rope-scaling"] = {"rope-type": "llama3", "factor": s.factor, "low-freq-factor": s.low_freq_factor,
                                    "high-freq-factor": s.high_freq_factor,
                                    "original-max-position-embeddings": s.original_max_position_embeddings}
    return encoding


def genie_config(manifest: Manifest, binaries: list[str], tokenizer_file: str) -> dict[str, Any]:
    """The dialog config; sampling is greedy, as our chat's default."""
    c, special = manifest.config, manifest.special_tokens
    sink_baked = manifest.attention_sink_file is not None
    bos = -1 if sink_baked or special.bos_id is None else special.bos_id
    return {"dialog": {
        "version": 1, "type": "basic",
        "context": {"version": 1, "size": manifest.context_length, "n-vocab": c.vocab_size, "bos-token": bos,
                    "eos-token": list(special.eos_ids)},
        "sampler": {"version": 1, "seed": 42, "temp": 0.0, "top-k": 1, "top-p": 1.0, "greedy": True},
        "tokenizer": {"version": 1, "path": tokenizer_file},
        "engine": {
            "version": 1, "n-threads": 3,
            "backend": {"version": 1, "type": "QnnHtp",
                        "QnnHtp": {"version": 1, "use-mmap": True, "spill-fill-bufsize": 0, "mmap-budget": 0,
                                   "poll": True, "cpu-mask": "0xe0", "kv-dim": c.head_dim, "allow-async-init": False},
                        "extensions": BACKEND_EXTENSIONS_FILE},
            "model": {"version": 1, "type": "binary", "binary": {"version": 1, "ctx-bins": list(binaries)},
                      "positional-encoding": positional_encoding(manifest)},
        },
    }}


def backend_extensions(soc: Soc) -> dict[str, Any]:
    """QNN HTP's backend extension config for the device: its SoC, burst performance, shared weights."""
    return {"devices": [{"soc_model": soc.soc_model, "dsp_arch": f"v{soc.htp_arch}",
                         "cores": [{"core_id": 0, "perf_profile": "burst", "rpc_control_latency": 100}]}],
            "memory": {"mem_type": "shared_buffer"},
            "context": {"weight_sharing_enabled": True}}

"""Where logits come from: each source is a `LogitFn` (token ids of one window -> logits [len, vocab]).

- "float": the PyTorch reference in fp32 (torch is imported only when this source is built);
- "exported": an exported folder run by ONNX Runtime (no torch), which needs an --all-logits export;
- "simulated": the fp32 reference on a `QuantizedModel`'s dequantized weights, every activation with an
  encoding fake-quantized (`FakeQuantTap`): what a quantized export must match.

`SOURCE_BUILDERS` is the registry of source kinds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..loading import Checkpoint, open_checkpoint
from .evaluate import LogitFn

if TYPE_CHECKING:
    from ..quantization.quantized_checkpoint import QuantizedModel
    from ..runtime import ExportedModel


def float_logits(checkpoint: Checkpoint | Path | str | None) -> LogitFn:
    """The fp32 PyTorch reference of `checkpoint` (a `Checkpoint`, or a path for `open_checkpoint`)."""
    import torch

    from ..model import load_reference

    if not isinstance(checkpoint, Checkpoint):
        checkpoint = open_checkpoint(checkpoint)
    model = load_reference(checkpoint, torch.float32)

    def logits(tokens: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([tokens], dtype=torch.long))[0].float().numpy()

    return logits


def simulated_logits(checkpoint: Checkpoint | Path | str | None, quantized: QuantizedModel) -> LogitFn:
    """The reference on `quantized`'s integer weights (dequantized; the checkpoint's float tensors for the
    rest) with activations fake-quantized to the recipe's encodings.

    With an attention sink it computes what the exported graphs do: the sink's K/V, as the graphs hold them
    (`AttentionSink.cache_entries`), in cache slot 0, and a window's tokens after it from RoPE position 0.
    """
    import torch

    from ..model import build_reference
    from ..quantization.observers import FakeQuantTap
    from ..quantization.quantized_checkpoint import QuantizedSource
    from ..quantization.rotation import checkpoint_for

    if not isinstance(checkpoint, Checkpoint):
        checkpoint = open_checkpoint(checkpoint)
    checkpoint = checkpoint_for(checkpoint, quantized.recipe)
    c = checkpoint.config
    model = build_reference(c, QuantizedSource(checkpoint.tensors, quantized), torch.float32)
    model.set_tap(FakeQuantTap(quantized.activations))
    sink = quantized.attention_sink
    if sink is None:
        def plain(tokens: list[int]) -> np.ndarray:
            with torch.no_grad():
                return model(torch.tensor([tokens], dtype=torch.long))[0].float().numpy()

        return plain
    entries = []
    for layer in range(c.num_layers):
        k, v = (quantized.activations.get(f"layers.{layer}.{tap}") for tap in ("k_rope", "v_cache"))
        key, value = sink.cache_entries(c, layer, k, v)
        key, value = (x if e is None else e.dequantize(x) for x, e in ((key, k), (value, v)))
        entries.append((torch.from_numpy(key[:, :, 0]), torch.from_numpy(value[:, 0, :])))

    def logits(tokens: list[int]) -> np.ndarray:
        ids = sink.with_sink(tokens)  # as the export runs them: the sink, then the rest
        body = ids[1:]
        rows = [sink.logits[None].astype(np.float32)]
        if body:
            model.setup_cache(len(body) + 1)
            for layer, (key, value) in zip(model.layers, entries, strict=True):
                layer.attention.kv_cache.k[0, :, 0], layer.attention.kv_cache.v[0, :, 0] = key, value
            slots = torch.arange(1, len(body) + 1)
            with torch.no_grad():
                out = model(torch.tensor([body], dtype=torch.long), slots, slots - 1)[0].float().numpy()
            rows.append(out)
        return np.concatenate(rows)[len(ids) - len(tokens):]

    return logits


def exported_logits(folder: Path | str | ExportedModel, threads: int | None = None) -> LogitFn:
    """An exported folder (or an `ExportedModel`) through ONNX Runtime; it must have been exported with
    --all-logits, and a window must fit its context length."""
    from ..runtime import ExportedModel

    model = folder if isinstance(folder, ExportedModel) else None
    if model is None:
        require_all_logits(folder)
        model = ExportedModel(folder, threads=threads)
    else:
        require_all_logits(model.folder)

    def logits(tokens: list[int]) -> np.ndarray:
        return np.asarray(model.logits(tokens), dtype=np.float32)

    return logits


def require_all_logits(folder: Path | str) -> None:
    """Raise a one-line error naming `folder` when its export returns only the last position's logits."""
    from ..manifest import load_manifest

    if not load_manifest(folder).all_logits:
        raise ValueError(f"{folder}: exported without --all-logits, so it returns only the last position's logits; "
                         f"export it again with `ondevice-llama export --all-logits ...` to evaluate it")


# Source kind -> builder of its LogitFn.
SOURCE_BUILDERS: dict[str, Callable[..., LogitFn]] = {
    "float": float_logits,
    "exported": exported_logits,
    "simulated": simulated_logits,
}


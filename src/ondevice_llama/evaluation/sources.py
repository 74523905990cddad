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
from typing import TYPE_CHECKING, Any

import numpy as np

from ..loading import Checkpoint, open_checkpoint
from .evaluate import LogitFn

if TYPE_CHECKING:
    from ..quantization.quantize_model import QuantizedModel
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
    rest) with activations fake-quantized to the recipe's encodings."""
    import torch

    from ..model import build_reference
    from ..quantization.calibration import FakeQuantTap
    from ..quantization.quantize_model import QuantizedSource

    if not isinstance(checkpoint, Checkpoint):
        checkpoint = open_checkpoint(checkpoint)
    model = build_reference(checkpoint.config, QuantizedSource(checkpoint.tensors, quantized), torch.float32)
    sink = quantized.attention_sink
    model.set_tap(FakeQuantTap(quantized.activations, float_first=sink is not None))

    def logits(tokens: list[int]) -> np.ndarray:
        ids = sink.with_sink(tokens) if sink is not None else list(tokens)  # as the export runs them
        with torch.no_grad():
            return model(torch.tensor([ids], dtype=torch.long))[0, len(ids) - len(tokens):].float().numpy()

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


def make_source(kind: str, *args: Any, **kwargs: Any) -> LogitFn:
    """Build a source by kind name, e.g. make_source("exported", folder, threads=2)."""
    if kind not in SOURCE_BUILDERS:
        raise ValueError(f"unknown source kind {kind!r}; known: {', '.join(SOURCE_BUILDERS)}")
    return SOURCE_BUILDERS[kind](*args, **kwargs)

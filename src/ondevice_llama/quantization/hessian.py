"""GPTQ's Hessians: the sum of x^T x over the calibration inputs of each projection, and how a layer's
projections are watched to collect them (quantize_model and sensitivity both do it this way)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from ..model.reference import Block
from .observers import later_positions

# Projections that read the same input share one Hessian.
SHARED_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
                "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}
# One projection per input: its input is that input's value.
INPUT_READER = {key: proj for proj, key in reversed(SHARED_INPUT.items())}
INPUT_ORDER = tuple(dict.fromkeys(SHARED_INPUT.values()))  # the order a block reads them in
GRAM_ROWS = 2048  # rows per product


def gram(x: Tensor) -> Tensor:
    """Sum of x^T x over the rows of x [..., d]: products in x's dtype (float32: fast), `GRAM_ROWS` rows at a
    time, summed in float64."""
    x = x.reshape(-1, x.shape[-1])
    total = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64)
    for chunk in x.split(GRAM_ROWS):
        total += (chunk.T @ chunk).double()
    return total


def measured_positions(x: Tensor, skip_first: bool) -> Tensor:
    """The positions of a projection input that calibration measures: all, or all but the sink at 0."""
    return later_positions(x) if skip_first else x


@contextmanager
def watch_projections(block: Block, watch: Callable[[str, Tensor, Tensor], None]) -> Iterator[None]:
    """Call watch(projection, input, output) for every projection of `block` it runs inside this block."""
    def hook(proj: str):
        return lambda _module, args, output: watch(proj, args[0], output)

    hooks = [block.projection(proj).register_forward_hook(hook(proj)) for proj in SHARED_INPUT]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


class HessianSums:
    """Hessians (`gram`) of a layer's distinct projection inputs, summed over the forward passes watched
    (`watch_projections(block, sums)`); with `skip_first`, sequence position 0 (the sink) is left out."""

    def __init__(self, skip_first: bool = False, dtype: torch.dtype = torch.float32):
        self.skip_first, self.dtype = skip_first, dtype
        self.sums: dict[str, Tensor] = {}

    def __call__(self, proj: str, x: Tensor, _output: Tensor) -> None:
        if INPUT_READER[key := SHARED_INPUT[proj]] == proj:
            self.sums[key] = self.sums.get(key, 0) + gram(measured_positions(x, self.skip_first).to(self.dtype))


def layer_hessians(block: Block, hidden: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, skip_first: bool,
                   chunk_rows: int | None = None, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Hessians of each distinct projection input of `block` over the calibration hidden states `hidden`
    [rows, length, hidden], run through it `chunk_rows` rows at a time (None: all at once)."""
    sums = HessianSums(skip_first, dtype)
    step = chunk_rows or hidden.shape[0]
    with torch.no_grad(), watch_projections(block, sums):
        for start in range(0, hidden.shape[0], step):
            block(hidden[start:start + step], cos, sin, mask, None)
    return sums.sums


def _capture_input(block: Block, key: str, hidden: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                   skip_first: bool) -> tuple[Tensor, Tensor]:
    """The input `key` of `block` on `hidden` (positions flattened), and the block's output."""
    captured = []

    def watch(proj: str, x: Tensor, _output: Tensor) -> None:
        if proj == INPUT_READER[key]:
            x = measured_positions(x, skip_first)
            captured.append(x.reshape(-1, x.shape[-1]))

    with torch.no_grad(), watch_projections(block, watch):
        output = block(hidden, cos, sin, mask, None)
    return captured[0], output


def input_statistics(block: Block, float_block: Block, key: str, hidden: Tensor, target: Tensor, cos: Tensor,
                     sin: Tensor, mask: Tensor, skip_first: bool,
                     chunk_rows: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """For asymmetric calibration (GPTAQ) of the projections reading input `key`: the Hessian X^T X of `block`
    (the projections before them quantized) on the quantized model's hidden states `hidden`, the cross product
    X^T X_t with `float_block`'s input X_t on the float model's hidden states `target` (same rows and
    positions), and `float_block`'s output on `target` (the float model's next hidden states). `chunk_rows`
    rows at a time bound the memory that holds both inputs."""
    hessian = cross = 0
    outputs = []
    for start in range(0, hidden.shape[0], chunk_rows):
        x, _ = _capture_input(block, key, hidden[start:start + chunk_rows], cos, sin, mask, skip_first)
        x_float, output = _capture_input(float_block, key, target[start:start + chunk_rows], cos, sin, mask,
                                         skip_first)
        outputs.append(output)
        hessian = hessian + gram(x)
        cross = cross + (x.T @ x_float).double()
    return hessian, cross, torch.cat(outputs)

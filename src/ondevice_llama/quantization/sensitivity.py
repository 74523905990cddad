"""Quantization sensitivity: how much each projection hurts when it alone is quantized, and a recipe from that.

The measure (`analyze_sensitivity`): for every decoder layer L and projection P (q, k, v, o, gate, up,
down), quantize only P's weight to 4 bits (symmetric, the given block size, round-to-nearest or GPTQ),
keep everything else float, and compare layer L's output (the decoder block output, residual included)
with the float block output on the calibration tokens, as an SQNR in dB (higher is better). Every
layer is fed float hidden states (the float layers before it), so each figure is the cost of that one
piece alone. Only one decoder layer is built at a time, and the calibration rows run through it in
chunks, so memory stays bounded whatever the model size.

The layer is the reference model's `Block` (`build_block`), and inside it only what depends on P is
recomputed: with q/k/v at 4 bits, the whole layer; with o_proj, the MLP step; with gate/up, the MLP; with
down_proj, down_proj alone.

Each piece also gets the SQNR of the projection's own output (before the residual), a diagnostic that
isolates the weight's rounding from how much the layer relies on the projection; the embedding and the
LM head are reported at the recipe's head bits (embedding output and logits SQNR).

With GPTQ's asymmetric calibration (the default recipe's), a piece measured alone is exactly GPTQ: it sees
float inputs, so the float model's inputs it would aim at are its own (cross product = Hessian), and the
figure is what that method leaves behind in it. What asymmetric calibration adds, compensating the drift of
the layers before, the whole model's figures (`evaluate`, benchmarks/quantization_quality.py) show.

The recipe (`choose_overrides`): rank the pieces by block-output SQNR, lowest first, and walk down the
ranking, keeping a piece at 8 bits (`Recipe.overrides["layers.L.P"] = 8`) when the 8-bit projection
parameters chosen so far plus its own (out x in) stay within `budget` x all projection parameters; a
piece that does not fit is skipped and the walk goes on, so smaller pieces further down the ranking can
use what is left. Everything else is 4-bit; the embedding and LM head keep the recipe's head bits (8)
and are not counted in the budget. Budget 0 gives plain w4a16.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..loading import Checkpoint
from ..loading.names import ATTENTION_PROJECTIONS, PROJECTIONS
from ..model.reference import Block, build_block, causal_mask, rms_norm, rope_cos_sin
from .gptq import FactorCache
from .hessian import SHARED_INPUT, gram, layer_hessians, watch_projections
from .quantize_model import dequantized_tensor, quantize_with_recipe
from .recipe import BLOCK_SIZES, BLOCK_SIZES_TEXT, DEFAULT_BLOCK_SIZE, Recipe, method_options
from .rotation import checkpoint_for

BITS = 4
DEFAULT_BUDGET = 0.1  # at most 10% of the projection parameters at 8 bits
DEFAULT_MAX_TOKENS = 4096  # calibration tokens measured on (evenly spaced rows)
OVERRIDE_BITS = 8
CHUNK_ROWS = 8  # calibration rows per forward pass
HEAD_POSITIONS = 2048  # positions the LM head's logits SQNR is measured on


@dataclass(frozen=True)
class Piece:
    """One projection of one layer and its 4-bit sensitivity."""

    layer: int
    projection: str
    shape: tuple[int, int]  # [out, in]
    sqnr_db: float  # decoder block output with only this piece quantized, against float
    projection_sqnr_db: float  # this projection's own output, against float

    @property
    def name(self) -> str:
        return f"layers.{self.layer}.{self.projection}"

    @property
    def parameters(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class HeadResult:
    """The embedding or LM head quantized alone to `bits`."""

    name: str
    bits: int
    measured_on: str  # "embedding output" or "logits"
    sqnr_db: float
    parameters: int


@dataclass
class SensitivityReport:
    model: str
    checkpoint: str
    num_layers: int
    recipe: Recipe  # the quantization measured (no overrides)
    calibration: dict  # where the tokens came from and how many were measured
    pieces: list[Piece]
    heads: list[HeadResult] = field(default_factory=list)
    seconds: float = 0.0

    def ranked(self) -> list[Piece]:
        """Most sensitive (lowest SQNR) first."""
        return sorted(self.pieces, key=lambda p: (p.sqnr_db, p.name))

    def grid(self) -> np.ndarray:
        """SQNR in dB, [layers, projections] in `PROJECTIONS` order."""
        grid = np.full((self.num_layers, len(PROJECTIONS)), np.nan)
        for p in self.pieces:
            grid[p.layer, PROJECTIONS.index(p.projection)] = p.sqnr_db
        return grid

    @property
    def projection_parameters(self) -> int:
        return sum(p.parameters for p in self.pieces)


def select_rows(calibration: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """At most `max_tokens` tokens of [rows, length] calibration ids as whole rows spread evenly over the
    set (its parts differ: hand-written chats and texts, then the model's own text); 0 keeps all."""
    rows, length = calibration.shape
    keep = rows if max_tokens <= 0 else max(1, min(rows, max_tokens // length))
    return calibration[torch.from_numpy(np.unique(np.linspace(0, rows - 1, keep).round().astype(np.int64)))]


def check_block_size(checkpoint: Checkpoint, block_size: int | None) -> None:
    if block_size is not None and block_size not in BLOCK_SIZES:
        raise ValueError(f"--block-size: must be 0 (per output channel), {BLOCK_SIZES_TEXT}, got {block_size}")
    if block_size is None:
        return
    for proj in PROJECTIONS:
        cols = checkpoint.tensors.shape(f"layers.0.{proj}")[1]
        if cols % block_size:
            raise ValueError(f"--block-size: {block_size} does not divide {proj}'s input size {cols}")


def _sqnr(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def _sum_squares(x: torch.Tensor) -> float:
    return float(x.double().square().sum())


@contextmanager
def _weight_replaced(linear: torch.nn.Linear, weight: torch.Tensor) -> Iterator[None]:
    original = linear.weight.data
    linear.weight.data = weight
    try:
        yield
    finally:
        linear.weight.data = original


class LayerForward:
    """A decoder layer (the reference's `Block`) on float hidden states, then again with one projection's
    weight replaced, recomputed only from the step that projection's output enters (`Block.attention_step`,
    `Block.mlp_step`)."""

    def __init__(self, block: Block, cos: torch.Tensor, sin: torch.Tensor):
        self.block, self.cos, self.sin = block, cos, sin
        self.weights = {proj: block.projection(proj).weight.data for proj in PROJECTIONS}

    def _rope_and_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = x.shape[1]
        return self.cos[:t], self.sin[:t], causal_mask(torch.arange(t), t, x.dtype)

    def float(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every intermediate of the float layer: projection inputs (SHARED_INPUT keys) and outputs, the residual
        stream after attention (`x1`) and the output (`out`)."""
        f = {"x": x}

        def record(proj: str, inputs: torch.Tensor, output: torch.Tensor) -> None:
            f[SHARED_INPUT[proj]], f[proj] = inputs, output

        with watch_projections(self.block, record):
            f["x1"] = self.block.attention_step(x, *self._rope_and_mask(x), None)
            f["out"] = self.block.mlp_step(f["x1"])
        return f

    def with_weight(self, f: dict[str, torch.Tensor], proj: str, weight: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(layer output, projection output) with `proj`'s weight replaced, from the float intermediates `f`."""
        y = F.linear(f[SHARED_INPUT[proj]], weight)
        if proj == "o_proj":  # the residual stream after attention is x + o_proj's output
            return self.block.mlp_step(f["x"] + y), y
        if proj == "down_proj":  # and the layer's output x1 + down_proj's
            return f["x1"] + y, y
        with _weight_replaced(self.block.projection(proj), weight):
            if proj in ATTENTION_PROJECTIONS:
                return self.block(f["x"], *self._rope_and_mask(f["x"]), None), y
            return self.block.mlp_step(f["x1"]), y


def _measure_heads(checkpoint: Checkpoint, recipe: Recipe, tokens: torch.Tensor, embed: torch.Tensor,
                   final_hidden: torch.Tensor) -> list[HeadResult]:
    """Embedding output SQNR on the calibration tokens; logits SQNR on up to HEAD_POSITIONS final positions."""
    c, tensors = checkpoint.config, checkpoint.tensors
    bits = recipe.bits_for("embed_tokens")
    embed_q = dequantized_tensor(quantize_with_recipe(embed.numpy(), bits, recipe, None))
    used = torch.unique(tokens)
    counts = torch.bincount(tokens.reshape(-1), minlength=c.vocab_size)[used].double()
    signal = float((embed[used].double().square().sum(-1) * counts).sum())  # each token as often as it occurs
    noise = float(((embed_q[used] - embed[used]).double().square().sum(-1) * counts).sum())
    heads = [HeadResult("embed_tokens", bits, "embedding output", _sqnr(signal, noise), embed.numel())]
    flat = final_hidden.reshape(-1, c.hidden_size)
    flat = flat[np.unique(np.linspace(0, flat.shape[0] - 1, min(HEAD_POSITIONS, flat.shape[0])).astype(int))]
    normed = rms_norm(flat, torch.from_numpy(np.asarray(tensors.get("norm"), np.float32)), c.rms_norm_eps)
    if c.tie_word_embeddings:
        name, head, head_q = "embed_tokens (as LM head)", embed, embed_q
    else:
        name, bits = "lm_head", recipe.bits_for("lm_head")
        head = torch.from_numpy(np.asarray(tensors.get("lm_head"), np.float32))
        hessian = gram(normed.double()) if recipe.algorithm == "gptq" else None
        head_q = dequantized_tensor(quantize_with_recipe(head.numpy(), bits, recipe, hessian))
    signal = noise = 0.0
    for start in range(0, normed.shape[0], 256):
        chunk = normed[start:start + 256]
        signal += _sum_squares(chunk @ head.T)
        noise += _sum_squares(chunk @ (head_q - head).T)
    heads.append(HeadResult(name, bits, "logits", _sqnr(signal, noise), head.numel()))
    return heads


def analyze_sensitivity(checkpoint: Checkpoint, calibration: torch.Tensor, block_size: int | None = DEFAULT_BLOCK_SIZE,
                        algorithm: str | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
                        calibration_info: dict | None = None, heads: bool = True, progress: bool = True,
                        sink_token: int | None = None, rotation: str | None = None) -> SensitivityReport:
    """4-bit sensitivity of every (layer, projection); calibration: [rows, length] token ids.

    algorithm, rotation None: the recipe's defaults (rotation "none": no rotation). `max_tokens` (0: all)
    bounds the calibration tokens measured on;
    with GPTQ, the Hessians come from the same tokens. With `sink_token` (every row starts with it),
    position 0 is not measured: quantized exports never run it (ondevice_llama.attention_sink).
    """
    start_time = time.perf_counter()
    check_block_size(checkpoint, block_size)
    options = {"block_size": block_size} | method_options(algorithm, rotation)
    recipe = Recipe.from_precision("w4a16", **options)
    checkpoint = checkpoint_for(checkpoint, recipe)  # what the recipe quantizes: rotated, if it rotates
    c, tensors = checkpoint.config, checkpoint.tensors
    tokens = select_rows(calibration, max_tokens)
    length = tokens.shape[1]
    skip = int(sink_token is not None)  # the first measured position
    cos, sin = rope_cos_sin(c, torch.arange(length))
    mask = causal_mask(torch.arange(length), length, torch.float32)
    embed = torch.from_numpy(np.asarray(tensors.get("embed_tokens"), np.float32))
    hidden = embed[tokens]
    pieces: list[Piece] = []
    worst: Piece | None = None
    bar = tqdm(range(c.num_layers), desc=f"sensitivity (w{BITS}, {recipe.algorithm})", unit="layer",
               disable=not progress, dynamic_ncols=True)
    with torch.no_grad():
        for layer in bar:
            forward = LayerForward(build_block(c, tensors, layer), cos, sin)
            hessians = {}
            if recipe.algorithm == "gptq":  # products in float64, as the measure's sums are
                hessians = layer_hessians(forward.block, hidden, cos, sin, mask, bool(skip), CHUNK_ROWS, torch.float64)
            factors = FactorCache()
            quantized = {proj: dequantized_tensor(quantize_with_recipe(forward.weights[proj].numpy(), BITS, recipe,
                                                                       hessians.get(SHARED_INPUT[proj]), factors))
                         for proj in PROJECTIONS}
            del hessians
            signal, proj_signal = 0.0, dict.fromkeys(PROJECTIONS, 0.0)
            noise, proj_noise = dict.fromkeys(PROJECTIONS, 0.0), dict.fromkeys(PROJECTIONS, 0.0)
            next_hidden = torch.empty_like(hidden)
            for first in range(0, hidden.shape[0], CHUNK_ROWS):
                f = forward.float(hidden[first:first + CHUNK_ROWS])
                next_hidden[first:first + CHUNK_ROWS] = f["out"]
                signal += _sum_squares(f["out"][:, skip:])
                for proj in PROJECTIONS:
                    out, y = forward.with_weight(f, proj, quantized[proj])
                    noise[proj] += _sum_squares((out - f["out"])[:, skip:])
                    proj_signal[proj] += _sum_squares(f[proj][:, skip:])
                    proj_noise[proj] += _sum_squares((y - f[proj])[:, skip:])
                del f
            for proj in PROJECTIONS:
                piece = Piece(layer, proj, tuple(forward.weights[proj].shape), _sqnr(signal, noise[proj]),
                              _sqnr(proj_signal[proj], proj_noise[proj]))
                pieces.append(piece)
                if worst is None or piece.sqnr_db < worst.sqnr_db:
                    worst = piece
            bar.set_postfix_str(f"worst {worst.name} {worst.sqnr_db:.1f} dB")
            hidden = next_hidden
            del forward, quantized
    bar.close()
    head_results = _measure_heads(checkpoint, recipe, tokens[:, skip:], embed, hidden[:, skip:]) if heads else []
    info = dict(calibration_info or {}) | {"rows_measured": int(tokens.shape[0]),
                                           "tokens_measured": int(tokens.numel())}
    return SensitivityReport(checkpoint.name, str(checkpoint.path), c.num_layers, recipe, info, pieces, head_results,
                             time.perf_counter() - start_time)


def choose_overrides(pieces: list[Piece], budget: float) -> dict[str, int]:
    """The pieces kept at 8 bits: lowest SQNR first while they fit in `budget` x all projection parameters
    (a piece that does not fit is skipped; see the module docstring)."""
    if not 0 <= budget <= 1:
        raise ValueError(f"--budget: must be a fraction between 0 and 1, got {budget}")
    allowed = math.floor(budget * sum(p.parameters for p in pieces) + 1e-6)  # parameters are whole
    used, overrides = 0, {}
    for piece in sorted(pieces, key=lambda p: (p.sqnr_db, p.name)):
        if used + piece.parameters <= allowed:
            overrides[piece.name] = OVERRIDE_BITS
            used += piece.parameters
    return overrides


def sensitivity_recipe(report: SensitivityReport, budget: float = DEFAULT_BUDGET) -> Recipe:
    """The measured w4a16 recipe with the most sensitive pieces at 8 bits (see `choose_overrides`)."""
    return replace(report.recipe, overrides=choose_overrides(report.pieces, budget))

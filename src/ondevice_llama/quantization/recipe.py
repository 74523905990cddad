"""Quantization recipes: which weights get how many bits, which activations are quantized, and how.

A recipe is data: `export` and `quantize` build one from `--precision` and options, `analyze` writes one,
and any of them can be saved and given back with `--recipe`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..files import read_versioned_json
from .encodings import is_kv_tap

RECIPE_FORMAT = "ondevice-llama-recipe"
RECIPE_VERSION = 1
ALGORITHMS = ("rtn", "gptq")
ROTATIONS = ("hadamard",)  # offline rotations fused into the weights (quantization.rotation); None: none
HEAD_TENSORS = ("embed_tokens", "lm_head")

# ---------------------------------------------------------------- the precision and block-size vocabulary
# (the one place: export, quantize, evaluate and analyze, and the command line, read these)

# Quantized precision -> (projection bits, activation bits; None: float activations); the embedding and LM
# head default to 8 bits.
PRECISIONS = {"w8a16": (8, 16), "w4a16": (4, 16), "w8": (8, None), "w4": (4, None)}
FLOAT_PRECISIONS = ("fp32", "fp16")
# What each export target supports, and its default.
TARGET_PRECISIONS = {"npu": (*FLOAT_PRECISIONS, *PRECISIONS), "cpu": ("fp32", "w8", "w4")}
DEFAULT_PRECISION = {"npu": "w4a16", "cpu": "w4"}
# Weight quantization blocks (inputs per scale); None (0 on the command line) is per output channel.
BLOCK_SIZES = (32, 64, 128)
DEFAULT_BLOCK_SIZE = 32
LPBQ_SCALE_BITS = 4  # QNN's blockwise expansion: 4-bit integer block scales under a per-channel float scale
BLOCK_SIZES_TEXT = ", ".join(map(str, BLOCK_SIZES[:-1])) + f" or {BLOCK_SIZES[-1]}"  # "32, 64 or 128"


ROTATION_CHOICES = (*ROTATIONS, "none")  # the command line's --rotation


def rotation_option(choice: str | None) -> dict:
    """Recipe keywords for a --rotation choice: None keeps the recipe's default, "none" turns rotation off."""
    if choice is None:
        return {}
    if choice not in ROTATION_CHOICES:
        raise ValueError(f"--rotation: choose one of {', '.join(ROTATION_CHOICES)}, got {choice!r}")
    return {"rotation": None if choice == "none" else choice}


def method_options(algorithm: str | None, rotation: str | None) -> dict:
    """Recipe keywords for the --algorithm and --rotation choices (None: the recipe's defaults)."""
    return ({"algorithm": algorithm} if algorithm else {}) | rotation_option(rotation)


@dataclass(frozen=True)
class Recipe:
    weight_bits: int = 4
    block_size: int | None = None  # None: per output channel
    algorithm: str = "gptq"
    activation_bits: int | None = 16  # None: float activations
    kv_bits: int = 16  # the KV cache taps (keys after RoPE, values); 8 halves cache size
    head_bits: int = 8  # embedding and LM head
    overrides: dict[str, int] = field(default_factory=dict)  # tensor name (e.g. "layers.3.down_proj") -> bits
    # GPTQ options (see quantization.gptq): Hessian damping as a fraction of its mean diagonal, columns in
    # decreasing Hessian-diagonal order (static block scales), Hessian-weighted MSE search of the scales.
    # The defaults are the best measured on the default model (benchmarks/quantization_quality.py).
    damp: float = 0.05
    act_order: bool = True
    clip_search: bool = True
    # GPTQ: least-squares block scales for the final codes (gptq.refit_scales); on the rotated default model,
    # block 32: perplexity 34.65 -> 33.55 (2,048 wikitext tokens), about a second per layer.
    refit_scales: bool = True
    # Rotate the residual stream and value heads first (quantization.rotation). "auto": with GPTQ, which it
    # helps (default model, block 32: perplexity 36.42 -> 34.65), not with RTN, which it hurts there (43.40 ->
    # 61.41: that model's float weights are Q4_1 codes, whose grid rotation throws away).
    rotation: str | None = "auto"
    # int4 block scales on the LPBQ grid of this many bits (quantizers.lpbq_scales), the form QNN HTP runs in
    # integer arithmetic (4; None: free float scales). Not the default, by measurement on the default model: its
    # projections land within a step on HTP, but the quantized model is further from float (2,048 wikitext
    # tokens: KL 0.147 -> 0.174, perplexity 33.00 -> 33.07) and HTP's KL to the export doubles (3.0e-4 ->
    # 5.9e-4; top-1 98.73% -> 98.83%), its integer path rounding low where the float16 one rounds evenly.
    block_scale_bits: int | None = None
    # GPTQ with asymmetric calibration (GPTAQ): how far each layer aims at the float model's outputs instead of
    # the float layer's outputs on the quantized model's inputs, 0 (plain GPTQ) to 1 (gptq_quantize's `cross`,
    # blended with the Hessian). Measured on the rotated default model, block 32, 2,048 tokens (wikitext /
    # Python docs perplexity; float 30.22 / 15.72): 0 33.39 / 17.43, 0.5 32.71 / 16.77, 1 33.78 / 17.60
    # (KL to float 0.149, 0.111, 0.141): compensating the inputs' whole drift overshoots. It doubles GPTQ's time.
    asymmetric_calibration: float = 0.5

    def __post_init__(self) -> None:
        counts = (self.weight_bits, self.head_bits, self.kv_bits, self.block_size or 0, self.activation_bits or 0)
        flags = (self.act_order, self.clip_search, self.refit_scales)
        if not all(type(n) is int for n in counts) or not all(type(f) is bool for f in flags):
            raise ValueError("bits and block sizes must be whole numbers, act_order, clip_search and refit_scales "
                             "true or false")
        overrides = self.overrides.items() if isinstance(self.overrides, dict) else [(None, None)]
        if not all(isinstance(name, str) and type(bits) is int and bits in (4, 8) for name, bits in overrides):
            raise ValueError("overrides must map tensor names to 4 or 8 bits")
        if self.weight_bits not in (4, 8) or self.head_bits not in (4, 8):
            raise ValueError("weight bits must be 4 or 8")
        if self.block_size is not None and self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block size must be {BLOCK_SIZES_TEXT} (or per channel), got {self.block_size}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; choose one of {ALGORITHMS}")
        if self.rotation == "auto":
            object.__setattr__(self, "rotation", "hadamard" if self.algorithm == "gptq" else None)
        if self.block_scale_bits not in (None, LPBQ_SCALE_BITS):
            raise ValueError(f"block scale bits must be {LPBQ_SCALE_BITS} (LPBQ) or none, got {self.block_scale_bits}")
        if self.rotation is not None and self.rotation not in ROTATIONS:
            raise ValueError(f"unknown rotation {self.rotation!r}; choose one of {ROTATIONS} (or none)")
        if self.activation_bits not in (None, 8, 16) or self.kv_bits not in (8, 16):
            raise ValueError("activation and KV bits must be 8 or 16")
        if isinstance(self.damp, bool) or not isinstance(self.damp, int | float) or not 0 <= self.damp < 10:
            raise ValueError(f"GPTQ damping must be in [0, 10), got {self.damp}")
        alpha = self.asymmetric_calibration
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
            raise ValueError(f"asymmetric calibration must be in [0, 1], got {alpha}")

    def bits_for(self, tensor: str) -> int:
        if tensor in self.overrides:
            return self.overrides[tensor]
        return self.head_bits if tensor in HEAD_TENSORS else self.weight_bits

    def scale_bits_for(self, bits: int) -> int | None:
        """The LPBQ scale bits for a weight quantized at `bits` (QNN HTP takes LPBQ for int4 only)."""
        return self.block_scale_bits if bits == 4 else None

    def activation_bits_for(self, tap: str) -> int | None:
        if self.activation_bits is None:
            return None
        return self.kv_bits if is_kv_tap(tap) else self.activation_bits

    def describe(self) -> str:
        """E.g. 'w4a16, block 32, gptq, 8-bit head, 3 overrides'."""
        name = f"w{self.weight_bits}" + (f"a{self.activation_bits}" if self.activation_bits else "")
        grouping = f"block {self.block_size}" if self.block_size else "per channel"
        parts = [name, grouping, self.algorithm + (f" + {self.rotation} rotation" if self.rotation else ""),
                 f"{self.head_bits}-bit head"]
        if self.kv_bits != 16 and self.activation_bits:
            parts.append(f"{self.kv_bits}-bit KV")
        if self.overrides:
            parts.append(f"{len(self.overrides)} overrides")
        if self.block_scale_bits:
            parts.append("LPBQ block scales")
        if self.algorithm == "gptq" and self.asymmetric_calibration:
            parts.append(f"asymmetric calibration {self.asymmetric_calibration:g}")
        return ", ".join(parts)

    @classmethod
    def from_precision(cls, precision: str, **options) -> Recipe:
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not a quantized precision ({', '.join(PRECISIONS)})")
        bits, activations = PRECISIONS[precision]
        return cls(weight_bits=bits, activation_bits=activations, **options)

    def to_dict(self) -> dict:
        return {"format": RECIPE_FORMAT, "format_version": RECIPE_VERSION} | asdict(self)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        """A saved recipe; one written before rotations, scale refits and asymmetric calibration existed did
        none of them, whatever today's defaults."""
        saved = {k: v for k, v in data.items() if k not in ("format", "format_version")}
        return cls(**{"rotation": None, "refit_scales": False, "asymmetric_calibration": 0.0} | saved)

    @classmethod
    def load(cls, path: Path | str) -> Recipe:
        data = read_versioned_json(Path(path), RECIPE_FORMAT, RECIPE_VERSION, "recipe")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: invalid recipe ({e})") from None

"""Calibration data and activation range observers.

The built-in set mixes chat turns (rendered with the model's own chat template, so the special tokens
and formatting a deployed model sees are covered) with plain prose, code and lists.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..adapt.mask import MASK_VALUE
from ..loading import Checkpoint
from ..runtime.chat_format import format_chat
from .encodings import ActivationEncoding

CHATS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Explain photosynthesis in two sentences.",
     "Plants use sunlight to turn water and carbon dioxide into sugar. Oxygen is released as a by-product."),
    ("Write a haiku about autumn rain.",
     "Cold rain on red leaves,\nthe gutter hums a low tune,\nnight comes early now."),
    ("How do I reverse a list in Python?", "Use `items.reverse()` to reverse in place, or `items[::-1]` for a copy."),
    ("Give me three tips for better sleep.",
     "1. Keep a regular schedule.\n2. Avoid screens an hour before bed.\n3. Keep the bedroom cool and dark."),
    ("What is 17 times 23?", "17 times 23 is 391."),
    ("Translate 'good morning' into Spanish and German.", "Spanish: buenos días. German: guten Morgen."),
    ("Summarize the plot of Romeo and Juliet.",
     "Two young lovers from feuding families in Verona marry in secret; a chain of misunderstandings ends "
     "with both taking their own lives, which finally reconciles their families."),
    ("Can you recommend a vegetarian dinner?",
     "Try a chickpea and spinach curry with rice: quick, filling and full of protein."),
    ("Why is the sky blue?",
     "Air molecules scatter short blue wavelengths of sunlight much more than red ones, so blue light "
     "reaches our eyes from every direction of the sky."),
)
TEXTS: tuple[str, ...] = (
    "The river winds through the valley for nearly two hundred kilometres before it reaches the sea. In the "
    "nineteenth century its banks were lined with mills, and the town at its mouth grew rich on trade in "
    "wool, timber and salt. Today most of the mills are museums or apartments.",
    "def fibonacci(n: int) -> list[int]:\n    values = [0, 1]\n    while len(values) < n:\n"
    "        values.append(values[-1] + values[-2])\n    return values[:n]\n\nprint(fibonacci(10))\n",
    "Ingredients: 200 g flour, 2 eggs, 300 ml milk, a pinch of salt, butter for the pan. Whisk the eggs "
    "and milk, add the flour and salt, rest the batter for 30 minutes, then cook thin pancakes.",
    "Quarterly revenue rose 12% to $4.8 billion, while operating costs fell 3%. The board approved a "
    "dividend of $0.45 per share, payable on March 15, 2024.",
    "= Solar System =\n\nThe Solar System consists of the Sun and the objects that orbit it: eight planets, "
    "their moons, dwarf planets such as Pluto, and countless asteroids and comets.",
    "Dear team,\n\nThank you all for your hard work this month. The release is scheduled for Friday; please "
    "finish your reviews by Wednesday evening.\n\nBest regards,\nMaria",
)


def builtin_sequences(checkpoint: Checkpoint) -> list[list[int]]:
    """Token ids of the built-in calibration set."""
    tok, special, template = checkpoint.tokenizer, checkpoint.special_tokens, checkpoint.chat_template
    sequences = []
    for i, (user, assistant) in enumerate(CHATS):
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "You are a concise, helpful assistant."})
        sequences.append(format_chat(tok, messages, special, template, add_generation_prompt=False))
    sequences += [tok.encode(text, add_special_tokens=False).ids for text in TEXTS]
    return sequences


def file_sequences(checkpoint: Checkpoint, path: Path, length: int, count: int) -> list[list[int]]:
    """Consecutive `length`-token pieces of a text file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read calibration text ({e})") from None
    ids = checkpoint.tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) < length:
        raise ValueError(f"{path}: {len(ids)} tokens, fewer than one calibration sequence of {length}")
    return [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)][:count]


def pack_sequences(sequences: list[list[int]], length: int) -> torch.Tensor:
    """Concatenate and cut into equal rows of `length` tokens, so calibration runs as one batch."""
    flat = [t for s in sequences for t in s]
    rows = max(1, len(flat) // length)
    flat = (flat * (rows * length // max(len(flat), 1) + 1))[:rows * length]
    return torch.tensor(flat, dtype=torch.long).view(rows, length)


class RangeObserver:
    """A tap that records each activation's running min and max (masked attention scores left out)."""

    def __init__(self):
        self.ranges: dict[str, tuple[float, float]] = {}

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        values = x.detach()
        if name.endswith(".scores"):
            values = values[values > MASK_VALUE / 2]
        lo, hi = float(values.min()), float(values.max())
        old = self.ranges.get(name)
        self.ranges[name] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
        return x


SCORE_FLOOR = 20.0  # masked scores clamp this far below the largest: exp(-20) is negligible


def encodings_from_ranges(ranges: dict[str, tuple[float, float]], bits_for) -> dict[str, ActivationEncoding]:
    encodings = {}
    for name, (lo, hi) in ranges.items():
        bits = bits_for(name)
        if bits is None:
            continue
        if name.endswith(".scores"):
            lo = min(lo, hi - SCORE_FLOOR)  # room for the masked entries to saturate harmlessly
        encodings[name] = ActivationEncoding(bits, lo, hi)
    return encodings


def fake_quant(x: torch.Tensor, encoding: ActivationEncoding) -> torch.Tensor:
    """Quantize-dequantize as QuantizeLinear/DequantizeLinear do (round half to even, saturate)."""
    scale, zp = encoding.scale, encoding.zero_point
    q = torch.clamp(torch.round(x / scale) + zp, 0, 2**encoding.bits - 1)
    return ((q - zp) * scale).to(x.dtype)


class FakeQuantTap:
    """A tap that fake-quantizes every activation that has an encoding."""

    def __init__(self, encodings: dict[str, ActivationEncoding]):
        self.encodings = encodings

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        encoding = self.encodings.get(name)
        return x if encoding is None else fake_quant(x, encoding)


def sqnr_db(reference: np.ndarray | torch.Tensor, approximation: np.ndarray | torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    ref, approx = np.asarray(reference, np.float64), np.asarray(approximation, np.float64)
    noise = np.sum((ref - approx) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref**2) / noise))

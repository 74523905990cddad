"""Perplexity, and KL divergence and top-1 agreement to a reference, over non-overlapping windows.

The protocol is the usual wikitext one with stride = window: the token stream is cut into windows of
`window` tokens, each run from an empty context; in a window of L tokens, the logits of positions
0..L-2 are scored against tokens 1..L-1 (the first token of a window has no context and is not scored).
KL and top-1 agreement are taken on the same positions. A last partial window shorter than 2 tokens
has nothing to score and is dropped. Only one window of logits per source is held at a time.

With `bos` (the model's BOS token, which quantized exports need: ondevice_llama.attention_sink), every window
starts with it and holds `window` - 1 text tokens, all of them scored: models see text that way in use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from .metrics import Sums, log_prob_sums, log_softmax

LogitFn = Callable[[list[int]], np.ndarray]  # token ids of one window -> logits [len, vocab] float32


def split_windows(tokens: list[int], window: int, bos: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of `window` tokens, each starting with `bos` when given; a last one shorter
    than 2 tokens is dropped."""
    if window < 2:
        raise ValueError(f"the window must hold at least 2 tokens, got {window}")
    prefix = [] if bos is None else [bos]
    step = window - len(prefix)
    windows = [prefix + list(tokens[i:i + step]) for i in range(0, len(tokens), step)]
    return [w for w in windows if len(w) >= 2]


@dataclass
class SourceResult:
    perplexity: float
    mean_nll: float
    positions: int  # scored positions
    kl_to_reference: float | None = None  # mean KL(P_ref || Q) per position, nats; None for the reference
    top1_agreement: float | None = None  # fraction of positions with the reference's argmax

    @classmethod
    def from_sums(cls, sums: Sums, against_reference: bool) -> SourceResult:
        return cls(sums.perplexity, sums.mean_nll, sums.positions,
                   sums.mean_kl if against_reference else None,
                   sums.top1_agreement if against_reference else None)


@dataclass
class EvaluationReport:
    window: int  # tokens per window (= the context each window is run with)
    tokens: int  # tokens evaluated (all windows)
    windows: int
    positions: int  # scored positions per source: tokens - windows, or tokens with `bos`
    reference: str | None
    sources: dict[str, SourceResult] = field(default_factory=dict)
    comparisons: dict[str, SourceResult] = field(default_factory=dict)  # "a vs b": a measured against b
    bos: int | None = None  # the token each window started with, if any

    def to_dict(self) -> dict[str, Any]:
        return {"window": self.window, "tokens": self.tokens, "windows": self.windows,
                "positions": self.positions, "reference": self.reference, "bos": self.bos,
                "sources": {name: vars(result).copy() for name, result in self.sources.items()},
                "comparisons": {name: vars(result).copy() for name, result in self.comparisons.items()}}

    def table(self) -> str:
        """A plain-text table, one row per source, preceded by a line that says what was measured."""
        ref = self.reference if any(name != self.reference for name in self.sources) else None
        per_window = self.window - (self.bos is not None)
        shorter = self.tokens < self.windows * per_window
        lines = [f"{self.tokens} tokens in {self.windows} window(s) of {self.window} tokens"
                 + (f" (BOS {self.bos} + {per_window} text tokens)" if self.bos is not None else "")
                 + (" (the last one shorter)" if shorter else "")
                 + f", context length {self.window}, {self.positions} positions scored per source"
                 + (f"; reference: {ref}" if ref else "")]
        header = ["source", "perplexity", "mean NLL"]
        if ref:
            header += [f"KL to {ref} (nats/token)", "top-1 agreement"]
        rows = [header]
        for name, r in self.sources.items():
            row = [name, f"{r.perplexity:.4f}", f"{r.mean_nll:.5f}"]
            if ref:
                row += ["-" if r.kl_to_reference is None else f"{r.kl_to_reference:.3e}",
                        "-" if r.top1_agreement is None else f"{100 * r.top1_agreement:.2f}%"]
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for row in rows:
            cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
            lines.append("  ".join(cells).rstrip())
        for name, r in self.comparisons.items():
            lines.append(f"{name}: KL {r.kl_to_reference:.3e} nats/token, "
                         f"top-1 agreement {100 * r.top1_agreement:.2f}%")
        return "\n".join(lines)


def evaluate(sources: dict[str, LogitFn], tokens: list[int], window: int, reference: str | None = "float",
             progress: bool = True, compare: tuple[tuple[str, str], ...] = (), bos: int | None = None
             ) -> EvaluationReport:
    """Score every source on `tokens` window by window (see the module docstring for the protocol).

    `reference` names the source the others are compared with (KL divergence, top-1 agreement); None
    compares nothing and gives perplexity alone. `compare` adds pairs (a, b) measuring a against b too,
    e.g. ("exported", "simulated"); b must come before a in `sources`.
    """
    if not sources:
        raise ValueError("nothing to evaluate: no sources")
    if reference is not None and reference not in sources:
        raise ValueError(f"reference {reference!r} is not among the sources {sorted(sources)}")
    windows = split_windows(tokens, window, bos)
    if not windows:
        raise ValueError(f"{len(tokens)} token(s): at least 2 are needed to score anything")
    order = ([reference] if reference else []) + [name for name in sources if name != reference]
    for a, b in compare:
        if a not in order or b not in order or order.index(b) > order.index(a):
            raise ValueError(f"cannot compare {a!r} with {b!r}: both must be sources, {b!r} listed first")
    sums = {name: Sums() for name in order}
    pair_sums = {pair: Sums() for pair in compare}
    kept_for = {b for _, b in compare}
    for ids in tqdm(windows, desc="evaluating", unit="window", disable=not progress, dynamic_ncols=True):
        targets = np.asarray(ids[1:], dtype=np.int64)
        reference_log_probs, kept = None, {}
        for name in order:
            log_probs = log_softmax(_window_logits(name, sources[name], ids)[:-1])
            sums[name] += log_prob_sums(log_probs, targets, reference_log_probs)
            if name == reference:
                reference_log_probs = log_probs
            for a, b in compare:
                if a == name:
                    pair_sums[(a, b)] += log_prob_sums(log_probs, targets, kept[b])
            if name in kept_for:
                kept[name] = log_probs
    results = {name: SourceResult.from_sums(sums[name], reference is not None and name != reference)
               for name in sources}
    total = sum(len(w) for w in windows)
    comparisons = {f"{a} vs {b}": SourceResult.from_sums(pair_sums[(a, b)], True) for a, b in compare}
    return EvaluationReport(window=window, tokens=total - (bos is not None) * len(windows), windows=len(windows),
                            positions=total - len(windows), bos=bos,
                            reference=reference, sources=results, comparisons=comparisons)


def _window_logits(name: str, fn: LogitFn, ids: list[int]) -> np.ndarray:
    logits = np.asarray(fn(ids))
    if logits.ndim != 2 or logits.shape[0] != len(ids):
        raise ValueError(f"source {name!r} returned logits of shape {logits.shape} for {len(ids)} tokens "
                         f"(expected [{len(ids)}, vocab])")
    return logits

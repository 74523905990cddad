"""Window metrics in numpy: sums, so that windows aggregate exactly into corpus-level figures.

Every function takes logits [positions, vocab] (any float dtype) and works in float64 with natural logs.
Position i's logits predict token i + 1; pairing logits with their targets is the caller's job.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64, stable for any finite logits (max subtracted first)."""
    x = np.array(logits, dtype=np.float64)  # a copy, worked on in place
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def nll_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum over positions of -log softmax(logits[i])[targets[i]]."""
    return _nll(log_softmax(_check_2d(logits)), targets)


def kl_per_position(reference_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(P_ref || Q) at each position, in nats: sum_v p_ref(v) (log p_ref(v) - log q(v)).

    Rounding can make a value a hair below zero; it is clipped to 0, the true minimum.
    """
    _check_same(reference_logits, logits)
    return _kl(log_softmax(reference_logits), log_softmax(logits))


def kl_sum(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    """Sum over positions of KL(P_ref || Q)."""
    return float(kl_per_position(reference_logits, logits).sum())


def top1_matches(reference_logits: np.ndarray, logits: np.ndarray) -> int:
    """How many positions have the same argmax (greedy token) as the reference."""
    _check_same(reference_logits, logits)
    return int((np.argmax(reference_logits, axis=-1) == np.argmax(logits, axis=-1)).sum())


def perplexity(total_nll: float, positions: int) -> float:
    """exp(mean negative log-likelihood)."""
    if positions <= 0:
        raise ValueError("perplexity needs at least one scored position")
    return float(np.exp(total_nll / positions))


@dataclass
class Sums:
    """Running sums for one source; `+` adds windows, the properties give the corpus-level figures."""

    positions: int = 0
    nll: float = 0.0
    kl: float = 0.0  # KL to the reference, summed over positions (0 for the reference itself)
    top1: int = 0  # positions whose argmax equals the reference's

    def __add__(self, other: Sums) -> Sums:
        return Sums(self.positions + other.positions, self.nll + other.nll, self.kl + other.kl,
                    self.top1 + other.top1)

    @property
    def mean_nll(self) -> float:
        return self.nll / self.positions

    @property
    def perplexity(self) -> float:
        return perplexity(self.nll, self.positions)

    @property
    def mean_kl(self) -> float:
        return self.kl / self.positions

    @property
    def top1_agreement(self) -> float:
        return self.top1 / self.positions


def window_sums(logits: np.ndarray, targets: np.ndarray, reference_logits: np.ndarray | None = None) -> Sums:
    """The sums of one window: NLL of `targets`, and KL / top-1 matches to `reference_logits` when given."""
    if reference_logits is not None:
        _check_same(reference_logits, logits)
        reference_logits = log_softmax(reference_logits)
    return log_prob_sums(log_softmax(_check_2d(logits)), targets, reference_logits)


def log_prob_sums(log_probs: np.ndarray, targets: np.ndarray, reference_log_probs: np.ndarray | None = None) -> Sums:
    """`window_sums` from log-probabilities (`log_softmax` of the logits), so each is computed only once."""
    sums = Sums(positions=len(targets), nll=_nll(_check_2d(log_probs), targets))
    if reference_log_probs is not None:
        _check_same(reference_log_probs, log_probs)
        sums.kl = float(_kl(reference_log_probs, log_probs).sum())
        sums.top1 = top1_matches(reference_log_probs, log_probs)  # log_softmax keeps each row's argmax
    return sums


def _nll(log_probs: np.ndarray, targets: np.ndarray) -> float:
    targets = np.asarray(targets, dtype=np.int64)
    if targets.shape != (log_probs.shape[0],):
        raise ValueError(f"{log_probs.shape[0]} positions of logits but targets of shape {targets.shape}")
    return float(-log_probs[np.arange(len(targets)), targets].sum())


def _kl(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    return np.maximum((np.exp(log_p) * (log_p - log_q)).sum(axis=-1), 0.0)


def _check_2d(logits: np.ndarray) -> np.ndarray:
    if np.ndim(logits) != 2:
        raise ValueError(f"expected logits [positions, vocab], got shape {np.shape(logits)}")
    return logits


def _check_same(reference_logits: np.ndarray, logits: np.ndarray) -> None:
    if np.shape(reference_logits) != np.shape(logits):
        raise ValueError(f"logits of different shapes: {np.shape(reference_logits)} (reference) and "
                         f"{np.shape(logits)}")

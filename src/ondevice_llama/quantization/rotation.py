"""Offline rotations: an orthogonal change of basis fused into the weights, so that 4-bit weights lose less.

A Llama layer only ever reads its residual stream through an RMSNorm and a Linear, and writes it through a
Linear, so the stream may be expressed in any orthonormal basis Q without changing the function (QuaRot,
SpinQuant's R1): RMSNorm(x Q) = RMSNorm(x) Q when the norm's weight is folded into the Linear that reads it.
Likewise each value head may be turned by R between v_proj and o_proj (SpinQuant's R2): attention mixes
value rows linearly, so R cancels in o_proj. After a rotation the weights' outlier columns are spread over
all inputs, and a block of 32 has a smaller range to cover with 16 codes.

What this module rewrites (weights in [out, in] layout, x a row vector, g a norm's weight):

    embed_tokens  E        -> E Q                 input_norm, post_attention_norm, norm  g -> 1
    q, k, gate, up  W      -> W diag(g) Q         o_proj, down_proj  W -> Q^T W (o_proj also W[:, head] R)
    v_proj  W              -> R^T W_head diag(g) Q per kv head
    lm_head  W (or E tied) -> W diag(g_final) Q   (so a tied model becomes untied)

Nothing is added to the graph: the exported model has the same operators, only other weights. Q is a
Hadamard matrix with random signs where one of the hidden size exists (orders 2^k times 1, 12, 20, 28, 36,
44, 52, 60, 68 or 76 here), otherwise a random orthogonal matrix; R likewise for head_dim. Both are
seeded, so a rotation is reproducible from its name and seed.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cached_property

import numpy as np

from ..loading import Checkpoint, TensorSource
from ..loading.names import is_norm
from .recipe import Recipe

DEFAULT_SEED = 0


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(j - i) over the prime field GF(q), chi the quadratic character."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if i in residues else -1 for i in range(1, q)])
    return chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]


def _paley(order: int) -> np.ndarray | None:
    """A Hadamard matrix of `order` by Paley's constructions over a prime field, or None."""
    q = order - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: I + S, S the skew conference matrix
        s = np.zeros((order, order), np.int64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return s + np.eye(order, dtype=np.int64)
    q = order // 2 - 1
    if order % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II, from the symmetric conference matrix
        c = np.zeros((q + 1, q + 1), np.int64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        return np.kron(c, [[1, 1], [1, -1]]) + np.kron(np.eye(q + 1, dtype=np.int64), [[1, -1], [-1, -1]])
    return None


def hadamard(n: int) -> np.ndarray | None:
    """An n x n matrix of +-1 with orthogonal rows (H H^T = n I), or None when none is built here."""
    for base in sorted({n // p for p in (1, 2, 4, 8, 16, 32, 64) if n % p == 0} | {1}):
        if base == 1:
            h = np.ones((1, 1), np.int64)
        else:
            h = _paley(base)
            if h is None:
                continue
        while h.shape[0] < n:  # Sylvester: [[H, H], [H, -H]]
            h = np.block([[h, h], [h, -h]])
        if h.shape[0] == n:
            return h
    return None


def orthogonal(n: int, seed: int) -> np.ndarray:
    """A seeded n x n orthogonal matrix (float64): a Hadamard matrix with random signs on its rows, scaled to
    unit rows, or a random orthogonal matrix (QR of a Gaussian) when no Hadamard matrix of order n is built."""
    rng = np.random.default_rng(seed)
    h = hadamard(n)
    if h is None:
        q, r = np.linalg.qr(rng.standard_normal((n, n)))
        return q * np.sign(np.diag(r))[None, :]
    signs = rng.choice([-1.0, 1.0], n)
    return signs[:, None] * h / np.sqrt(n)


class RotatedSource:
    """`source`'s tensors with the rotations above fused in, each computed when asked for (in float64)."""

    def __init__(self, source: TensorSource, config, seed: int = DEFAULT_SEED):
        self.source, self.config, self.seed = source, config, seed

    @cached_property
    def residual(self) -> np.ndarray:
        return orthogonal(self.config.hidden_size, self.seed)

    @cached_property
    def value(self) -> np.ndarray:
        return orthogonal(self.config.head_dim, self.seed + 1)

    def names(self) -> list[str]:
        names = self.source.names()
        return names if "lm_head" in names else [*names, "lm_head"]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape("embed_tokens" if name == "lm_head" and not self._has_head else name)

    @cached_property
    def _has_head(self) -> bool:
        return "lm_head" in self.source.names()

    def get(self, name: str) -> np.ndarray:
        if is_norm(name):
            return np.ones(self.source.shape(name), np.float32)
        q, tensor = self.residual, name.rsplit(".", 1)[-1]
        if name == "embed_tokens":
            w = self.source.get(name).astype(np.float64) @ q
        elif name == "lm_head":
            head = self.source.get("lm_head" if self._has_head else "embed_tokens").astype(np.float64)
            w = (head * self.source.get("norm").astype(np.float64)[None, :]) @ q
        elif tensor in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            norm = "input_norm" if tensor in ("q_proj", "k_proj", "v_proj") else "post_attention_norm"
            g = self.source.get(name.replace(tensor, norm)).astype(np.float64)
            w = (self.source.get(name).astype(np.float64) * g[None, :]) @ q
            if tensor == "v_proj":  # per kv head: R^T W_head
                d = self.config.head_dim
                w = np.einsum("ji,hjc->hic", self.value, w.reshape(-1, d, w.shape[1])).reshape(w.shape)
        elif tensor in ("o_proj", "down_proj"):
            w = q.T @ self.source.get(name).astype(np.float64)
            if tensor == "o_proj":  # per attention head's columns: W_head R
                d = self.config.head_dim
                w = np.einsum("ohj,ji->ohi", w.reshape(w.shape[0], -1, d), self.value).reshape(w.shape)
        else:
            raise KeyError(name)
        return np.ascontiguousarray(w, dtype=np.float32)


def rotate_checkpoint(checkpoint: Checkpoint, seed: int = DEFAULT_SEED) -> Checkpoint:
    """The same model in rotated bases (see the module docstring): equal logits, weights easier to quantize.
    Its LM head is its own tensor, so the config is untied. A rotated checkpoint is returned as it is."""
    if isinstance(checkpoint.tensors, RotatedSource):
        return checkpoint
    config = replace(checkpoint.config, tie_word_embeddings=False)
    return replace(checkpoint, config=config, tensors=RotatedSource(checkpoint.tensors, config, seed))


def checkpoint_for(checkpoint: Checkpoint, recipe: Recipe | None) -> Checkpoint:
    """The float model that `recipe` quantizes: `checkpoint` itself, or rotated when the recipe says so.
    Whatever pairs a checkpoint with a quantized model (quantize, simulate, export, analyze) goes through here."""
    if recipe is None or recipe.rotation is None:
        return checkpoint
    return rotate_checkpoint(checkpoint)

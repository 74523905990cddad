"""The reference Llama in PyTorch, small enough to hold in your head.

It defines what correct means for every later stage (graph export, quantization, evaluation) and
is itself tested against Hugging Face's `LlamaForCausalLM`. The math lives in free functions.

Named taps (`layers.3.q`, `layers.3.scores`, ... see `TAPS`) mark every activation an accelerator graph
quantizes; by default they do nothing, and quantization uses them to observe ranges or fake-quantize.

Quantization also runs this model one decoder layer at a time (`build_block`, `Block.attention_step` and
`Block.mlp_step`, `Block.projection`), and calibration text is generated through a cache read only up to the
current position (`setup_cache(..., sliced=True)`): one attention, whoever runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapt.rope import rope_tables
from ..config import LlamaConfig
from ..loading import Checkpoint, TensorSource
from ..loading.names import ATTENTION_PROJECTIONS, LAYER_TENSORS, is_norm

Tap = Callable[[str, Tensor], Tensor]


def identity_tap(name: str, x: Tensor) -> Tensor:
    return x


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, heads, T, head_dim]; cos/sin: [T, head_dim] (frequencies repeated for both halves)."""
    return x * cos + rotate_half(x) * sin


def rope_cos_sin(config: LlamaConfig, positions: Tensor) -> tuple[Tensor, Tensor]:
    """[T, head_dim] cos and sin: the graphs' tables (`adapt.rope`), frequencies repeated for both halves."""
    cos, sin = (torch.from_numpy(t[0]) for t in rope_tables(config, positions.numpy()))
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


def repeat_kv(x: Tensor, group_size: int) -> Tensor:
    """[B, kv_heads, T, D] -> [B, kv_heads * group_size, T, D], so every query head has its K/V."""
    return x if group_size == 1 else x.repeat_interleave(group_size, dim=1)


def causal_mask(input_pos: Tensor, keys: int, dtype: torch.dtype) -> Tensor:
    """[T, keys] additive mask: query at position input_pos[i] sees keys 0..input_pos[i]."""
    allowed = torch.arange(keys)[None, :] <= input_pos[:, None]
    return torch.zeros(len(input_pos), keys, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


# Activation taps per layer, in order; the exported graph quantizes the same tensors under the same names.
# The residual stream itself is not one of them: only what each RMSNorm reads of it is ("attn_input", "mlp_input",
# "norm_input"). Its 16-bit step is coarse (rare massive activations set its range), and quantizing the stream
# would add that rounding up layer after layer; a norm's input is rounded once, where it is read.
LAYER_TAPS = ("attn_input", "input_norm", "q", "k", "v", "v_cache", "q_rope", "k_rope", "scores", "probs", "context",
              "o", "mlp_input", "post_attention_norm", "gate", "up", "silu", "gate_up", "down")
GLOBAL_TAPS = ("embed", "norm_input", "norm", "logits")


class KVCache(nn.Module):
    """Preallocated keys and values, written at `input_pos` (gpt-fast style).

    sliced: `update` returns the slots up to the last position written, not the whole buffer (decoding a
    long buffer step by step then costs what the positions so far cost; `Transformer.forward` masks to match).
    """

    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 sliced: bool = False):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)
        self.sliced = sliced

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        if self.sliced:
            end = int(input_pos.max()) + 1
            return self.k[:, :, :end], self.v[:, :, :end]
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        c = config
        self.config = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None
        self.tap: Tap = identity_tap
        self.prefix = ""

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor | None) -> Tensor:
        c, tap, p = self.config, self.tap, self.prefix
        b, t, _ = x.shape
        q = tap(p + "q", self.q_proj(x)).view(b, t, c.num_heads, c.head_dim).transpose(1, 2)
        k = tap(p + "k", self.k_proj(x)).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        # The cache holds values quantized on their own ("v_cache", 8 bits with --kv-bits 8): an accelerator's
        # projection then keeps 16-bit outputs like every other one.
        v = tap(p + "v_cache", tap(p + "v", self.v_proj(x))).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q, k = tap(p + "q_rope", apply_rope(q, cos, sin)), tap(p + "k_rope", apply_rope(k, cos, sin))
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        k, v = repeat_kv(k, c.group_size), repeat_kv(v, c.group_size)
        # Quantized before the mask is added: masked entries then stay exactly masked, however many there are.
        scores = tap(p + "scores", (q @ k.transpose(-1, -2)) * c.head_dim**-0.5) + mask
        probs = tap(p + "probs", F.softmax(scores.float(), dim=-1).to(q.dtype))
        out = tap(p + "context", probs @ v)
        return tap(p + "o", self.o_proj(out.transpose(1, 2).reshape(b, t, c.num_heads * c.head_dim)))


class FeedForward(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.tap: Tap = identity_tap
        self.prefix = ""

    def forward(self, x: Tensor) -> Tensor:
        tap, p = self.tap, self.prefix
        silu = tap(p + "silu", F.silu(tap(p + "gate", self.gate_proj(x))))
        gate_up = tap(p + "gate_up", silu * tap(p + "up", self.up_proj(x)))
        return tap(p + "down", self.down_proj(gate_up))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.input_norm = nn.Parameter(torch.ones(config.hidden_size))
        self.post_attention_norm = nn.Parameter(torch.ones(config.hidden_size))
        self.attention = Attention(config)
        self.mlp = FeedForward(config)
        self.tap: Tap = identity_tap
        self.prefix = ""

    def set_tap(self, tap: Tap, prefix: str) -> None:
        for module in (self, self.attention, self.mlp):
            module.tap, module.prefix = tap, prefix

    def projection(self, name: str) -> nn.Linear:
        """The projection `name` (q_proj, ..., down_proj) of this layer."""
        return getattr(self.attention if name in ATTENTION_PROJECTIONS else self.mlp, name)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor | None) -> Tensor:
        return self.mlp_step(self.attention_step(x, cos, sin, mask, input_pos))

    def attention_step(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor | None) -> Tensor:
        """The residual stream after attention: x + attention(input_norm(x)), the stream unquantized."""
        tap, p = self.tap, self.prefix
        h = tap(p + "input_norm", rms_norm(tap(p + "attn_input", x), self.input_norm, self.eps))
        return x + self.attention(h, cos, sin, mask, input_pos)

    def mlp_step(self, x: Tensor) -> Tensor:
        """The residual stream after the MLP: x + mlp(post_attention_norm(x)), x from `attention_step`."""
        tap, p = self.tap, self.prefix
        h = tap(p + "post_attention_norm", rms_norm(tap(p + "mlp_input", x), self.post_attention_norm, self.eps))
        return x + self.mlp(h)


class Transformer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.Parameter(torch.ones(config.hidden_size))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.max_len = 0
        self.sliced = False
        self.set_tap(identity_tap)

    def set_tap(self, tap: Tap) -> None:
        """Route every named activation through `tap` (observe ranges, fake-quantize); identity by default."""
        self.tap = tap
        for i, layer in enumerate(self.layers):
            layer.set_tap(tap, f"layers.{i}.")

    def setup_cache(self, max_len: int, batch: int = 1, sliced: bool = False) -> None:
        """Allocate a KV cache so `forward` can be called step by step with `input_pos`.

        sliced: attention reads the cache only up to the last position written (see `KVCache`); for decoding
        far fewer positions than `max_len` holds on average, as calibration text generation does.
        """
        c = self.config
        dtype = self.embed_tokens.weight.dtype
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch, max_len, c.num_kv_heads, c.head_dim, dtype, sliced)
        self.max_len = max_len
        self.sliced = sliced

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, rope_positions: Tensor | None = None) -> Tensor:
        """tokens: [B, T]. Without a cache, input_pos defaults to 0..T-1 and attention is causal.

        `rope_positions` (default `input_pos`): the positions RoPE rotates by, where they differ from the cache
        slots (a cache whose slot 0 holds the attention sink at position -1, as the exported graphs do).
        """
        t = tokens.shape[1]
        if input_pos is None:
            input_pos = torch.arange(t)
        keys = (int(input_pos.max()) + 1 if self.sliced else self.max_len) if self.max_len else t
        dtype = self.embed_tokens.weight.dtype
        mask = causal_mask(input_pos, keys, dtype)
        cos, sin = rope_cos_sin(self.config, input_pos if rope_positions is None else rope_positions)
        cos, sin = cos.to(dtype), sin.to(dtype)
        x = self.tap("embed", self.embed_tokens(tokens))
        cache_pos = input_pos if self.max_len else None
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache_pos)
        normed = rms_norm(self.tap("norm_input", x), self.norm, self.config.rms_norm_eps)
        return self.tap("logits", self.lm_head(self.tap("norm", normed)))


def _parameter_name(name: str) -> str:
    """Our tensor name -> the reference module's parameter name."""
    if name.startswith("layers."):
        _, i, tensor = name.split(".")
        group = "attention" if tensor in ATTENTION_PROJECTIONS else "mlp"
        suffix = "" if tensor.endswith("norm") else f"{group}.{tensor}.weight"
        return f"layers.{i}.{tensor}" if not suffix else f"layers.{i}.{suffix}"
    return {"embed_tokens": "embed_tokens.weight", "norm": "norm", "lm_head": "lm_head.weight"}[name]


def build_block(config: LlamaConfig, tensors: TensorSource, layer: int,
                weights: Mapping[str, np.ndarray] | None = None) -> Block:
    """Decoder layer `layer` alone, its weights read from `tensors` (or from `weights` where it has them:
    dequantized ones, say); quantization runs a model this way, one layer in memory at a time."""
    block = Block(config)
    for tensor in LAYER_TENSORS:
        name = f"layers.{layer}.{tensor}"
        value = torch.from_numpy(weights[name] if weights and name in weights else tensors.get(name))
        target = getattr(block, tensor) if is_norm(tensor) else block.projection(tensor).weight
        target.data = value
    return block.eval()


def build_reference(config: LlamaConfig, tensors: TensorSource, dtype: torch.dtype = torch.float32) -> Transformer:
    """Reference model with every weight read from `tensors` (on meta first: one copy in memory)."""
    with torch.device("meta"):
        model = Transformer(config)
    state = {_parameter_name(n): torch.from_numpy(tensors.get(n)).to(dtype) for n in tensors.names()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"reference model is missing weights: {missing[:5]}")
    return model.eval()


def load_reference(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32) -> Transformer:
    return build_reference(checkpoint.config, checkpoint.tensors, dtype)

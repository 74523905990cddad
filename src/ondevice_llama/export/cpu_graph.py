"""The CPU target: a dynamic-length decoder graph per part (and its float twin for prompts), fastest on ORT CPU.

Unlike the NPU graph it uses ONNX Runtime's fused contrib operators: `MatMulNBits` for block-wise
4/8-bit weights (fused Q/K/V and gate/up projections), `GroupQueryAttention` with rotary embedding
and an in-place KV cache, `SkipSimplifiedLayerNormalization` for residual + RMSNorm, and
`GatherBlockQuantized` so that tied embeddings share the LM head's quantized weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..adapt import layout
from ..adapt.rope import rope_tables
from ..config import LlamaConfig
from ..quantization import quantize_weight
from ..quantization.recipe import DEFAULT_BLOCK_SIZE
from .graph import CONTRIB, Graph
from .llama_graph import LayerTensors, PartSpec

F32 = np.float32
# MatMulNBits accuracy_level (its compute type): 4 quantizes activations to int8 (ONNX Runtime's fastest CPU
# kernels); 0 keeps them float
INT8_COMPUTE, FLOAT_COMPUTE = 4, 0
INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class CpuGraphOptions:
    context_length: int
    bits: int | None = 4  # None: float32 weights (plain MatMul)
    block_size: int = DEFAULT_BLOCK_SIZE
    mode: str = "affine"  # projections: symmetric | asymmetric | affine (see quantization.quantizers)
    head_bits: int | None = 8  # embedding and LM head, always symmetric
    accuracy_level: int = INT8_COMPUTE
    # down_proj reads silu(gate) * up, where LLM activation outliers concentrate; int8 there costs the most accuracy
    float_down_proj: bool = True
    all_logits: bool = False


def cpu_cache_shape(config: LlamaConfig, context_length: int) -> tuple[int, int, int, int]:
    """GroupQueryAttention's BNSH cache, as long as the context so past and present share one buffer."""
    return (1, config.num_kv_heads, context_length, config.head_dim)


def past_names(layer: int) -> tuple[str, str]:
    return layout.past_key_name(layer), layout.past_value_name(layer)


def present_names(layer: int) -> tuple[str, str]:
    return layout.present_key_name(layer), layout.present_value_name(layer)


@dataclass(frozen=True)
class PackedWeight:
    """A weight as MatMulNBits takes it, plus what the operator cannot express itself."""

    blocks: np.ndarray  # uint8 [N, K/block, block*bits/8]
    scales: np.ndarray  # float32 [N, K/block]
    zero_points: np.ndarray | None  # packed uint8 (asymmetric mode) or None (the operator's default 2^(bits-1))
    offsets: np.ndarray | None  # affine mode: float32 [K/block, N], added as (block sums of x) @ offsets


def pack_nbits(weight: np.ndarray, bits: int, block_size: int, mode: str) -> PackedWeight:
    """[N, K] float -> MatMulNBits layout. Codes are stored unsigned, two 4-bit codes per byte, low nibble
    first. Affine zero points are fractional, which MatMulNBits cannot take at full speed, so the operator
    runs with its default zero point 2^(bits-1) and the difference becomes a per-block offset:
    (q - zp) * s = (q - 2^(bits-1)) * s + (2^(bits-1) - zp) * s.
    """
    q = quantize_weight(weight, bits, block_size, mode)
    middle = 2 ** (bits - 1)
    codes = q.codes.astype(np.int16) + (middle if mode == "symmetric" else 0)
    blocks = codes.astype(np.uint8).reshape(weight.shape[0], -1, block_size)
    zero_points, offsets = None, None
    if mode == "affine":
        offsets = np.ascontiguousarray(((middle - q.zero_points) * q.scales).T.astype(np.float32))
    elif mode == "asymmetric":
        zero_points = q.zero_points
        if bits == 4:
            zero_points = np.pad(zero_points, ((0, 0), (0, zero_points.shape[1] % 2)))
            zero_points = zero_points[:, 0::2] | (zero_points[:, 1::2] << 4)
    if bits == 4:
        blocks = blocks[..., 0::2] | (blocks[..., 1::2] << 4)
    return PackedWeight(np.ascontiguousarray(blocks), q.scales, zero_points, offsets)


def _nibble_tables(head: PackedWeight) -> list[np.ndarray]:
    """An 8-bit packed table's high and low nibbles as 4-bit MatMulNBits tables, and zero points 0 for the low."""
    u = head.blocks
    high, low = u >> 4, u & 15
    zero = np.zeros((u.shape[0], (u.shape[1] + 1) // 2), np.uint8)
    return [np.ascontiguousarray(n[..., 0::2] | (n[..., 1::2] << 4)) for n in (high, low)] + [zero]


class CpuPartBuilder:
    def __init__(self, graph: Graph, config: LlamaConfig, tensors: LayerTensors, part: PartSpec,
                 options: CpuGraphOptions, on_layer: Callable[[], None] | None = None):
        self.g, self.c, self.t, self.part, self.o = graph, config, tensors, part, options
        self.on_layer = on_layer or (lambda: None)
        self.prefix = f"/part{part.index}"

    def make_linear(self, name: str, x: str, sources: tuple[str, ...], bits: int | None,
                    weight_name: str | None = None) -> str:
        """x @ W.T for W = the `sources` stacked by rows (fused projections), quantized when `bits` is set.

        Affine weights (see `pack_nbits`):
        x ─┬─ MatMulNBits(codes, scales) ─────────────────────────────── Add ─►
           └─ Reshape [.., K/block, block] ─ ReduceSum ─ MatMul(offsets) ─┘
        """
        g, o = self.g, self.o
        key = weight_name or "+".join(sources)

        def weight() -> np.ndarray:
            return np.concatenate([self.t.get(s) for s in sources], axis=0)

        if bits is None:
            return g.make_matmul(name, x, g.weight(f"{key}.weight", lambda: np.ascontiguousarray(weight().T)))
        rows, cols = sum(self.t.source.shape(s)[0] for s in sources), self.t.source.shape(sources[0])[1]
        packed: list[PackedWeight] = []

        def field(attr: str) -> Callable[[], np.ndarray]:
            def produce() -> np.ndarray:
                if not packed:
                    packed.append(pack_nbits(weight(), bits, o.block_size, o.mode))
                return getattr(packed[0], attr)
            return produce

        inputs = [x, g.weight(f"{key}.weight_q{bits}", field("blocks")), g.weight(f"{key}.scales", field("scales"))]
        if o.mode == "asymmetric":
            inputs.append(g.weight(f"{key}.zero_points", field("zero_points")))
        y = g.make_node("MatMulNBits", inputs, f"{name}/MatMulNBits", domain=CONTRIB, K=cols, N=rows,
                        bits=bits, block_size=o.block_size, accuracy_level=self._accuracy_level(name))
        if o.mode != "affine":
            return y
        blocks = g.make_reshape(f"{name}/blocks", x, [0, 0, cols // o.block_size, o.block_size])
        sums = g.make_node("ReduceSum", [blocks, g.constant([-1])], f"{name}/block_sums/ReduceSum", keepdims=0)
        offsets = g.make_matmul(f"{name}/offsets", sums, g.weight(f"{key}.offsets", field("offsets")))
        return g.make_add(name, y, offsets)

    def _accuracy_level(self, name: str) -> int:
        return FLOAT_COMPUTE if self.o.float_down_proj and name.endswith("/down_proj") else self.o.accuracy_level

    def make_embedding(self, ids: str) -> str:
        """Token embedding; quantized, and with tied weights read straight from the LM head's packed weight."""
        g, c, o = self.g, self.c, self.o
        name = f"{self.prefix}/embed_tokens"
        if o.head_bits is None:
            table = g.weight("embed_tokens.weight", lambda: self.t.get("embed_tokens"))
            return g.make_gather(name, table, ids)
        head = self._packed_table("lm_head" if c.tie_word_embeddings else "embed_tokens")
        blocks = c.hidden_size // o.block_size
        scales = g.make_reshape(f"{name}/scales", head[1], [c.vocab_size, blocks, 1])
        rows = g.make_node("GatherBlockQuantized", [head[0], ids, scales], f"{name}/GatherBlockQuantized",
                           domain=CONTRIB, gather_axis=0, quantize_axis=2, block_size=o.block_size, bits=o.head_bits)
        return g.make_reshape(name, rows, [0, 0, c.hidden_size])

    def _packed_table(self, name: str) -> list[str]:
        """Packed weight and scales of the LM head or the embedding, symmetric so GatherBlockQuantized can read
        them; a tied LM head is the embedding."""
        packed = self._lazy_table(name, lambda head: [head.blocks, head.scales])
        return [self.g.weight(f"{name}.weight_q{self.o.head_bits}", packed(0)),
                self.g.weight(f"{name}.scales", packed(1))]

    def _lazy_table(self, name: str, fields: Callable[[PackedWeight], list[np.ndarray]]
                    ) -> Callable[[int], Callable[[], np.ndarray]]:
        """Producers of `fields` of the packed table `name`, which is packed once, when the first one runs."""
        source = "embed_tokens" if name == "lm_head" and self.c.tie_word_embeddings else name
        arrays: list[np.ndarray] = []

        def produce(i: int) -> Callable[[], np.ndarray]:
            def run() -> np.ndarray:
                if not arrays:
                    arrays.extend(fields(pack_nbits(self.t.get(source), self.o.head_bits, self.o.block_size,
                                                    "symmetric")))
                return arrays[i]
            return run

        return produce

    def make_lm_head(self, h: str) -> str:
        """The quantized LM head. MatMulNBits has no float kernel for 8 bits (it dequantizes the whole table on
        every call, 0.1 s for the default model's), so in float an 8-bit head runs as the two 4-bit halves of its
        codes, which it has: with u = q + 128, q * s = 16 * ((u >> 4) - 8) * s + (u & 15) * s, exactly.

        h ─┬─ MatMulNBits(u >> 4, s; zero point 8) ── Mul 16 ── Add ─►
           └─ MatMulNBits(u & 15, s; zero point 0) ────────────┘
        """
        g, c, o = self.g, self.c, self.o
        name = f"{self.prefix}/lm_head"
        codes, scales = self._packed_table("lm_head")
        attrs = dict(domain=CONTRIB, K=c.hidden_size, N=c.vocab_size, block_size=o.block_size,
                     accuracy_level=o.accuracy_level)
        if o.head_bits != 8 or o.accuracy_level == INT8_COMPUTE:
            return g.make_node("MatMulNBits", [h, codes, scales], f"{name}/MatMulNBits", bits=o.head_bits, **attrs)
        halves = self._lazy_table("lm_head", _nibble_tables)
        high, low, zero = (g.weight(f"lm_head.weight_q8_{half}", halves(i))
                           for i, half in enumerate(("high4", "low4", "low4_zero_points")))
        high = g.make_node("MatMulNBits", [h, high, scales], f"{name}/high/MatMulNBits", bits=4, **attrs)
        low = g.make_node("MatMulNBits", [h, low, scales, zero], f"{name}/low/MatMulNBits", bits=4, **attrs)
        return g.make_add(name, g.make_mul(f"{name}/high", high, g.constant(16.0, F32)), low)

    def make_rms_norm(self, name: str, x: str, weight: str, skip: str | None) -> tuple[str, str]:
        """RMSNorm of x (+ skip, the residual): returns (normalized, the sum that is the new residual)."""
        g = self.g
        w = g.weight(f"{weight}.weight", lambda: self.t.get(weight))
        eps = self.c.rms_norm_eps
        if skip is None:
            out = g.make_node("SimplifiedLayerNormalization", [x, w], f"{name}/SimplifiedLayerNormalization",
                              axis=-1, epsilon=eps, stash_type=1)
            return out, x
        out, _, _, total = g.make_multi_output_node(
            "SkipSimplifiedLayerNormalization", [x, skip, w], f"{name}/SkipSimplifiedLayerNormalization",
            [f"{name}/output_0", "", "", f"{name}/output_3"], domain=CONTRIB, epsilon=eps)
        return out, total

    def make_attention(self, layer: int, h: str) -> str:
        """
        h ─ MatMulNBits(q|k|v fused) ─ GroupQueryAttention(rotary, past_key/past_value in place) ─ o_proj ─►
        """
        g, c = self.g, self.c
        name = f"{self.prefix}/layers.{layer}/attn"
        qkv = self.make_linear(f"{name}/qkv_proj", h, tuple(f"layers.{layer}.{p}" for p in ("q_proj", "k_proj",
                                                                                           "v_proj")), self.o.bits)
        past_key, past_value = past_names(layer)
        present_key, present_value = present_names(layer)
        out, _, _ = g.make_multi_output_node(
            "GroupQueryAttention", [qkv, "", "", past_key, past_value, "seqlens_k", "total_sequence_length",
                                    "cos_cache", "sin_cache"],
            f"{name}/GroupQueryAttention", [f"{name}/output_0", present_key, present_value], domain=CONTRIB,
            num_heads=c.num_heads, kv_num_heads=c.num_kv_heads, do_rotary=1, rotary_interleaved=0,
            scale=float(c.head_dim**-0.5))
        return self.make_linear(f"{name}/o_proj", out, (f"layers.{layer}.o_proj",), self.o.bits)

    def make_mlp(self, layer: int, h: str) -> str:
        """h ─ MatMulNBits(gate|up fused) ─ Split ─ SiLU(gate) * up ─ down_proj ─►"""
        g = self.g
        name = f"{self.prefix}/layers.{layer}/mlp"
        fused = self.make_linear(f"{name}/gate_up_proj", h, (f"layers.{layer}.gate_proj", f"layers.{layer}.up_proj"),
                                 self.o.bits)
        gate, up = g.make_split(f"{name}/gate_up", fused, 2, -1)
        silu = g.make_mul(f"{name}/silu", gate, g.make_sigmoid(f"{name}/silu", gate))
        return self.make_linear(f"{name}/down_proj", g.make_mul(f"{name}/gate_up", silu, up),
                                (f"layers.{layer}.down_proj",), self.o.bits)

    def build(self) -> None:
        g, c, o = self.g, self.c, self.o
        hidden = c.hidden_size
        if self.part.first:
            x = self.make_embedding(g.add_input("input_ids", np.int64, [1, "sequence"]))
        else:
            x = g.add_input("hidden_in", F32, [1, "sequence", hidden])
        g.add_input("seqlens_k", np.int32, [1])
        g.add_input("total_sequence_length", np.int32, [])
        cos, sin = rope_tables(c, np.arange(o.context_length))
        g.weight("cos_cache", lambda: cos[0])
        g.weight("sin_cache", lambda: sin[0])
        cache = cpu_cache_shape(c, o.context_length)
        for layer in self.part.layers:
            for past in past_names(layer):
                g.add_input(past, F32, cache)
        residual, pending = x, None
        for layer in self.part.layers:
            name = f"{self.prefix}/layers.{layer}"
            h, residual = self.make_rms_norm(f"{name}/input_norm", residual if pending is None else pending,
                                             f"layers.{layer}.input_norm", None if pending is None else residual)
            pending = self.make_attention(layer, h)
            h, residual = self.make_rms_norm(f"{name}/post_attention_norm", pending,
                                             f"layers.{layer}.post_attention_norm", residual)
            pending = self.make_mlp(layer, h)
            for present in present_names(layer):
                g.add_output(present, present, F32, cache)
            self.t.release()
            self.on_layer()
        if self.part.last:
            h, _ = self.make_rms_norm(f"{self.prefix}/norm", pending, "norm", residual)
            if not o.all_logits:
                h = g.make_node("Slice", [h, g.constant([-1]), g.constant([INT64_MAX]), g.constant([1])],
                                f"{self.prefix}/last_position/Slice")
            if o.head_bits is None:
                logits = self.make_linear(f"{self.prefix}/lm_head", h, ("embed_tokens" if c.tie_word_embeddings
                                                                        else "lm_head",), None, "lm_head")
            else:
                logits = self.make_lm_head(h)
            g.add_output(logits, "logits", F32, [1, "positions", c.vocab_size])
        else:
            g.add_output(g.make_add(f"{self.prefix}/hidden_out", pending, residual), "hidden_out", F32,
                         [1, "sequence", hidden])
        self.t.release()


def build_cpu_part_graph(graph: Graph, config: LlamaConfig, source, part: PartSpec, options: CpuGraphOptions,
                         on_layer: Callable[[], None] | None = None) -> Graph:
    CpuPartBuilder(graph, config, LayerTensors(source), part, options, on_layer).build()
    return graph

"""Build one part of the on-device Llama graph directly from weights, layer by layer.

The same builder makes the prompt processor (sequence length N) and the token generator (N = 1):
one path, two shapes. Graph inputs: token ids (first part) or the hidden state, RoPE cos/sin, the
additive attention mask and each layer's past K/V; outputs: the hidden state (or logits, last
part) and only the new K/V entries, which the host writes into its cache.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ..adapt import layout
from ..config import LlamaConfig
from ..loading import TensorSource
from ..quantization.encodings import ActivationEncoding
from ..quantization.quantizers import QuantizedWeight
from ..runtime.attention_sink import AttentionSink
from .graph import Graph, Int4

F32 = np.float32


@dataclass(frozen=True)
class PartSpec:
    """Which slice of the model a part holds."""

    index: int  # 0-based
    layers: range
    first: bool
    last: bool


@dataclass(frozen=True)
class GraphQuantization:
    """What the graph quantizes: weights by source tensor name, activations by reference tap name."""

    weights: Mapping[str, QuantizedWeight] = field(default_factory=dict)
    activations: Mapping[str, ActivationEncoding] = field(default_factory=dict)
    attention_sink: AttentionSink | None = None  # shipped beside the graphs, never run by them


@dataclass(frozen=True)
class GraphOptions:
    sequence_length: int
    context_length: int
    use_conv: bool = True
    all_logits: bool = False  # last part: logits for every position (evaluation) instead of the last
    quantization: GraphQuantization | None = None  # None: float weights and activations
    fp16_weights: bool = False  # float weights stored as float16 (Cast to float32 in the graph)


class LayerTensors:
    """Reads each source tensor (float or quantized) once per layer, however many heads slice it."""

    def __init__(self, source: TensorSource, quantized: Mapping[str, QuantizedWeight] | None = None):
        self.source = source
        self.quantized_source = quantized or {}
        self._cache: dict[str, np.ndarray | QuantizedWeight] = {}

    def get(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = self.source.get(name)
        return self._cache[name]

    def quantized(self, name: str) -> QuantizedWeight | None:
        if name not in self.quantized_source:
            return None
        key = f"{name}#quantized"
        if key not in self._cache:
            self._cache[key] = self.quantized_source[name]
        return self._cache[key]

    def release(self) -> None:
        self._cache.clear()


class PartGraphBuilder:
    """Emits one part's graph; holds only the graph, the options and the current layer's tensors."""

    def __init__(self, graph: Graph, config: LlamaConfig, tensors: LayerTensors, part: PartSpec,
                 options: GraphOptions, on_layer: Callable[[], None] | None = None):
        self.g, self.c, self.t, self.part, self.o = graph, config, tensors, part, options
        self.on_layer = on_layer or (lambda: None)
        self.n = options.sequence_length
        self.past = layout.past_capacity(options.context_length, options.sequence_length)

    # ---- layout: the residual stream is [1, n, H] (MatMul) or [1, H, 1, n] (Conv) -------------
    @property
    def channel_axis(self) -> int:
        return 1 if self.o.use_conv else 2

    def stream_from_rows(self, name: str, rows: str, width: int) -> str:
        """[1, n, width] -> stream layout."""
        if not self.o.use_conv:
            return rows
        t = self.g.make_transpose(name, rows, [0, 2, 1])
        return self.g.make_reshape(name, t, [1, width, 1, self.n])

    def rows_from_stream(self, name: str, x: str, width: int) -> str:
        """Stream layout -> [1, n, width]."""
        if not self.o.use_conv:
            return x
        r = self.g.make_reshape(name, x, [1, width, self.n])
        return self.g.make_transpose(name, r, [0, 2, 1])

    def make_weight(self, name: str, source: str, arrange: Callable[[np.ndarray], np.ndarray], out_axis: int,
                    head: int | None = None) -> str:
        """Weight `source` [out, in] (only `head`'s rows, for SHA) in the graph layout `arrange` gives.

        Float weights are initializers (float16 through Cast with --precision fp16); quantized ones are
        int4/int8 codes through DequantizeLinear, per output channel (`out_axis`) or block-wise along the
        input axis, and their encodings are recorded under the float tensor's name, as AIMET expects.
        """
        g = self.g
        rows = (lambda a: a) if head is None else (lambda a: layout.head_rows(a, head, self.c.head_dim))
        q = self.t.quantized(source)
        if q is None and not self.o.fp16_weights:
            return g.weight(name, lambda: arrange(rows(self.t.get(source))).astype(F32))
        if q is None:
            half = g.weight(f"{name}_fp16", lambda: arrange(rows(self.t.get(source))).astype(np.float16))
            return g.make_node("Cast", [half], f"{name}/Cast", output=name, to=1)

        def codes() -> np.ndarray | Int4:
            arranged = arrange(rows(q.codes))
            return Int4(arranged) if q.bits == 4 else arranged.astype(np.int8)

        scales = rows(q.scales)
        codes_name = g.weight(f"{name}_quantized", codes)
        if q.group_size == q.codes.shape[1]:  # per output channel
            scale = g.weight(f"{name}_scale", lambda: np.ascontiguousarray(scales[:, 0]))
            attrs = {"axis": out_axis}
        else:
            scale = g.weight(f"{name}_scale", lambda: arrange(scales).astype(F32))
            attrs = {"axis": 1 - out_axis, "block_size": q.group_size}
        if g.encodings is not None:
            g.encodings.add_param(name, scales, q.bits, None if "block_size" not in attrs else q.group_size)
        return g.make_dequantize(name, codes_name, scale, output=name, **attrs)

    def make_projection(self, name: str, x: str, source: str, head: int | None = None) -> str:
        """Linear `source` as 1x1 Conv or MatMul; `head` keeps only that head's output rows (SHA)."""
        arrange, out_axis = (layout.conv_weight, 0) if self.o.use_conv else (layout.matmul_weight, 1)
        weight = self.make_weight(f"{source}.weight" if head is None else f"{source}.head{head}.weight", source,
                                  arrange, out_axis, head)
        return self.g.make_conv(name, x, weight) if self.o.use_conv else self.g.make_matmul(name, x, weight)

    def qdq(self, tap: str, x: str) -> str:
        """Quantize-dequantize activation `x` with the encoding of reference tap `tap`, if it has one."""
        q = self.o.quantization
        encoding = q.activations.get(tap) if q is not None else None
        if encoding is None:
            return x
        g = self.g
        dtype = np.uint16 if encoding.bits == 16 else np.uint8
        scale, zero_point = g.constant(encoding.scale, F32), g.constant(encoding.zero_point, dtype)
        name = x[:x.rfind("/")] + "/qdq"
        if g.encodings is not None:
            g.encodings.add_activation(x, encoding)
        return g.make_dequantize(name, g.make_quantize(name, x, scale, zero_point), scale, zero_point)

    # ---- subgraphs ---------------------------------------------------------------------------
    def make_rms_norm(self, name: str, x: str, weight: str) -> str:
        """
        x ─┬─ Mul(x, x) ─ ReduceMean(channels) ─ Add(eps) ─ Sqrt ─┐
           └───────────────────────────────────────────────── Div ─ Mul(weight) ─►
        """
        g, axis = self.g, self.channel_axis
        shape = [1, -1, 1, 1] if self.o.use_conv else [-1]

        def produce() -> np.ndarray:
            return self.t.get(weight).astype(F32).reshape(shape)

        w = g.weight(f"{weight}.weight", produce)
        sq = g.make_mul(f"{name}/square", x, x)
        mean = g.make_reduce_mean(name, sq, axis)
        std = g.make_sqrt(name, g.make_add(f"{name}/eps", mean, g.constant(self.c.rms_norm_eps, F32)))
        return g.make_mul(f"{name}/weight", g.make_div(name, x, std), w)

    def make_rope(self, name: str, x: str, cos: str, sin: str) -> str:
        """
        x [1, n, d] ─ Slice ─► x1, x2 (halves)
        out = Concat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)     (Hugging Face's rotate-half)
        """
        g, half = self.g, self.c.head_dim // 2
        x1 = g.make_slice(f"{name}/x1", x, 0, half, -1)
        x2 = g.make_slice(f"{name}/x2", x, half, 2 * half, -1)
        first = g.make_sub(f"{name}/first", g.make_mul(f"{name}/x1cos", x1, cos),
                           g.make_mul(f"{name}/x2sin", x2, sin))
        second = g.make_add(f"{name}/second", g.make_mul(f"{name}/x2cos", x2, cos),
                            g.make_mul(f"{name}/x1sin", x1, sin))
        return g.make_concat(name, [first, second], -1)

    def make_kv_head(self, name: str, layer: int, x: str, head: int, cos: str, sin: str,
                     past_key: str, past_value: str) -> tuple[str, str, str, str]:
        """One key/value head: returns (all keys [1, d, C], all values [1, C, d], new key, new value).

        x ─ k_proj(head) ─ rope ─ Transpose ─► new key [1, d, n] ─ Concat(past key [1, d, C-n]) ─► keys
        x ─ v_proj(head) ────────────────────► new value [1, n, d] ─ Concat(past value) ─────────► values
        """
        g, d = self.g, self.c.head_dim
        tap = f"layers.{layer}."
        k = self.qdq(tap + "k", self.make_projection(f"{name}/k_proj", x, f"layers.{layer}.k_proj", head))
        k = self.make_rope(f"{name}/k_rope", self.rows_from_stream(f"{name}/k_rows", k, d), cos, sin)
        new_key = g.make_transpose(f"{name}/k_transposed", self.qdq(tap + "k_rope", k), [0, 2, 1])
        v = self.qdq(tap + "v", self.make_projection(f"{name}/v_proj", x, f"layers.{layer}.v_proj", head))
        new_value = self.rows_from_stream(f"{name}/v_rows", v, d)
        keys = g.make_concat(f"{name}/keys", [past_key, new_key], -1)
        values = g.make_concat(f"{name}/values", [past_value, new_value], 1)
        return keys, values, new_key, new_value

    def make_query_head(self, name: str, layer: int, x: str, head: int, cos: str, sin: str,
                        keys: str, values: str, mask: str) -> str:
        """
        x ─ q_proj(head) ─ rope ─ MatMul(keys) ─ Mul(1/sqrt(d)) ─ Add(mask) ─ Softmax ─ MatMul(values) ─►
                                                                             [1, n, C]          [1, n, d]
        """
        g, d = self.g, self.c.head_dim
        tap = f"layers.{layer}."
        q = self.qdq(tap + "q", self.make_projection(f"{name}/q_proj", x, f"layers.{layer}.q_proj", head))
        q = self.make_rope(f"{name}/q_rope", self.rows_from_stream(f"{name}/q_rows", q, d), cos, sin)
        scores = g.make_matmul(f"{name}/scores", self.qdq(tap + "q_rope", q), keys)
        scores = g.make_mul(f"{name}/scale", scores, g.constant(d**-0.5, F32))
        # Quantized before the mask: the static cache's empty slots stay exactly masked (as in the simulation).
        scores = g.make_add(f"{name}/mask", self.qdq(tap + "scores", scores), mask)
        probs = self.qdq(tap + "probs", g.make_softmax(name, scores))
        return self.qdq(tap + "context", g.make_matmul(f"{name}/context", probs, values))

    def make_attention(self, layer: int, x: str, cos: str, sin: str, mask: str) -> str:
        g, c = self.g, self.c
        name = f"/part{self.part.index}/layers.{layer}/attn"
        past_keys = g.make_split(f"{name}/past_key", layout.past_key_name(layer), c.num_kv_heads, 0)
        past_values = g.make_split(f"{name}/past_value", layout.past_value_name(layer), c.num_kv_heads, 0)
        kv, new_keys, new_values = [], [], []
        for h in range(c.num_kv_heads):
            keys, values, nk, nv = self.make_kv_head(f"{name}/kv_head{h}", layer, x, h, cos, sin,
                                                     past_keys[h], past_values[h])
            kv.append((keys, values))
            new_keys.append(nk)
            new_values.append(nv)
        contexts = [self.make_query_head(f"{name}/head{h}", layer, x, h, cos, sin, *kv[h // c.group_size], mask)
                    for h in range(c.num_heads)]
        self._emit_new_kv(layer, new_keys, new_values)
        width = c.num_heads * c.head_dim
        merged = self.stream_from_rows(f"{name}/merge", g.make_concat(f"{name}/merge", contexts, -1), width)
        return self.qdq(f"layers.{layer}.o", self.make_projection(f"{name}/o_proj", merged, f"layers.{layer}.o_proj"))

    def _emit_new_kv(self, layer: int, new_keys: list[str], new_values: list[str]) -> None:
        c, g, n = self.c, self.g, self.n
        name = f"/part{self.part.index}/layers.{layer}/attn"
        key = g.make_concat(f"{name}/new_key", new_keys, 0)
        value = g.make_concat(f"{name}/new_value", new_values, 0)
        g.add_output(key, layout.new_key_name(layer), F32, layout.key_cache_shape(c.num_kv_heads, c.head_dim, n))
        g.add_output(value, layout.new_value_name(layer), F32,
                     layout.value_cache_shape(c.num_kv_heads, c.head_dim, n))

    def make_mlp(self, layer: int, x: str) -> str:
        """x ─┬─ gate_proj ─ SiLU ─┐
              └─ up_proj ──────── Mul ─ down_proj ─►"""
        g, tap = self.g, f"layers.{layer}."
        name = f"/part{self.part.index}/layers.{layer}/mlp"
        gate = self.qdq(tap + "gate", self.make_projection(f"{name}/gate_proj", x, f"layers.{layer}.gate_proj"))
        silu = self.qdq(tap + "silu", g.make_mul(f"{name}/silu", gate, g.make_sigmoid(f"{name}/silu", gate)))
        up = self.qdq(tap + "up", self.make_projection(f"{name}/up_proj", x, f"layers.{layer}.up_proj"))
        gate_up = self.qdq(tap + "gate_up", g.make_mul(f"{name}/gate_up", silu, up))
        return self.qdq(tap + "down", self.make_projection(f"{name}/down_proj", gate_up, f"layers.{layer}.down_proj"))

    def make_layer(self, layer: int, x: str, cos: str, sin: str, mask: str) -> str:
        g, tap = self.g, f"layers.{layer}."
        name = f"/part{self.part.index}/layers.{layer}"
        h = self.qdq(tap + "input_norm", self.make_rms_norm(f"{name}/input_norm", x, f"layers.{layer}.input_norm"))
        x = self.qdq(tap + "attn_residual",
                     g.make_add(f"{name}/attn_residual", x, self.make_attention(layer, h, cos, sin, mask)))
        h = self.qdq(tap + "post_attention_norm",
                     self.make_rms_norm(f"{name}/post_attention_norm", x, f"layers.{layer}.post_attention_norm"))
        x = self.qdq(tap + "mlp_residual", g.make_add(f"{name}/mlp_residual", x, self.make_mlp(layer, h)))
        self.t.release()
        self.on_layer()
        return x

    # ---- the whole part ----------------------------------------------------------------------
    def build(self) -> None:
        g, c, n = self.g, self.c, self.n
        hidden = c.hidden_size
        if self.part.first:
            ids = g.add_input("input_ids", np.int32, [1, n])
            embed = self.make_weight("embed_tokens.weight", "embed_tokens", lambda a: a, 0)
            rows = self.qdq("embed", g.make_gather(f"/part{self.part.index}/embed_tokens", embed, ids))
        else:
            rows = g.add_input("hidden_in", F32, [1, n, hidden])
        half = c.head_dim // 2
        cos = g.add_input("position_cos", F32, [1, n, half])
        sin = g.add_input("position_sin", F32, [1, n, half])
        mask = g.add_input("attention_mask", F32, [1, n, self.past + n])
        for layer in self.part.layers:
            g.add_input(layout.past_key_name(layer), F32, layout.key_cache_shape(c.num_kv_heads, c.head_dim,
                                                                                 self.past))
            g.add_input(layout.past_value_name(layer), F32,
                        layout.value_cache_shape(c.num_kv_heads, c.head_dim, self.past))
        x = self.stream_from_rows(f"/part{self.part.index}/stream_in", rows, hidden)
        for layer in self.part.layers:
            x = self.make_layer(layer, x, cos, sin, mask)
        if self.part.last:
            self._make_head(x)
        else:
            out = self.rows_from_stream(f"/part{self.part.index}/stream_out", x, hidden)
            g.add_output(out, "hidden_out", F32, [1, n, hidden])

    def _head_weight(self, name: str) -> str:
        """The LM head weight; with tied embeddings in the same graph, a view of the embedding (stored once)."""
        c, g = self.c, self.g
        if c.tie_word_embeddings and self.part.first:
            embed = "embed_tokens.weight"
            if self.o.use_conv:
                return g.make_reshape(f"{name}/tied_weight", embed, [c.vocab_size, c.hidden_size, 1, 1])
            return g.make_transpose(f"{name}/tied_weight", embed, [1, 0])
        source = "embed_tokens" if c.tie_word_embeddings else "lm_head"
        arrange, out_axis = (layout.conv_weight, 0) if self.o.use_conv else (layout.matmul_weight, 1)
        return self.make_weight(f"lm_head.{'conv' if self.o.use_conv else 'matmul'}.weight", source, arrange,
                                out_axis)

    def _make_head(self, x: str) -> None:
        """Final norm and LM head, on the last position only unless all logits are asked for."""
        g, c = self.g, self.c
        name = f"/part{self.part.index}/lm_head"
        positions = self.n if self.o.all_logits else 1
        if positions < self.n:
            x = g.make_slice(f"{name}/last_position", x, self.n - 1, self.n, 3 if self.o.use_conv else 1)
        h = self.qdq("norm", self.make_rms_norm(f"/part{self.part.index}/norm", x, "norm"))
        w = self._head_weight(name)
        logits = self.qdq("logits", g.make_conv(name, h, w) if self.o.use_conv else g.make_matmul(name, h, w))
        if self.o.use_conv:
            logits = g.make_transpose(name, g.make_reshape(name, logits, [1, c.vocab_size, positions]), [0, 2, 1])
        g.add_output(logits, "logits", F32, [1, positions, c.vocab_size])
        self.t.release()


def build_part_graph(graph: Graph, config: LlamaConfig, source: TensorSource, part: PartSpec,
                     options: GraphOptions, on_layer: Callable[[], None] | None = None) -> Graph:
    quantized = options.quantization.weights if options.quantization is not None else None
    PartGraphBuilder(graph, config, LayerTensors(source, quantized), part, options, on_layer).build()
    return graph

"""Build one part of the on-device Llama graph directly from weights, layer by layer.

The same builder makes the prompt processor (sequence length N) and the token generator (N = 1):
one path, two shapes. Inputs and outputs follow `adapt.layout` (Genie's names and shapes): token ids
(first part) or the hidden state, RoPE cos/sin, the additive attention mask and each layer's past K/V;
outputs: the hidden state (or the logits of every position, last part) and only the new K/V entries,
which the host writes into its cache.

Quantized graphs are QDQ in the form QNN HTP takes whole: every weight reaches its MatMul/Conv through a
DequantizeLinear, every quantized operator reads DequantizeLinear outputs and feeds a QuantizeLinear, and
the KV cache crosses the graph boundary as integer codes (uint16, or uint8 with --kv-bits 8), as it lives
on the device. Where a tensor is quantized a second time with the encoding it already has (merged heads,
concatenated cache), the values do not change; it only completes the QDQ unit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ..adapt import layout
from ..attention_sink import AttentionSink
from ..config import LlamaConfig
from ..loading import TensorSource
from ..quantization.encodings import ActivationEncoding, norm_weight_encoding
from ..quantization.quantizers import QuantizedWeight, dequantize
from .graph import Graph, Int4

F32 = np.float32
# RMSNorm squares its input scaled by a power of two (exact in float32, so the result does not change) that brings
# the input's calibrated range near +-RMS_NORM_RANGE: accelerators that compute float operators in half precision
# (QNN HTP) then neither overflow on the squares of large residual values nor lose small ones below float16's range.
RMS_NORM_RANGE = 8.0


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
    attention_sink: AttentionSink | None = None  # baked into every layer's attention as constant K/V


@dataclass(frozen=True)
class GraphOptions:
    sequence_length: int
    context_length: int
    use_conv: bool = False
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
        quantization = options.quantization
        self.sink = quantization.attention_sink if quantization is not None else None

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

    # ---- quantization ------------------------------------------------------------------------
    def encoding(self, tap: str) -> ActivationEncoding | None:
        q = self.o.quantization
        return q.activations.get(tap) if q is not None else None

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
            # An explicit zero point: QNN HTP misreads per-channel int4 weights without one.
            zero = g.weight(f"{name}_zero_point", lambda: Int4(np.zeros(len(scales), np.int8)) if q.bits == 4
                            else np.zeros(len(scales), np.int8))
            inputs, attrs = [codes_name, scale, zero], {"axis": out_axis}
        else:
            scale = g.weight(f"{name}_scale", lambda: arrange(scales).astype(F32))
            inputs, attrs = [codes_name, scale], {"axis": 1 - out_axis, "block_size": q.group_size}
        if g.encodings is not None:
            g.encodings.add_param(name, scales, q.bits, None if "block_size" not in attrs else q.group_size)
        return g.make_node("DequantizeLinear", inputs, f"{name}/DequantizeLinear", output=name, **attrs)

    def make_projection(self, name: str, x: str, source: str, head: int | None = None) -> str:
        """Linear `source` as MatMul or 1x1 Conv; `head` keeps only that head's output rows (SHA)."""
        arrange, out_axis = (layout.conv_weight, 0) if self.o.use_conv else (layout.matmul_weight, 1)
        weight = self.make_weight(f"{source}.weight" if head is None else f"{source}.head{head}.weight", source,
                                  arrange, out_axis, head)
        return self.g.make_conv(name, x, weight) if self.o.use_conv else self.g.make_matmul(name, x, weight)

    def qdq(self, tap: str, x: str, name: str | None = None) -> str:
        """Quantize-dequantize activation `x` with the encoding of reference tap `tap`, if it has one; the nodes
        are named after x's producer unless `name` says otherwise."""
        encoding = self.encoding(tap)
        if encoding is None:
            return x
        g = self.g
        scale, zero_point = g.constant(encoding.scale, F32), g.constant(encoding.zero_point, encoding.dtype)
        name = name or x[:x.rfind("/")] + "/qdq"
        if g.encodings is not None:
            g.encodings.add_activation(x, encoding)
        return g.make_dequantize(name, g.make_quantize(name, x, scale, zero_point), scale, zero_point)

    def make_input(self, name: str, shape: tuple[int, ...], tap: str) -> str:
        """A float graph input, or (when `tap` is quantized) integer codes dequantized right away."""
        encoding = self.encoding(tap)
        if encoding is None:
            return self.g.add_input(name, F32, shape)
        self.g.add_input(name, encoding.dtype, shape, encoding)
        if self.g.encodings is not None:
            self.g.encodings.add_activation(name, encoding)
        return self.dequantize_codes(f"/inputs/{name}", name, encoding)

    def make_output(self, x: str, name: str, shape: tuple[int, ...], tap: str) -> None:
        """`x` as a float graph output, or (when `tap` is quantized) as its integer codes."""
        encoding = self.encoding(tap)
        if encoding is None:
            self.g.add_output(x, name, F32, shape)
            return
        g = self.g
        scale, zero_point = g.constant(encoding.scale, F32), g.constant(encoding.zero_point, encoding.dtype)
        g.make_node("QuantizeLinear", [x, scale, zero_point], f"/outputs/{name}/QuantizeLinear", output=name)
        g.add_output(name, name, encoding.dtype, shape, encoding)
        if g.encodings is not None:
            g.encodings.add_activation(x, encoding)

    def dequantize_codes(self, name: str, codes: str, encoding: ActivationEncoding, output: str | None = None) -> str:
        g = self.g
        scale, zero_point = g.constant(encoding.scale, F32), g.constant(encoding.zero_point, encoding.dtype)
        return g.make_dequantize(name, codes, scale, zero_point, output=output)

    def make_table(self, name: str, produce: Callable[[], np.ndarray], encoding: ActivationEncoding | None) -> str:
        """A constant held as codes of an activation encoding (the gather table, the baked sink), dequantized into
        `name`; listed among the part's parameter encodings. Without an encoding, a float constant."""
        if encoding is None:
            return self.g.weight(name, produce)
        codes = self.g.weight(f"{name}_quantized", produce)
        if self.g.encodings is not None:
            self.g.encodings.add_table(name, encoding)
        return self.dequantize_codes(name, codes, encoding, output=name)

    # ---- subgraphs ---------------------------------------------------------------------------
    def rms_norm_prescale(self, input_tap: str) -> float:
        """The power of two that brings the calibrated range of `input_tap` near +-RMS_NORM_RANGE (1 unquantized)."""
        encoding = self.encoding(input_tap)
        if encoding is None:
            return 1.0
        largest = max(abs(encoding.min), abs(encoding.max), 1e-30)
        return 2.0 ** int(np.clip(np.floor(np.log2(RMS_NORM_RANGE / largest)), -30, 30))

    def make_rms_norm(self, name: str, x: str, weight: str, input_tap: str) -> str:
        """RMSNorm with weight `weight`, whose output tap has the same name.

        Quantized output, MatMul layout: one SimplifiedLayerNormalization over 16-bit weight codes, which QNN HTP
        runs as its quantized RmsNorm (float ops would run there in float16, several output steps off; see
        `norm_weight_encoding`). Otherwise, in float (the weight still 16-bit when the output is quantized):

        x ─ Mul(2^k) ─┬─ Mul(itself) ─ ReduceMean(channels) ─ Add(eps 4^k) ─ Sqrt ─┐
                      └─────────────────────────────────────────────────────── Div ─ Mul(weight) ─►
        """
        g, axis = self.g, self.channel_axis
        shape = [1, -1, 1, 1] if self.o.use_conv else [-1]

        def produce() -> np.ndarray:
            return self.t.get(weight).astype(F32).reshape(shape)

        quantized = self.encoding(weight) is not None
        if quantized:
            encoding = norm_weight_encoding(self.t.get(weight))
            w = self.make_table(f"{weight}.weight", lambda: encoding.quantize(produce()), encoding)
        else:
            w = g.weight(f"{weight}.weight", produce)
        if quantized and not self.o.use_conv:
            # ONNX Runtime registers this op of its own in the default domain, where QNN's EP looks for it.
            return g.make_node("SimplifiedLayerNormalization", [x, w], name, axis=-1, epsilon=self.c.rms_norm_eps)
        prescale = self.rms_norm_prescale(input_tap)
        scaled = x if prescale == 1 else g.make_mul(f"{name}/prescale", x, g.constant(prescale, F32))
        sq = g.make_mul(f"{name}/square", scaled, scaled)
        mean = g.make_reduce_mean(name, sq, axis)
        eps = g.constant(self.c.rms_norm_eps * prescale**2, F32)
        std = g.make_sqrt(name, g.make_add(f"{name}/eps", mean, eps))
        return g.make_mul(f"{name}/weight", g.make_div(name, scaled, std), w)

    def make_read_norm(self, name: str, stream: str, weight: str, input_tap: str) -> str:
        """The RMSNorm `weight` of the residual stream, its input quantized with `input_tap` and its output with
        the tap named like the weight (the reference's `rms_norm(tap(input), ...)`)."""
        x = self.qdq(input_tap, stream, f"{name}/input/qdq")
        return self.qdq(weight, self.make_rms_norm(name, x, weight, input_tap))

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

    def make_past(self, layer: int) -> tuple[list[str], list[str]]:
        """Per key/value head, the cached keys [1, d, S] and values [1, S, d]: the attention sink (when baked in)
        followed by the C - N past slots of the graph inputs."""
        g, c, d, tap = self.g, self.c, self.c.head_dim, f"layers.{layer}."
        name = f"/part{self.part.index}/layers.{layer}/attn"
        keys = self.make_input(layout.past_key_name(layer), layout.key_cache_shape(c.num_kv_heads, d, self.past),
                               tap + "k_rope")
        values = self.make_input(layout.past_value_name(layer),
                                 layout.value_cache_shape(c.num_kv_heads, d, self.past), tap + "v_cache")
        keys = g.make_reshape(f"{name}/past_key", keys, [c.num_kv_heads, d, self.past])
        values = g.make_reshape(f"{name}/past_value", values, [c.num_kv_heads, self.past, d])
        if self.sink is not None:
            k_enc, v_enc = self.encoding(tap + "k_rope"), self.encoding(tap + "v_cache")
            sink_key, sink_value = self.sink.cache_entries(c, layer, k_enc, v_enc)
            key = self.make_table(f"attention_sink.{layer}.key", lambda: sink_key, k_enc)
            value = self.make_table(f"attention_sink.{layer}.value", lambda: sink_value, v_enc)
            keys = self.qdq(tap + "k_rope", g.make_concat(f"{name}/sink_key", [key, keys], -1))
            values = self.qdq(tap + "v_cache", g.make_concat(f"{name}/sink_value", [value, values], 1))
        return (g.make_split(f"{name}/past_key", keys, c.num_kv_heads, 0),
                g.make_split(f"{name}/past_value", values, c.num_kv_heads, 0))

    def make_kv_head(self, name: str, layer: int, x: str, head: int, cos: str, sin: str,
                     past_key: str, past_value: str) -> tuple[str, str, str, str]:
        """One key/value head: returns (all keys [1, d, S + n], all values [1, S + n, d], new key, new value).

        x ─ k_proj(head) ─ rope ─ Transpose ─► new key [1, d, n] ─ Concat(past key [1, d, S]) ─► keys
        x ─ v_proj(head) ────────────────────► new value [1, n, d] ─ Concat(past value) ───────► values
        """
        g, d = self.g, self.c.head_dim
        tap = f"layers.{layer}."
        k = self.qdq(tap + "k", self.make_projection(f"{name}/k_proj", x, f"layers.{layer}.k_proj", head))
        k = self.make_rope(f"{name}/k_rope", self.rows_from_stream(f"{name}/k_rows", k, d), cos, sin)
        new_key = g.make_transpose(f"{name}/k_transposed", self.qdq(tap + "k_rope", k), [0, 2, 1])
        v = self.qdq(tap + "v", self.make_projection(f"{name}/v_proj", x, f"layers.{layer}.v_proj", head))
        new_value = self.qdq(tap + "v_cache", self.rows_from_stream(f"{name}/v_rows", v, d))
        keys = self.qdq(tap + "k_rope", g.make_concat(f"{name}/keys", [past_key, new_key], -1))
        values = self.qdq(tap + "v_cache", g.make_concat(f"{name}/values", [past_value, new_value], 1))
        return keys, values, new_key, new_value

    def make_query_head(self, name: str, layer: int, x: str, head: int, cos: str, sin: str,
                        keys: str, values: str, mask: str) -> str:
        """
        x ─ q_proj(head) ─ rope ─ MatMul(keys) ─ Mul(1/sqrt(d)) ─ Add(mask) ─ Softmax ─ MatMul(values) ─►
                                                                             [1, n, S + n]      [1, n, d]

        The context is quantized only once the heads are merged (`make_attention`; one encoding, so the values
        are the same as quantizing each head): QNN HTP's quantized 16-bit x 16-bit MatMul lands up to hundreds
        of output steps from float, its float16 MatMul about twenty (`benchmarks/htp_float_ops.py`), and a
        MatMul whose output is not quantized right away runs in float.
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
        return g.make_matmul(f"{name}/context", probs, values)

    def make_attention(self, layer: int, x: str, cos: str, sin: str, mask: str) -> str:
        g, c = self.g, self.c
        name = f"/part{self.part.index}/layers.{layer}/attn"
        past_keys, past_values = self.make_past(layer)
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
        # The heads' contexts share one encoding, applied once they are merged: it makes o_proj a whole QDQ unit
        # (quantized input, weight and output), which QNN HTP needs to take it.
        merged = self.qdq(f"layers.{layer}.context", merged)
        return self.qdq(f"layers.{layer}.o", self.make_projection(f"{name}/o_proj", merged, f"layers.{layer}.o_proj"))

    def _emit_new_kv(self, layer: int, new_keys: list[str], new_values: list[str]) -> None:
        c, g, n, d = self.c, self.g, self.n, self.c.head_dim
        name, tap = f"/part{self.part.index}/layers.{layer}/attn", f"layers.{layer}."
        key_shape = layout.key_cache_shape(c.num_kv_heads, d, n)
        value_shape = layout.value_cache_shape(c.num_kv_heads, d, n)
        key = g.make_reshape(f"{name}/new_key", g.make_concat(f"{name}/new_key", new_keys, 0), key_shape)
        value = g.make_reshape(f"{name}/new_value", g.make_concat(f"{name}/new_value", new_values, 0), value_shape)
        self.make_output(key, layout.new_key_name(layer), key_shape, tap + "k_rope")
        self.make_output(value, layout.new_value_name(layer), value_shape, tap + "v_cache")

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
        # The residual stream stays float (float16 on QNN HTP); each norm quantizes what it reads of it.
        h = self.make_read_norm(f"{name}/input_norm", x, f"layers.{layer}.input_norm", tap + "attn_input")
        x = g.make_add(f"{name}/attn_residual", x, self.make_attention(layer, h, cos, sin, mask))
        h = self.make_read_norm(f"{name}/post_attention_norm", x, f"layers.{layer}.post_attention_norm",
                                tap + "mlp_input")
        x = g.make_add(f"{name}/mlp_residual", x, self.make_mlp(layer, h))
        self.t.release()
        self.on_layer()
        return x

    # ---- the whole part ----------------------------------------------------------------------
    def make_embedding(self, ids: str) -> str:
        """Rows of the embedding for `ids` [1, n] -> [1, n, H].

        Quantized graphs gather from the table as the next operator sees it: the (quantized) embedding already
        quantized with the `embed` activation encoding, a per-tensor uint16 table. That is what the simulated
        model computes (quantizing commutes with a lookup), and what QNN HTP can gather.
        """
        g, name = self.g, f"/part{self.part.index}/embed_tokens"
        encoding = self.encoding("embed")
        if encoding is None:
            table = self.make_weight("embed_tokens.weight", "embed_tokens", lambda a: a, 0)
            return g.make_gather(name, table, ids)

        def codes() -> np.ndarray:
            q = self.t.quantized("embed_tokens")
            weight = self.t.get("embed_tokens") if q is None else dequantize(q.codes, q.scales, None, q.group_size)
            return encoding.quantize(weight)

        table = self.make_table("embed_tokens.table", codes, encoding)
        return self.qdq("embed", g.make_gather(name, table, ids))

    def build(self) -> None:
        g, c, n = self.g, self.c, self.n
        hidden, half = c.hidden_size, c.head_dim // 2
        if self.part.first:
            rows = self.make_embedding(g.add_input(layout.INPUT_IDS, np.int32, [1, n]))
        else:
            rows = g.add_input(layout.hidden_state_name(self.part.layers.start), F32, [1, n, hidden])
        rope_shape = layout.rope_input_shape(n, c.head_dim)
        cos = g.make_reshape("/inputs/cos", g.add_input(layout.POSITION_COS, F32, rope_shape), [1, n, half])
        sin = g.make_reshape("/inputs/sin", g.add_input(layout.POSITION_SIN, F32, rope_shape), [1, n, half])
        mask = g.make_reshape("/inputs/mask", g.add_input(layout.ATTENTION_MASK, F32,
                                                          layout.mask_shape(n, self.o.context_length)),
                              [1, n, self.o.context_length])
        if self.sink is not None:  # every position attends to the baked sink: one more column, always open
            mask = g.make_concat("/inputs/sink_mask", [g.constant(np.zeros((1, n, 1)), F32), mask], -1)
        x = self.stream_from_rows(f"/part{self.part.index}/stream_in", rows, hidden)
        for layer in self.part.layers:
            x = self.make_layer(layer, x, cos, sin, mask)
        if self.part.last:
            self._make_head(x)
        else:
            out = self.rows_from_stream(f"/part{self.part.index}/stream_out", x, hidden)
            g.add_output(out, layout.hidden_state_name(self.part.layers.stop), F32, [1, n, hidden])

    def _head_weight(self, name: str) -> str:
        """The LM head weight. A tied float embedding in the same graph is reused as a view (stored once); quantized
        graphs store the head's codes in the projection layout, beside the gather table."""
        c, g = self.c, self.g
        if c.tie_word_embeddings and self.part.first and self.encoding("embed") is None \
                and self.t.quantized("embed_tokens") is None:
            embed = "embed_tokens.weight"
            if self.o.use_conv:
                return g.make_reshape(f"{name}/tied_weight", embed, [c.vocab_size, c.hidden_size, 1, 1])
            return g.make_transpose(f"{name}/tied_weight", embed, [1, 0])
        source = "embed_tokens" if c.tie_word_embeddings else "lm_head"
        arrange, out_axis = (layout.conv_weight, 0) if self.o.use_conv else (layout.matmul_weight, 1)
        return self.make_weight(f"lm_head.{'conv' if self.o.use_conv else 'matmul'}.weight", source, arrange,
                                out_axis)

    def _make_head(self, x: str) -> None:
        """Final norm and LM head on every position: Genie reads the last real row of a right-padded chunk."""
        g, c, n = self.g, self.c, self.n
        name = f"/part{self.part.index}/lm_head"
        h = self.make_read_norm(f"/part{self.part.index}/norm", x, "norm", "norm_input")
        w = self._head_weight(name)
        logits = self.qdq("logits", g.make_conv(name, h, w) if self.o.use_conv else g.make_matmul(name, h, w))
        if self.o.use_conv:
            logits = g.make_transpose(name, g.make_reshape(name, logits, [1, c.vocab_size, n]), [0, 2, 1])
        g.add_output(logits, layout.LOGITS, F32, [1, n, c.vocab_size])
        self.t.release()


def build_part_graph(graph: Graph, config: LlamaConfig, source: TensorSource, part: PartSpec,
                     options: GraphOptions, on_layer: Callable[[], None] | None = None) -> Graph:
    quantized = options.quantization.weights if options.quantization is not None else None
    PartGraphBuilder(graph, config, LayerTensors(source, quantized), part, options, on_layer).build()
    return graph


__all__ = ["GraphOptions", "GraphQuantization", "LayerTensors", "PartGraphBuilder", "PartSpec",
           "build_part_graph"]

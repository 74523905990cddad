"""A small ONNX graph under construction, and the external weight file its graphs share.

Each `make_<op>` emits exactly one node and returns its output name. Node names are paths such as
`/part0/layers.3/attn/head5/q_proj/Conv`. Weights go straight to disk as they are added, so a graph
never holds more than the tensor being written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..quantization.encodings import ActivationEncoding
from ..quantization.quantizers import pack_int4
from .encodings_file import EncodingsFile

OPSET = 21  # int4 and uint16 in QuantizeLinear/DequantizeLinear, block-wise DequantizeLinear
CONTRIB = "com.microsoft"  # ONNX Runtime's contrib operators (MatMulNBits, GroupQueryAttention, ...)
PAGE = 4096  # large tensors start on a page boundary so a runtime can memory-map them

ONNX_DTYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
               np.dtype(np.int8): TensorProto.INT8, np.dtype(np.uint8): TensorProto.UINT8,
               np.dtype(np.uint16): TensorProto.UINT16}


class Int4:
    """Signed 4-bit codes (held as int8) to be stored packed as an ONNX INT4 tensor."""

    def __init__(self, codes: np.ndarray):
        self.codes = codes


class WeightFile:
    """One external-data file shared by every graph of a part: a tensor is written once, by name."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._written: dict[str, tuple[int, int, int, tuple[int, ...]]] = {}

    def tensor(self, name: str, produce: Callable[[], np.ndarray | Int4]) -> TensorProto:
        """A TensorProto pointing into this file; `produce` runs only if `name` is not written yet."""
        if name not in self._written:
            value = produce()
            if isinstance(value, Int4):
                data, data_type, shape = pack_int4(value.codes), TensorProto.INT4, value.codes.shape
            else:
                value = np.ascontiguousarray(value)
                data, data_type, shape = value, ONNX_DTYPES[value.dtype], value.shape
            offset = self._file.tell()
            align = PAGE if data.nbytes >= PAGE else 64
            pad = -offset % align
            self._file.write(b"\0" * pad)
            self._file.write(data.tobytes())
            self._written[name] = (offset + pad, data.nbytes, data_type, shape)
        offset, length, data_type, shape = self._written[name]
        proto = TensorProto(name=name, data_type=data_type, dims=shape)
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", offset), ("length", length)):
            proto.external_data.add(key=key, value=str(value))
        return proto

    @property
    def nbytes(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()


class Graph:
    """Nodes, inputs, outputs and initializers of one ONNX graph."""

    def __init__(self, name: str, weights: WeightFile, encodings: EncodingsFile | None = None):
        self.name = name
        self.weights = weights
        self.encodings = encodings  # where quantized tensors are recorded (shared by a part's graphs)
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: dict[str, TensorProto] = {}
        self.io_encodings: dict[str, ActivationEncoding] = {}  # graph inputs and outputs that are integer codes
        self._constants: dict[tuple, str] = {}

    # ---- graph interface -------------------------------------------------------------------
    def add_input(self, name: str, dtype: np.dtype, shape: Sequence[int],
                  encoding: ActivationEncoding | None = None) -> str:
        """A graph input; `encoding` says how integer codes map to values (recorded in the manifest)."""
        self.inputs.append(helper.make_tensor_value_info(name, ONNX_DTYPES[np.dtype(dtype)], list(shape)))
        if encoding is not None:
            self.io_encodings[name] = encoding
        return name

    def add_output(self, source: str, name: str, dtype: np.dtype, shape: Sequence[int],
                   encoding: ActivationEncoding | None = None) -> str:
        """Expose `source` as graph output `name` (through Identity when the names differ)."""
        if source != name:
            self.make_node("Identity", [source], f"/outputs/{name}/Identity", output=name)
        self.outputs.append(helper.make_tensor_value_info(name, ONNX_DTYPES[np.dtype(dtype)], list(shape)))
        if encoding is not None:
            self.io_encodings[name] = encoding
        return name

    def weight(self, name: str, produce: Callable[[], np.ndarray | Int4]) -> str:
        """A weight initializer stored in the shared external file."""
        if name not in self.initializers:
            self.initializers[name] = self.weights.tensor(name, produce)
        return name

    def constant(self, values: Sequence[float] | Sequence[int] | float | int, dtype: type = np.int64) -> str:
        """A small inline constant, reused by value (shapes, axes, scales)."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = f"/constants/{array.dtype.name}_{len(self._constants)}"
            self.initializers[name] = numpy_helper.from_array(array, name)
            self._constants[key] = name
        return self._constants[key]

    def make_node(self, op: str, inputs: Sequence[str], name: str, output: str | None = None,
                  domain: str = "", **attrs) -> str:
        return self.make_multi_output_node(op, inputs, name, [output or f"{name}/output_0"], domain, **attrs)[0]

    def make_multi_output_node(self, op: str, inputs: Sequence[str], name: str, outputs: Sequence[str],
                               domain: str = "", **attrs) -> list[str]:
        """A node with several outputs; an empty name skips that output."""
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, domain=domain or None,
                                           **attrs))
        return list(outputs)

    def to_model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  list(self.initializers.values()))
        opsets = [helper.make_opsetid("", OPSET)]
        if any(node.domain == CONTRIB for node in self.nodes):
            opsets.append(helper.make_opsetid(CONTRIB, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="ondevice-llama")
        model.ir_version = 8
        return model

    # ---- one op each -----------------------------------------------------------------------
    def make_matmul(self, name: str, a: str, b: str) -> str:
        return self.make_node("MatMul", [a, b], f"{name}/MatMul")

    def make_conv(self, name: str, x: str, w: str) -> str:
        return self.make_node("Conv", [x, w], f"{name}/Conv", kernel_shape=[1, 1])

    def make_gather(self, name: str, data: str, indices: str, axis: int = 0) -> str:
        return self.make_node("Gather", [data, indices], f"{name}/Gather", axis=axis)

    def make_add(self, name: str, a: str, b: str) -> str:
        return self.make_node("Add", [a, b], f"{name}/Add")

    def make_sub(self, name: str, a: str, b: str) -> str:
        return self.make_node("Sub", [a, b], f"{name}/Sub")

    def make_mul(self, name: str, a: str, b: str) -> str:
        return self.make_node("Mul", [a, b], f"{name}/Mul")

    def make_div(self, name: str, a: str, b: str) -> str:
        return self.make_node("Div", [a, b], f"{name}/Div")

    def make_sqrt(self, name: str, x: str) -> str:
        return self.make_node("Sqrt", [x], f"{name}/Sqrt")

    def make_sigmoid(self, name: str, x: str) -> str:
        return self.make_node("Sigmoid", [x], f"{name}/Sigmoid")

    def make_softmax(self, name: str, x: str, axis: int = -1) -> str:
        return self.make_node("Softmax", [x], f"{name}/Softmax", axis=axis)

    def make_reduce_mean(self, name: str, x: str, axis: int) -> str:
        return self.make_node("ReduceMean", [x, self.constant([axis])], f"{name}/ReduceMean", keepdims=1)

    def make_transpose(self, name: str, x: str, perm: Sequence[int]) -> str:
        return self.make_node("Transpose", [x], f"{name}/Transpose", perm=list(perm))

    def make_reshape(self, name: str, x: str, shape: Sequence[int]) -> str:
        return self.make_node("Reshape", [x, self.constant(shape)], f"{name}/Reshape")

    def make_slice(self, name: str, x: str, start: int, end: int, axis: int) -> str:
        inputs = [x, self.constant([start]), self.constant([end]), self.constant([axis])]
        return self.make_node("Slice", inputs, f"{name}/Slice")

    def make_concat(self, name: str, parts: Sequence[str], axis: int) -> str:
        return self.make_node("Concat", list(parts), f"{name}/Concat", axis=axis)

    def make_split(self, name: str, x: str, pieces: int, axis: int) -> list[str]:
        outs = [f"{name}/Split/output_{i}" for i in range(pieces)]
        return self.make_multi_output_node("Split", [x], f"{name}/Split", outs, axis=axis, num_outputs=pieces)

    def make_quantize(self, name: str, x: str, scale: str, zero_point: str) -> str:
        return self.make_node("QuantizeLinear", [x, scale, zero_point], f"{name}/QuantizeLinear")

    def make_dequantize(self, name: str, q: str, scale: str, zero_point: str | None = None,
                        output: str | None = None, **attrs) -> str:
        inputs = [q, scale] + ([zero_point] if zero_point else [])
        return self.make_node("DequantizeLinear", inputs, f"{name}/DequantizeLinear", output=output, **attrs)

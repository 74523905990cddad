"""The encodings file of a part: every quantized tensor of its graphs, in AIMET's encoding format 1.0.0.

QNN's converters (`qnn-onnx-converter --quantization_overrides`) and AIMET read it. Entries are keyed by
the float tensor's name in the graph (the input of a QuantizeLinear, the output of a weight's
DequantizeLinear). Activations are asymmetric per tensor; weights symmetric per output channel
(PER_CHANNEL) or per block of `block_size` inputs (PER_BLOCK, scales row-major over [out, blocks]); constants
held as codes of an activation encoding (the embedding's gather table, the baked attention sink) are asymmetric
per tensor. Quantized graph inputs (the KV cache) are listed with the activations.
A symmetric weight's offset is the same for every channel or block, so it is written once
(`"offset": [-2^(bw-1)]`) instead of repeated per scale.

Block-wise scales of a 7B model number in the hundreds of millions, so weight entries are streamed to
disk as the graph builder emits them; only activation entries are held until the end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ..quantization.encodings import ActivationEncoding

VERSION = "1.0.0"


class EncodingsFile:
    """Collects a part's encodings (each tensor once, however many graphs use it) and writes the file."""

    def __init__(self, path: Path):
        self.path = path
        self.activations: dict[str, ActivationEncoding] = {}
        self._params_path = path.with_name(path.name + ".params")
        self._params = open(self._params_path, "w")  # noqa: SIM115 - closed by close()
        self._param_names: set[str] = set()

    def add_activation(self, name: str, encoding: ActivationEncoding) -> None:
        self.activations[name] = encoding

    def add_param(self, name: str, scales: np.ndarray, bits: int, block_size: int | None) -> None:
        """Symmetric weight codes with `scales` [out, blocks] (blocks = 1 and block_size None per channel)."""
        if name in self._param_names:
            return
        self._param_names.add(name)
        head = {"name": name, "dtype": "INT", "enc_type": "PER_BLOCK" if block_size else "PER_CHANNEL",
                "bw": bits, "is_sym": True}
        if block_size:
            head["block_size"] = block_size
        text = json.dumps(head)[:-1]
        values = scales.reshape(-1).tolist()
        scale_list = ("%.9g," * len(values) % tuple(values))[:-1]  # %-formatting: the fastest in pure Python
        separator = ",\n" if len(self._param_names) > 1 else ""
        self._params.write(f'{separator}{text}, "offset": [{-(2 ** (bits - 1))}], "scale": [{scale_list}]}}')

    def add_table(self, name: str, encoding: ActivationEncoding) -> None:
        """A constant stored as codes of an activation encoding (asymmetric, per tensor)."""
        if name in self._param_names:
            return
        self._param_names.add(name)
        entry = {"name": name, "dtype": "INT", "enc_type": "PER_TENSOR", "bw": encoding.bits, "is_sym": False,
                 "offset": [-encoding.zero_point], "scale": [encoding.scale]}
        separator = ",\n" if len(self._param_names) > 1 else ""
        self._params.write(separator + json.dumps(entry))

    def close(self) -> None:
        """Write the whole file (activations, then the streamed weight entries) and remove the scratch file."""
        self._params.close()
        activations = [{"name": name, "dtype": "INT", "enc_type": "PER_TENSOR", "bw": e.bits, "is_sym": False,
                        "scale": [e.scale], "offset": [-e.zero_point]} for name, e in self.activations.items()]
        with open(self.path, "w") as f:
            f.write(f'{{"version": "{VERSION}",\n"activation_encodings": ')
            f.write(json.dumps(activations, indent=1))
            f.write(',\n"param_encodings": [\n')
            with open(self._params_path) as params:
                shutil.copyfileobj(params, f)
            f.write("\n]}\n")
        self._params_path.unlink()

    def discard(self) -> None:
        self._params.close()
        self._params_path.unlink(missing_ok=True)

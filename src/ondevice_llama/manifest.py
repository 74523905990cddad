"""The manifest of an exported folder: the contract between the exporter and the torch-free runtime.

It is versioned and checked on read; a problem is reported in one line naming the file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import LlamaConfig, SpecialTokens

MANIFEST_FILE = "manifest.json"
FORMAT = "ondevice-llama-export"
FORMAT_VERSION = 2  # 2: Genie's graph I/O names and shapes, integer KV codes, the attention sink inside the graphs
GRAPH_KINDS = ("prompt_processor", "token_generator")


class ManifestError(ValueError):
    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int32, uint16, ...
    shape: tuple[int, ...]
    scale: float | None = None  # integer codes (a quantized KV cache): value = (code - zero_point) * scale
    zero_point: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(data["name"], data["dtype"], tuple(data["shape"]), data.get("scale"), data.get("zero_point"))


@dataclass(frozen=True)
class GraphManifest:
    file: str
    sequence_length: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphManifest:
        return cls(data["file"], int(data["sequence_length"]),
                   tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
                   tuple(TensorSpec.from_dict(t) for t in data["outputs"]))


@dataclass(frozen=True)
class PartManifest:
    index: int  # 0-based; files are numbered from 1
    first_layer: int
    end_layer: int  # exclusive
    weights_file: str
    weights_sha256: str
    graphs: dict[str, GraphManifest]
    encodings_file: str | None = None  # AIMET/QNN encodings of the part's quantized tensors

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.end_layer)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PartManifest:
        graphs = {kind: GraphManifest.from_dict(g) for kind, g in data["graphs"].items()}
        return cls(int(data["index"]), int(data["first_layer"]), int(data["end_layer"]),
                   data["weights_file"], data["weights_sha256"], graphs, data.get("encodings_file"))


@dataclass(frozen=True)
class Manifest:
    model_name: str
    source: str
    config: LlamaConfig
    special_tokens: SpecialTokens
    chat_template: str | None
    precision: str
    target: str
    use_conv: bool
    sequence_length: int
    context_length: int
    all_logits: bool
    parts: tuple[PartManifest, ...]
    tokenizer_file: str = "tokenizer.json"
    extra: dict[str, Any] = field(default_factory=dict)  # measurements and notes, free-form
    attention_sink_file: str | None = None  # quantized exports: position 0 precomputed (attention_sink.py)
    compiled: dict[str, Any] | None = None  # a compiled folder: the SoC, QNN version and context binaries (compile)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["config"] = self.config.to_dict()
        data["special_tokens"] = self.special_tokens.to_dict()
        return {"format": FORMAT, "format_version": FORMAT_VERSION} | data

    def save(self, folder: Path) -> Path:
        path = folder / MANIFEST_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return cls(
            model_name=data["model_name"], source=data["source"],
            config=LlamaConfig.from_dict(data["config"]),
            special_tokens=SpecialTokens.from_dict(data["special_tokens"]),
            chat_template=data["chat_template"], precision=data["precision"], target=data["target"],
            use_conv=bool(data["use_conv"]), sequence_length=int(data["sequence_length"]),
            context_length=int(data["context_length"]), all_logits=bool(data["all_logits"]),
            parts=tuple(PartManifest.from_dict(p) for p in data["parts"]),
            tokenizer_file=data.get("tokenizer_file", "tokenizer.json"), extra=data.get("extra", {}),
            attention_sink_file=data.get("attention_sink_file"), compiled=data.get("compiled"),
        )


def load_manifest(folder: Path | str) -> Manifest:
    """Read and check `folder/manifest.json`, and that every file it names is there."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.exists():
        raise ManifestError(folder, f"no {MANIFEST_FILE}: not an exported model folder "
                                    "(create one with `ondevice-llama export`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(path, f"invalid JSON ({e})") from None
    if data.get("format") != FORMAT:
        raise ManifestError(path, f"not an ondevice-llama manifest (format={data.get('format')!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise ManifestError(path, f"format version {data.get('format_version')} is not supported "
                                  f"(this version reads {FORMAT_VERSION}); export the model again")
    try:
        manifest = Manifest.from_dict(data)
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(path, f"malformed manifest ({type(e).__name__}: {e})") from None
    files = [manifest.tokenizer_file] + [p.weights_file for p in manifest.parts]
    files += [g.file for p in manifest.parts for g in p.graphs.values()]
    files += [p.encodings_file for p in manifest.parts if p.encodings_file]
    for file in files:
        if not (folder / file).exists():
            raise ManifestError(path, f"lists {file}, which is missing from the folder")
    return manifest

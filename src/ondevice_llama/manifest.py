"""The manifest of an exported folder: the contract between the exporter and the torch-free runtime.

It is versioned and checked on read; a problem is reported in one line naming the file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .config import LlamaConfig, SpecialTokens, read_number
from .files import FileError, read_json_object, sha256_file, sha256_matches

MANIFEST_FILE = "manifest.json"
FORMAT = "ondevice-llama-export"
# 2: Genie's graph I/O names and shapes, integer KV codes, the attention sink inside the graphs; every file's size
# and sha256
FORMAT_VERSION = 2
PROMPT_PROCESSOR, TOKEN_GENERATOR = "prompt_processor", "token_generator"
GRAPH_KINDS = (PROMPT_PROCESSOR, TOKEN_GENERATOR)  # the npu target's, in the order a part runs and links them
DECODER, PREFILL = "decoder", "prefill"
# cpu: a decoder for everything, and a prefill graph for prompts where they compute at another accuracy level
TARGET_GRAPHS = {"npu": (set(GRAPH_KINDS),), "cpu": ({DECODER}, {DECODER, PREFILL})}


class ManifestError(FileError):
    """An exported folder that cannot be used; the message starts with the file (or folder) at fault."""


def _typed(data: dict[str, Any], key: str, kind: Any, *default: Any) -> Any:
    """`data[key]` (or `default`), which must be of type `kind` (a type or a union): "false" is not False."""
    value = data.get(key, *default) if default else data[key]
    if not isinstance(value, kind):
        raise ValueError(f"{key} has the wrong type ({type(value).__name__})")
    return value


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
        return cls(read_number(data, "index", int), read_number(data, "first_layer", int),
                   read_number(data, "end_layer", int), _typed(data, "weights_file", str),
                   _typed(data, "weights_sha256", str), graphs, _typed(data, "encodings_file", str | None, None))


@dataclass(frozen=True)
class FileRecord:
    """What a file of the export must be: its size (checked on every load) and sha256 (checked on first use)."""

    size: int
    sha256: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FileRecord:
        size, digest = data["size"], data["sha256"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"file size must be a non-negative integer, got {size!r}")
        if not isinstance(digest, str) or len(digest) != 64:
            raise ValueError(f"sha256 must be 64 hex digits, got {digest!r}")
        return cls(size, digest)


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
    files: dict[str, FileRecord] = field(default_factory=dict)  # every file above but the manifest

    def listed_files(self) -> list[str]:
        """Every file the runtime reads besides the manifest (a compiled folder's simulator binaries too)."""
        files = [self.tokenizer_file] + [p.weights_file for p in self.parts]
        files += [g.file for p in self.parts for g in p.graphs.values()]
        files += [p.encodings_file for p in self.parts if p.encodings_file]
        simulator = (self.compiled or {}).get("simulator")
        if simulator:
            graphs = [Path(g.file) for p in self.parts for g in p.graphs.values()]
            files += [f"{simulator}/{name}" for g in graphs for name in (g.name, f"{g.stem}_qnn.bin")]
        return files + ([self.attention_sink_file] if self.attention_sink_file else [])

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
            chat_template=_typed(data, "chat_template", str | None), precision=_typed(data, "precision", str),
            target=_typed(data, "target", str), use_conv=_typed(data, "use_conv", bool),
            sequence_length=read_number(data, "sequence_length", int),
            context_length=read_number(data, "context_length", int),
            all_logits=_typed(data, "all_logits", bool), parts=tuple(PartManifest.from_dict(p) for p in data["parts"]),
            tokenizer_file=_typed(data, "tokenizer_file", str, "tokenizer.json"),
            extra=_typed(data, "extra", dict, {}),
            attention_sink_file=_typed(data, "attention_sink_file", str | None, None),
            compiled=_typed(data, "compiled", dict | None, None),
            files={name: FileRecord.from_dict(record) for name, record in data["files"].items()},
        )


def load_manifest(folder: Path | str) -> Manifest:
    """Read and check `folder/manifest.json`: its structure, its agreement with the graphs it lists, and that
    every file it names is there with its recorded size (checksums: `verify_checksums`)."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.exists():
        raise ManifestError(folder, f"no {MANIFEST_FILE}: not an exported model folder "
                                    "(create one with `ondevice-llama export`)")
    data = read_json_object(path, "manifest", ManifestError)
    if data.get("format") != FORMAT:
        raise ManifestError(path, f"not an ondevice-llama manifest (format={data.get('format')!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise ManifestError(path, f"format version {data.get('format_version')} is not supported "
                                  f"(this version reads {FORMAT_VERSION}); export the model again")
    try:
        manifest = Manifest.from_dict(data)
        _check_structure(manifest)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ManifestError(path, f"malformed manifest ({type(e).__name__}: {e})") from None
    for file in manifest.listed_files():
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise ManifestError(path, f"lists {file!r}, which is not a file in the folder")
        if not (folder / file).is_file():
            raise ManifestError(path, f"lists {file}, which is missing from the folder")
        record = manifest.files.get(file)
        if record is None:
            raise ManifestError(path, f"has no size and checksum for {file}")
        size = (folder / file).stat().st_size
        if size != record.size:
            raise ManifestError(folder / file, f"{size} bytes, the export wrote {record.size} (damaged or "
                                               "truncated); export the model again")
    return manifest


def with_file_records(manifest: Manifest, folder: Path, known: dict[str, str] | None = None) -> Manifest:
    """`manifest` recording the size and sha256 of every file it lists in `folder` (`known`: digests already
    computed, by file)."""
    known = known or {}
    return replace(manifest, files={f: FileRecord((folder / f).stat().st_size, known.get(f) or sha256_file(folder / f))
                                    for f in manifest.listed_files()})


def verify_checksums(folder: Path | str, manifest: Manifest) -> None:
    """Every file's sha256 against the manifest's; hashed on first use only (`files.sha256_matches`)."""
    folder = Path(folder)
    for file in manifest.listed_files():
        if not sha256_matches(folder / file, manifest.files[file].sha256):
            raise ManifestError(folder / file, "does not match the sha256 in manifest.json (damaged or changed "
                                               "since the export); export the model again")


def _check_structure(m: Manifest) -> None:
    """What the runtime relies on: parts covering the layers in order, the target's graphs, lengths that the
    graphs were built for (a hand-edited context_length would otherwise fail mid-chat)."""
    if m.target not in TARGET_GRAPHS:
        raise ValueError(f"unknown target {m.target!r}")
    if not (m.sequence_length > 0 and 0 < m.context_length <= m.config.max_position_embeddings):
        raise ValueError(f"sequence_length {m.sequence_length} and context_length {m.context_length} do not fit "
                         f"the model's {m.config.max_position_embeddings} positions")
    if m.target == "npu" and m.context_length <= m.sequence_length:
        raise ValueError(f"context_length {m.context_length} must exceed sequence_length {m.sequence_length}")
    if not m.parts:
        raise ValueError("no parts")
    end = 0
    for i, part in enumerate(m.parts):
        if part.index != i or part.first_layer != end or part.end_layer <= part.first_layer:
            raise ValueError(f"part {i} (index {part.index}, layers {part.first_layer}..{part.end_layer}) does "
                             f"not follow the part before it")
        if set(part.graphs) not in TARGET_GRAPHS[m.target] or set(part.graphs) != set(m.parts[0].graphs):
            raise ValueError(f"part {i} has graphs {sorted(part.graphs)}, the {m.target} target needs "
                             f"{' or '.join(str(sorted(kinds)) for kinds in TARGET_GRAPHS[m.target])}, the same "
                             f"in every part")
        for kind, graph in part.graphs.items():
            _check_graph_lengths(m, kind, graph)
        end = part.end_layer
    if end != m.config.num_layers:
        raise ValueError(f"the parts end at layer {end}, the model has {m.config.num_layers}")


def _check_graph_lengths(m: Manifest, kind: str, graph: GraphManifest) -> None:
    tokens = {PROMPT_PROCESSOR: m.sequence_length, TOKEN_GENERATOR: 1}.get(kind)
    if tokens is not None and graph.sequence_length != tokens:
        raise ValueError(f"{graph.file} takes {graph.sequence_length} tokens, the manifest says {tokens}")
    for spec in graph.inputs:  # the inputs whose shape holds the context length
        cpu_cache = kind in (DECODER, PREFILL) and spec.name.startswith("past_")
        axis = -1 if spec.name == "attention_mask" else 2 if cpu_cache else None
        if axis is not None and (len(spec.shape) < 3 or spec.shape[axis] != m.context_length):
            raise ValueError(f"{graph.file} was built for another context length than {m.context_length} "
                             f"({spec.name} {list(spec.shape)})")

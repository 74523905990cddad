"""Compile an exported folder (`--target npu`) to QNN context binaries, offline, for one Snapdragon SoC.

Per part, ONNX Runtime's QNN execution provider prepares the prompt processor, then the token generator, for
the HTP backend with `ep.share_ep_contexts`, so both graphs land in one context binary and share one copy of the
weights (the link step of Qualcomm's recipe, done here instead of in a cloud). No node may fall back to the CPU:
a graph the HTP cannot take whole is an error, not a slow phone. Each graph becomes an EPContext ONNX model
(a wrapper naming its graph in the binary) that our runtime loads with the same engine as the export.

QNN's x86_64 HTP simulator cannot load weight-shared binaries (QnnContext_createFromBinary crashes; Genie says
"Shared weights buffer isn't supported on this platform"). So that a compiled folder also runs where it is
built, each graph is prepared once more into a binary of its own, in `simulator/` (`simulator=False` skips
this and halves the time): the same graphs, SoC and QNN version, without the sharing.

Work happens in a staging folder beside `out`; each finished part is recorded with its checksums, so an
interrupted compile resumes at the next part, and `out` appears only when everything is there.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import threading
import time
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .. import qnn
from ..export.part_size import CONTEXT_OVERHEAD
from ..files import fingerprint, folder_lock, replace_folder, sha256_file
from ..manifest import (
    GRAPH_KINDS,
    MANIFEST_FILE,
    PROMPT_PROCESSOR,
    TOKEN_GENERATOR,
    Manifest,
    PartManifest,
    load_manifest,
    verify_checksums,
    with_file_records,
)
from ..memory import PeakRssSampler, available_bytes, release_free_memory
from ..staging import StagedParts, staging_folder
from . import genie, graph_names

FORMAT = "qnn-context-binary"
SIMULATOR_FOLDER = "simulator"  # the same graphs, a context binary each: what the x86_64 HTP simulator can load
# HTP prepare seconds on this 2-core machine per graph node and per GB of weights, fitted to the default model and
# to a Llama-2-7B part (benchmarks/qnn_compile.py): only for the progress bar's ETA.
PREPARE_SECONDS = {PROMPT_PROCESSOR: (0.0081, 249.0), TOKEN_GENERATOR: (0.0046, 84.0)}


def prepare_estimate(kind: str, nodes: int, weights_bytes: int) -> float:
    per_node, per_gb = PREPARE_SECONDS[kind]
    return per_node * nodes + per_gb * weights_bytes / 1e9


# Peak RSS of compiling one part (both graphs into the shared context; the token generator, last, peaks), as a
# line over three measured parts: the default model's (157.7 MB of exported weights) 2.32 GB; the synthetic
# Llama-2-7B's first 2 layers with its embedding and head (663 MB) 5.92 GB; its first part of 8 layers with the
# embedding (1.27 GB) 12.46 GB. Slope and intercept rounded up (estimates +7%, +23%, +5%).
COMPILE_BASE_BYTES = 1.0e9
COMPILE_BYTES_PER_CONTEXT_BYTE = 9.0


class CompileError(ValueError):
    """A compile that cannot be done as asked; the message names the file or option."""


def compile_memory(export: Path, manifest: Manifest) -> float:
    """Estimated peak bytes: the largest part's context (its exported weights, as compiled) decides."""
    largest = max((export / part.weights_file).stat().st_size for part in manifest.parts)
    return COMPILE_BASE_BYTES + COMPILE_BYTES_PER_CONTEXT_BYTE * largest * CONTEXT_OVERHEAD


def check_compile_memory(need: float, available: float | None = None) -> None:
    available = available_bytes() if available is None else available
    if need <= available:
        return
    swap = int((need - available) / 1e9) + 2
    raise CompileError(f"compiling needs about {need / 1e9:.1f} GB at its peak (the largest part) but "
                       f"{available / 1e9:.1f} GB of RAM + swap is available. To fit: export with more --num-parts "
                       f"(smaller parts), or add {swap} GB of swap: sudo fallocate -l {swap}G /swapfile && sudo "
                       "chmod 600 /swapfile && sudo mkswap /swapfile && sudo swapon /swapfile. "
                       "(--skip-memory-check compiles anyway.)")


def binary_name(part: int, parts: int) -> str:
    """Genie-style context binary names, zero-padded so that name order is part order."""
    width = len(str(parts))
    return f"part_{part + 1:0{width}d}_of_{parts}.bin"


def _check_export(folder: Path) -> Manifest:
    manifest = load_manifest(folder)
    if manifest.compiled is not None:
        raise CompileError(f"{folder}: already compiled (for {manifest.compiled['soc']}); compile its export instead")
    if manifest.target != "npu":
        raise CompileError(f"{folder}: a {manifest.target} export; QNN compiles npu exports "
                           "(`ondevice-llama export --target npu`)")
    return manifest


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CompileError(f"{out}: exists and is a file; choose another --out")
    if out.exists() and not (out / MANIFEST_FILE).exists() and any(out.iterdir()):
        raise CompileError(f"{out}: exists and is not a compiled folder; choose another --out")


def _compile_key(export: Path, soc: qnn.Soc, simulator: bool) -> str:
    import onnxruntime

    identity = [fingerprint(export), soc.name, simulator, qnn.sdk_version(), version("onnxruntime-qnn"),
                onnxruntime.__version__, version("ondevice-llama")]
    return hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()


class _TimeBar:
    """A progress bar for one blocking call: it advances with the clock toward an estimate, so it shows an ETA."""

    def __init__(self, description: str, estimate: float, enabled: bool):
        self.bar = tqdm(total=round(max(estimate, 1.0)), desc=description, unit="s", disable=not enabled,
                        dynamic_ncols=True, file=sys.stderr, bar_format="{l_bar}{bar}| {n:.0f}/~{total:.0f} s "
                                                                        "[{elapsed}<{remaining}]")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)

    def _tick(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(0.5):
            self.bar.n = min(time.monotonic() - start, self.bar.total * 0.99)
            self.bar.refresh()

    def __enter__(self) -> _TimeBar:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if exc[0] is None:
            self.bar.n = self.bar.total
        self.bar.close()


def _node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def _context_node(wrapper: Path) -> Any:
    """The wrapper's one EPContext node; anything else in it would run on the CPU."""
    import onnx

    model = onnx.load(str(wrapper))
    others = [n.op_type for n in model.graph.node if n.op_type != "EPContext"]
    if others or len(model.graph.node) != 1:
        kinds = ", ".join(sorted(set(others)))
        raise CompileError(f"{wrapper}: {len(others)} node(s) outside the QNN context ({kinds})")
    return model, model.graph.node[0]


def _point_at(wrapper: Path, binary: str) -> str:
    """Make the wrapper's EPContext node name `binary` as its context file; returns the QNN graph name."""
    import onnx

    model, node = _context_node(wrapper)
    for attribute in node.attribute:
        if attribute.name == "ep_cache_context":
            attribute.s = binary.encode()
    onnx.save_model(model, str(wrapper))
    names = [a.s.decode() for a in node.attribute if a.name == "partition_name"]
    return names[0] if names else node.name


def weight_options(manifest: Manifest) -> dict[str, str]:
    """QNN provider options the export's weights call for. Int4 block scales on the LPBQ grid (the recipe's
    `block_scale_bits`) are taken as QNN's blockwise expansion, which HTP runs in integer arithmetic; QNN would
    round free block scales onto that grid, so other exports keep its float16 block path."""
    recipe = manifest.extra.get("quantization", {}).get("recipe", {})
    return qnn.LPBQ_OPTIONS if recipe.get("block_scale_bits") else {}


def _compile_graph(source: str, wrapper: Path, soc: qnn.Soc, share: str | None, provider: dict[str, str]) -> float:
    """Prepare one graph (`source`: its path, spelled as `graph_names.ranked_path` chose) for the HTP into
    `wrapper` and its context binary; returns seconds taken.

    `share`: None for a binary of its own, "open" to add it to the shared context, "close" to add it and write.
    """
    import onnxruntime as ort

    config = {"ep.context_enable": "1", "ep.context_file_path": str(wrapper), "ep.context_embed_mode": "0"}
    if share is not None:
        config["ep.share_ep_contexts"] = "1"
    if share == "close":
        config["ep.stop_share_ep_contexts"] = "1"
    options = qnn.session_options(soc, config, {"enable_htp_prepare_only": "1"} | provider)
    start = time.perf_counter()
    try:
        ort.InferenceSession(source, sess_options=options)
    except Exception as e:  # ONNX Runtime raises its own Fail/InvalidGraph types
        raise CompileError(f"{source}: QNN HTP cannot take this graph whole ({str(e).splitlines()[0]})") from None
    return time.perf_counter() - start


def _prepare(source: str, wrapper: Path, soc: qnn.Soc, share: str | None, description: str, estimate: float,
             progress: bool, provider: dict[str, str]) -> dict[str, Any]:
    """One graph with a progress bar; returns what the manifest records of it."""
    with PeakRssSampler() as rss, _TimeBar(description, estimate, progress):
        seconds = _compile_graph(source, wrapper, soc, share, provider)
    release_free_memory()
    _check_name(wrapper, source)
    return {"file": wrapper.name, "seconds": round(seconds, 2), "peak_rss_gb": round(rss.peak_bytes / 1e9, 3)}


def _check_name(wrapper: Path, source: str) -> None:
    """The graph is named after the hash of the path it was loaded from (graph_names), or part order is lost."""
    _, node = _context_node(wrapper)
    expected = str(graph_names.path_hash(source))
    if expected not in node.name:
        raise CompileError(f"{wrapper}: QNN named the graph {node.name!r}, not after {expected} as this version of "
                           "ondevice-llama expects; Genie could not order the parts")


def _compile_part(export: Path, staging: Path, manifest: Manifest, part: PartManifest, soc: qnn.Soc,
                  simulator: bool, progress: bool) -> tuple[dict[str, Any], list[str]]:
    """Both graphs of one part into one context binary (and each into its own for the simulator); returns the
    part's record and its files."""
    parts = len(manifest.parts)
    graphs: dict[str, Any] = {}
    sources = {kind: graph_names.ranked_path(export / part.graphs[kind].file, part.index, parts)
               for kind in GRAPH_KINDS}
    nodes = {kind: _node_count(export / part.graphs[kind].file) for kind in GRAPH_KINDS}
    weights = (export / part.weights_file).stat().st_size
    estimates = {kind: prepare_estimate(kind, nodes[kind], weights) for kind in GRAPH_KINDS}
    provider = weight_options(manifest)
    for kind in GRAPH_KINDS:
        description = f"part {part.index + 1}/{parts} {kind.replace('_', ' ')}"
        share = "close" if kind == GRAPH_KINDS[-1] else "open"
        graphs[kind] = _prepare(sources[kind], staging / part.graphs[kind].file, soc, share, description,
                                estimates[kind], progress, provider) | {"nodes": nodes[kind], "cpu_nodes": 0}
    written = staging / f"{Path(part.graphs[GRAPH_KINDS[0]].file).stem}_qnn.bin"
    binary = binary_name(part.index, parts)
    written.replace(staging / binary)
    files = [binary]
    for kind in GRAPH_KINDS:
        graphs[kind]["qnn_graph"] = _point_at(staging / graphs[kind]["file"], binary)
        files.append(graphs[kind]["file"])
    record = {"binary": binary, "binary_bytes": (staging / binary).stat().st_size, "export_weights_bytes": weights,
              "graphs": graphs}
    if simulator:
        (staging / SIMULATOR_FOLDER).mkdir(exist_ok=True)
        alone = {}
        for kind in GRAPH_KINDS:
            wrapper = staging / SIMULATOR_FOLDER / part.graphs[kind].file
            description = f"part {part.index + 1}/{parts} {kind.replace('_', ' ')} (simulator)"
            alone[kind] = _prepare(sources[kind], wrapper, soc, None, description, estimates[kind], progress,
                                   provider)
            _context_node(wrapper)
            alone[kind]["binary_bytes"] = wrapper.with_name(f"{wrapper.stem}_qnn.bin").stat().st_size
            files += [f"{SIMULATOR_FOLDER}/{wrapper.name}", f"{SIMULATOR_FOLDER}/{wrapper.stem}_qnn.bin"]
        record["simulator"] = alone
    return record, files


def _compiled_manifest(export: Path, manifest: Manifest, soc: qnn.Soc, records: list[dict[str, Any]],
                       genie_note: str | None, simulator: bool, seconds: float, peak_rss: float, need: float
                       ) -> Manifest:
    parts = tuple(replace(part, weights_file=r["binary"], weights_sha256=r["binary_sha256"], encodings_file=None)
                  for part, r in zip(manifest.parts, records, strict=True))
    compiled = {"format": FORMAT, "export": str(export.resolve()), "soc": soc.name, "soc_model": soc.soc_model,
                "htp_arch": soc.htp_arch,
                "qnn_sdk": qnn.sdk_version(), "onnxruntime_qnn": version("onnxruntime-qnn"),
                "parts": [{k: v for k, v in r.items() if k != "binary_sha256"} for r in records],
                "simulator": SIMULATOR_FOLDER if simulator else None,
                "seconds": round(seconds, 1), "peak_rss_gb": round(peak_rss / 1e9, 3),
                "estimated_peak_rss_gb": round(need / 1e9, 3),
                "genie": genie_note or f"bundle: {genie.CONFIG_FILE}, {genie.BACKEND_EXTENSIONS_FILE}"}
    return replace(manifest, parts=parts, compiled=compiled)


def compile_export(export: Path | str, out: Path | str, soc_name: str, simulator: bool = True,
                   progress: bool = True, only: list[int] | None = None, check_memory_first: bool = True
                   ) -> Manifest | None:
    """Compile exported folder `export` for SoC `soc_name` into folder `out`; returns the compiled manifest.

    `simulator`: also write per-graph binaries the x86_64 HTP simulator can run (`chat --model OUT` here).
    `only`: compile just these parts (0-based) into the staging folder and return None; a later call without it
    verifies and reuses them (a big model can be compiled a part at a time).
    """
    export, out = Path(export), Path(out)
    soc = qnn.soc_by_name(soc_name)
    manifest = _check_export(export)
    verify_checksums(export, manifest)
    with folder_lock(out):
        return _compile_locked(export, out, manifest, soc, simulator, progress, only, check_memory_first)


def _compile_locked(export: Path, out: Path, manifest: Manifest, soc: qnn.Soc, simulator: bool, progress: bool,
                    only: list[int] | None, check_memory_first: bool) -> Manifest | None:
    """`compile_export` holding the lock on `out`: no other process writes it or its staging folder."""
    _check_out(out)
    need = compile_memory(export, manifest)
    if check_memory_first:
        check_compile_memory(need)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(out)
    staged = StagedParts(staging, _compile_key(export, soc, simulator))
    if staged.done:
        print(f"resuming the compile in {staging}: part(s) {', '.join(str(k + 1) for k in sorted(staged.done))} "
              "already done and verified", file=sys.stderr)
    else:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    if only is not None and not set(only) <= {p.index for p in manifest.parts}:
        raise CompileError(f"--part: {export} has parts 1 to {len(manifest.parts)}")
    start = time.perf_counter()
    try:
        with PeakRssSampler() as rss:
            for part in manifest.parts:
                if part.index not in staged.done and (only is None or part.index in only):
                    record, files = _compile_part(export, staging, manifest, part, soc, simulator, progress)
                    record["binary_sha256"] = sha256_file(staging / record["binary"])
                    staged.record(part.index, record, files)
        if only is not None and len(staged.done) < len(manifest.parts):
            print(f"compiled part(s) {', '.join(str(k + 1) for k in sorted(staged.done))} of {len(manifest.parts)} "
                  f"into {staging}; run without --part to finish", file=sys.stderr)
            return None
        records = [staged.done[p.index] for p in manifest.parts]
        for file in (manifest.tokenizer_file, manifest.attention_sink_file):
            if file:
                shutil.copy2(export / file, staging / file)
        note = genie.unsupported(manifest)
        compiled = _compiled_manifest(export, manifest, soc, records, note, simulator, time.perf_counter() - start,
                                      rss.peak_bytes, need)
        if note is None:
            config = genie.genie_config(compiled, [r["binary"] for r in records], manifest.tokenizer_file)
            (staging / genie.CONFIG_FILE).write_text(json.dumps(config, indent=2))
            (staging / genie.BACKEND_EXTENSIONS_FILE).write_text(json.dumps(genie.backend_extensions(soc), indent=2))
        known = {r["binary"]: r["binary_sha256"] for r in records}
        compiled = with_file_records(compiled, staging, known)
        compiled.save(staging)
        staged.finish()
        replace_folder(staging, out)
    except BaseException:
        if staged.done:
            print(f"compile stopped; {len(staged.done)} finished part(s) kept in {staging}: run the same command "
                  "again to resume", file=sys.stderr)
        else:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return compiled

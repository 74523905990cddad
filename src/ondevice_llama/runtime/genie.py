"""Qualcomm's Genie runtime (libGenie, shipped in onnxruntime-qnn) running a compiled folder's bundle, via ctypes.

This is how a phone app runs the bundle: Genie owns the context binaries, the KV cache, the RoPE tables and
sampling; it is given token ids and streams token ids back. On the x86_64 HTP simulator the bundle's binaries
(weight-shared) cannot be loaded, so the dialog uses the folder's per-graph simulator binaries: the same
graphs, SoC and QNN version.

Genie resolves relative paths against the process's working directory; the config it gets here has them
made absolute. Genie's C API returns an int status (0 success) from every call.
"""

from __future__ import annotations

import ctypes
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..manifest import GRAPH_KINDS, Manifest, load_manifest
from .detokenizer import IncrementalDetokenizer
from .generate import ChatSession, GenerationResult
from .sampling import SamplingConfig

CONFIG_FILE = "genie_config.json"
SENTENCE_COMPLETE, SENTENCE_END, SENTENCE_ABORT = 0, 3, 4
_Handle = ctypes.c_void_p
_TokenCallback = ctypes.CFUNCTYPE(None, ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32, ctypes.c_int,
                                  ctypes.c_void_p)


class GenieError(RuntimeError):
    pass


def load_library(path: Path | None = None) -> ctypes.CDLL:
    """libGenie with the signatures used here; by default the one onnxruntime-qnn ships."""
    if path is None:
        from .. import qnn

        path = qnn.library_folder() / "libGenie.so"
    lib = ctypes.CDLL(str(path))
    lib.GenieDialogConfig_createFromJson.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Handle)]
    lib.GenieDialogConfig_free.argtypes = [_Handle]
    lib.GenieDialog_create.argtypes = [_Handle, ctypes.POINTER(_Handle)]
    lib.GenieDialog_free.argtypes = [_Handle]
    lib.GenieDialog_reset.argtypes = [_Handle]
    lib.GenieDialog_setMaxNumTokens.argtypes = [_Handle, ctypes.c_uint32]
    lib.GenieDialog_tokenQuery.argtypes = [_Handle, ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32, ctypes.c_int,
                                           _TokenCallback, ctypes.c_void_p]
    for function in ("Major", "Minor", "Patch"):
        getattr(lib, f"Genie_getApi{function}Version").restype = ctypes.c_uint32
    return lib


def api_version(lib: ctypes.CDLL) -> str:
    return ".".join(str(getattr(lib, f"Genie_getApi{f}Version")()) for f in ("Major", "Minor", "Patch"))


def bundle_config(folder: Path, manifest: Manifest, simulator: bool) -> dict[str, Any]:
    """The folder's genie_config.json with absolute paths (and the simulator's binaries where asked)."""
    path = folder / CONFIG_FILE
    if not path.exists():
        raise GenieError(f"{folder}: no {CONFIG_FILE} ({(manifest.compiled or {}).get('genie', 'not compiled')})")
    config = json.loads(path.read_text())
    dialog = config["dialog"]
    binary = dialog["engine"]["model"]["binary"]
    if simulator:
        folder_name = (manifest.compiled or {}).get("simulator")
        if not folder_name:
            raise GenieError(f"{folder}: compiled with --device-only; the x86_64 HTP simulator cannot load its "
                             "weight-shared binaries")
        binary["ctx-bins"] = [str(folder / folder_name / f"{Path(part.graphs[kind].file).stem}_qnn.bin")
                              for part in manifest.parts for kind in GRAPH_KINDS]
    else:
        binary["ctx-bins"] = [str(folder / b) for b in binary["ctx-bins"]]
    dialog["tokenizer"]["path"] = str(folder / dialog["tokenizer"]["path"])
    backend = dialog["engine"]["backend"]
    if backend.get("extensions"):
        backend["extensions"] = str(folder / backend["extensions"])
    return config


def sampler_config(sampling: SamplingConfig) -> dict[str, Any]:
    """Genie's sampler block for a `SamplingConfig` (temperature 0: greedy)."""
    greedy = sampling.temperature == 0
    return {"version": 1, "seed": 42 if sampling.seed is None else sampling.seed, "temp": sampling.temperature,
            "top-k": 1 if greedy else (sampling.top_k or 0), "top-p": sampling.top_p, "greedy": greedy}


def _check(status: int, what: str) -> None:
    if status != 0:
        raise GenieError(f"{what} returned status {status}")


class GenieDialog:
    """One Genie dialog over a compiled folder's bundle."""

    def __init__(self, folder: Path | str, simulator: bool | None = None, library: Path | None = None,
                 sampling: SamplingConfig | None = None):
        """`sampling`: a `SamplingConfig` for Genie's sampler instead of the bundle's (greedy)."""
        from .. import qnn

        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)
        simulator = qnn.simulated() if simulator is None else simulator
        self.config = bundle_config(self.folder, self.manifest, simulator)
        if sampling is not None:
            self.config["dialog"]["sampler"] = sampler_config(sampling)
        self.lib = load_library(library)
        self._config_handle, self._dialog = _Handle(), _Handle()
        _check(self.lib.GenieDialogConfig_createFromJson(json.dumps(self.config).encode(),
                                                         ctypes.byref(self._config_handle)),
               f"{self.folder / CONFIG_FILE}: GenieDialogConfig_createFromJson")
        _check(self.lib.GenieDialog_create(self._config_handle, ctypes.byref(self._dialog)),
               f"{self.folder}: GenieDialog_create")

    def generate(self, tokens: list[int], max_new_tokens: int,
                 on_token: Callable[[int], None] | None = None) -> list[int]:
        """Genie's reply to `tokens` (model tokens: after the attention sink the graphs hold), from a fresh dialog."""
        self.lib.GenieDialog_reset(self._dialog)
        _check(self.lib.GenieDialog_setMaxNumTokens(self._dialog, max_new_tokens), "GenieDialog_setMaxNumTokens")
        reply: list[int] = []
        errors: list[BaseException] = []

        def receive(ids, count, code, _user):
            try:  # an exception must not unwind through C
                for i in range(count):
                    reply.append(int(ids[i]))
                    if on_token is not None:
                        on_token(int(ids[i]))
            except BaseException as e:  # noqa: BLE001 - re-raised below, outside the callback
                errors.append(e)

        callback = _TokenCallback(receive)
        array = (ctypes.c_uint32 * len(tokens))(*tokens)
        status = self.lib.GenieDialog_tokenQuery(self._dialog, array, len(tokens), SENTENCE_COMPLETE, callback, None)
        if errors:
            raise errors[0]
        _check(status, "GenieDialog_tokenQuery")
        return reply

    def close(self) -> None:
        if self._dialog:
            self.lib.GenieDialog_free(self._dialog)
            self._dialog = _Handle()
        if self._config_handle:
            self.lib.GenieDialogConfig_free(self._config_handle)
            self._config_handle = _Handle()

    def __enter__(self) -> GenieDialog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def config_accepted(folder: Path | str, simulator: bool = False, library: Path | None = None) -> bool:
    """Whether Genie's config parser (GenieDialogConfig_createFromJson) takes the folder's bundle as is."""
    folder = Path(folder)
    lib = load_library(library)
    handle = _Handle()
    config = bundle_config(folder, load_manifest(folder), simulator)
    status = lib.GenieDialogConfig_createFromJson(json.dumps(config).encode(), ctypes.byref(handle))
    if status == 0:
        lib.GenieDialogConfig_free(handle)
    return status == 0


class GenieChatSession(ChatSession):
    """A chat whose replies Genie generates (its engine and sampler); our chat format and streaming."""

    def __init__(self, folder: Path | str, system: str | None = None, sampling: SamplingConfig | None = None):
        from tokenizers import Tokenizer

        from ..attention_sink import AttentionSink

        self.dialog = GenieDialog(folder, sampling=sampling or SamplingConfig())
        m = self.dialog.manifest
        self._start(m, Tokenizer.from_file(str(self.dialog.folder / m.tokenizer_file)), system)
        self.sink = AttentionSink.load(self.dialog.folder / m.attention_sink_file) if m.attention_sink_file else None

    def _reset_engine(self) -> None:
        """Nothing to do: every reply starts from a fresh dialog."""

    def _generate(self, prompt: list[int], sampling: SamplingConfig, max_new_tokens: int,
                  on_text: Callable[[str], None] | None, slide: bool) -> GenerationResult:
        """The whole conversation from a fresh dialog, after the attention sink the graphs hold."""
        eos = self.manifest.special_tokens.eos_ids
        tokens = self.sink.without_sink(prompt) if self.sink is not None else prompt
        detokenizer, on_text = IncrementalDetokenizer(self.tokenizer), on_text or (lambda _: None)
        times: list[float] = []
        start = time.perf_counter()

        def on_token(token: int) -> None:
            times.append(time.perf_counter())
            if token not in eos:
                on_text(detokenizer.add(token))

        reply = self.dialog.generate(tokens, max_new_tokens, on_token)
        on_text(detokenizer.flush())
        ended = bool(reply) and reply[-1] in eos
        reply = [t for t in reply if t not in eos]
        ttft = times[0] - start if times else time.perf_counter() - start
        decode = times[-1] - times[0] if len(times) > 1 else 0.0
        stop = "eos" if ended or len(reply) < max_new_tokens else "max_new_tokens"
        return GenerationResult(reply, self.tokenizer.decode(reply, skip_special_tokens=True), len(prompt), stop,
                                ttft, decode)

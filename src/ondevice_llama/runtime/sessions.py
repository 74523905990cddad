"""The one place ONNX Runtime sessions are made: a graph that does not load, or does not match its manifest
entry, is a one-line ValueError naming the file rather than an ONNX Runtime traceback mid-chat."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from ..manifest import GraphManifest

# ONNX Runtime logs a failed load on stderr at error level before raising it; the exception says it all.
QUIET_LOG_LEVEL = 4


def open_session(path: Path, options: ort.SessionOptions, providers: list[str],
                 expected: GraphManifest | None = None) -> ort.InferenceSession:
    """An InferenceSession for the graph at `path`, checked against its manifest entry `expected` if given."""
    options.log_severity_level = max(options.log_severity_level, QUIET_LOG_LEVEL)
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # ORT's pybind exceptions (Fail, InvalidProtobuf, InvalidGraph, ...) derive from Exception
        lines = str(e).strip().splitlines() or [type(e).__name__]
        raise ValueError(f"{path}: ONNX Runtime cannot load this graph ({lines[-1][:300]}); "
                         "export the model again") from None
    if expected is not None:
        _check_signature(session, path, expected)
    return session


def _check_signature(session: ort.InferenceSession, path: Path, expected: GraphManifest) -> None:
    """Inputs and outputs with the names and static sizes the manifest promises (-1: a dynamic size)."""
    for what, values, specs in (("inputs", session.get_inputs(), expected.inputs),
                                ("outputs", session.get_outputs(), expected.outputs)):
        got = [(v.name, tuple(d if isinstance(d, int) else -1 for d in v.shape)) for v in values]
        want = [(s.name, tuple(s.shape)) for s in specs]
        if got != want:
            raise ValueError(f"{path}: the graph's {what} do not match manifest.json; export the model again")

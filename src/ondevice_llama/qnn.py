"""Qualcomm's QNN HTP backend through ONNX Runtime's QNN execution provider (the optional `qnn` extra).

One place for what both the compiler and the runtime need: the Snapdragon SoCs we compile for, the plugin
execution provider's registration and the session options that keep every node on the HTP.

`onnxruntime-qnn` (PyPI) bundles QNN's HTP backend. On x86_64 it prepares graphs for a named SoC, writes
context binaries and runs them on the HTP simulator; on a Snapdragon device the same calls run the NPU.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "pip install 'ondevice-llama[qnn]' (onnxruntime-qnn)"


@dataclass(frozen=True)
class Soc:
    name: str  # Qualcomm's part number, as QNN's headers and device attributes spell it
    marketing_name: str
    soc_model: int  # QNN's Qnn_SocModel_t value
    htp_arch: int  # Hexagon tensor processor version (v73, v75, ...)


# soc_model: QNN's QnnTypes.h (Qnn_SocModel_t); htp_arch: the Hexagon version of each part. The QNN HTP backend
# refuses a soc_model it does not know, which tests/test_qnn.py checks for every row (QNN 2.51 refused our graphs
# for 68, which public tables give as SM8635, so it is not listed).
SOCS: dict[str, Soc] = {s.name: s for s in (
    Soc("SM8450", "Snapdragon 8 Gen 1", 36, 69),
    Soc("SM8475", "Snapdragon 8+ Gen 1", 42, 69),
    Soc("SM8550", "Snapdragon 8 Gen 2", 43, 73),
    Soc("SM8650", "Snapdragon 8 Gen 3", 57, 75),
    Soc("SC8380XP", "Snapdragon X Elite / X Plus", 60, 73),
    Soc("SM8750", "Snapdragon 8 Elite", 69, 79),
    Soc("SM8850", "Snapdragon 8 Elite Gen 5", 87, 81),
)}


def soc_by_name(name: str) -> Soc:
    """The table's row for `name` (case-insensitive); an unknown name is a ValueError listing the known ones."""
    soc = SOCS.get(name.upper())
    if soc is None:
        known = ", ".join(f"{s.name} ({s.marketing_name})" for s in SOCS.values())
        raise ValueError(f"--soc: unknown SoC {name!r}; known: {known}")
    return soc


def simulated() -> bool:
    """True where QNN's HTP backend is a simulator (x86_64 hosts), not a Snapdragon's NPU."""
    return platform.machine().lower() in ("x86_64", "amd64")


class QnnUnavailable(RuntimeError):
    """onnxruntime-qnn is not installed (or not for this platform)."""


def _module():
    try:
        import onnxruntime_qnn
    except ModuleNotFoundError:
        raise QnnUnavailable(f"the QNN HTP backend is not installed: {INSTALL_HINT}") from None
    return onnxruntime_qnn


def library_folder() -> Path:
    """Where the wheel keeps QNN's libraries (libQnnHtp.so, libGenie.so, ...)."""
    return Path(_module().get_library_path()).parent


def sdk_version() -> str:
    """The QNN SDK version the installed wheel bundles, e.g. '2.51.0'."""
    from onnxruntime_qnn.build_and_package_info import qnn_version

    _module()
    return qnn_version


def ep_devices() -> list:
    """ONNX Runtime's QNN devices, registering the plugin execution provider on first use."""
    import onnxruntime as ort

    module = _module()
    if not any(d.ep_name == "QNN" for d in ort.get_ep_devices()):
        ort.register_execution_provider_library("QNN", module.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNN"]
    if not devices:
        raise QnnUnavailable("onnxruntime-qnn is installed but offers no QNN device on this machine")
    return devices


# Int4 block-quantized weights as LPBQ (QNN's blockwise expansion: integer block scales under a per-channel
# float scale), which HTP computes in integer arithmetic; QNN rounds the block scales onto that grid, losslessly
# only where they are on it already (`quantizers.lpbq_scales`).
LPBQ_OPTIONS = {"enable_block_quant_weight_optimization": "1"}


def session_options(soc: Soc, config: dict[str, str] | None = None, provider: dict[str, str] | None = None,
                    log_level: int = 3):
    """Session options for the HTP backend of `soc`, with no node allowed to fall back to the CPU.

    `config`: extra session config entries (the EPContext entries when compiling); `provider`: extra QNN
    provider options.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = log_level
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    provider_options = {"backend_type": "htp", "soc_model": str(soc.soc_model), "htp_arch": str(soc.htp_arch)}
    options.add_provider_for_devices(ep_devices(), provider_options | (provider or {}))
    return options

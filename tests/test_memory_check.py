"""Bounded-memory export: layer-by-layer streaming, the memory estimate and the check that uses it."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import weakref
from dataclasses import replace

import numpy as np
import pytest

from ondevice_llama.cli.main import main
from ondevice_llama.config import LlamaConfig
from ondevice_llama.export import ExportOptions, export_model
from ondevice_llama.export.memory_check import GB, NotEnoughMemory, check_memory, estimate_export_memory
from ondevice_llama.loading import open_checkpoint
from ondevice_llama.loading.names import num_parameters
from ondevice_llama.quantization.recipe import Recipe

LLAMA_2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                         num_kv_heads=32, rms_norm_eps=1e-5, max_position_embeddings=4096)


class StreamingWitness:
    """A tensor source that checks streaming: when layer L is read, no array of layer L - 2 or earlier is alive."""

    def __init__(self, source):
        self.source = source
        self.alive: list[tuple[int, weakref.ref]] = []
        self.violations: list[str] = []

    def names(self):
        return self.source.names()

    def shape(self, name):
        return self.source.shape(name)

    def get(self, name: str) -> np.ndarray:
        array = self.source.get(name)
        if name.startswith("layers."):
            layer = int(name.split(".")[1])
            gc.collect()
            stale = {i for i, ref in self.alive if ref() is not None and i < layer - 1}
            if stale:
                self.violations.append(f"{name} read while layers {sorted(stale)} are still in memory")
            self.alive = [(i, ref) for i, ref in self.alive if ref() is not None] + [(layer, weakref.ref(array))]
        return array


STREAMED = {"npu-fp32": ExportOptions(precision="fp32"),
            "npu-w4a16": ExportOptions(precision="w4a16", algorithm="gptq"),
            "cpu-w4": ExportOptions(target="cpu", precision="w4")}


@pytest.mark.parametrize("options", STREAMED.values(), ids=STREAMED.keys())
def test_export_streams_layer_by_layer(tiny_checkpoints, tmp_path, options):
    checkpoint = open_checkpoint(tiny_checkpoints["mha_untied"])
    witness = StreamingWitness(checkpoint.tensors)
    export_model(replace(checkpoint, tensors=witness), tmp_path / "e",
                 replace(options, num_parts=2, sequence_length=8, context_length=32), progress=False)
    assert witness.violations == []
    assert {i for i, _ in witness.alive} <= set(range(checkpoint.config.num_layers))


def test_estimate_grows_with_what_each_phase_holds():
    rtn = Recipe.from_precision("w4a16", algorithm="rtn")
    gptq = Recipe.from_precision("w4a16", algorithm="gptq")
    npu_rtn = estimate_export_memory(LLAMA_2_7B, "npu", "w4a16", rtn, generated_calibration=False, quantize=True)
    npu_gptq = estimate_export_memory(LLAMA_2_7B, "npu", "w4a16", gptq, generated_calibration=False, quantize=True)
    generated = estimate_export_memory(LLAMA_2_7B, "npu", "w4a16", gptq, generated_calibration=True, quantize=True)
    reuse = estimate_export_memory(LLAMA_2_7B, "npu", "w4a16", rtn, generated_calibration=False, quantize=False)
    assert npu_rtn.peak_phase == "quantize" and set(reuse.phases) == {"export"}
    assert reuse.peak_bytes < npu_rtn.peak_bytes < npu_gptq.peak_bytes < generated.peak_bytes
    assert generated.peak_phase == "calibration text" and generated.peak_bytes > 4 * num_parameters(LLAMA_2_7B)
    # One layer, not the model: a 7B export stays far below its 13.5 GB of fp16 weights without GPTQ.
    assert npu_rtn.peak_bytes < 8 * GB
    cpu = estimate_export_memory(LLAMA_2_7B, "cpu", "w4", None, generated_calibration=False, quantize=False)
    assert cpu.peak_bytes < 8 * GB


def test_check_says_what_to_do_when_the_host_is_too_small():
    gptq = Recipe.from_precision("w4a16", algorithm="gptq")
    estimate = estimate_export_memory(LLAMA_2_7B, "npu", "w4a16", gptq, generated_calibration=False, quantize=True)
    check_memory(estimate, "npu", gptq, available=estimate.peak_bytes + 1)  # fits: no error
    with pytest.raises(NotEnoughMemory) as error:
        check_memory(estimate, "npu", gptq, available=2 * GB)
    message = str(error.value)
    assert "\n" not in message and f"{estimate.peak_bytes / GB:.1f} GB" in message and "2.0 GB" in message
    assert "--algorithm rtn" in message and "swapon" in message and "--skip-memory-check" in message


def test_cli_refuses_an_export_that_does_not_fit(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    from ondevice_llama.export import memory_check

    monkeypatch.setattr(memory_check, "available_bytes", lambda: 0.1 * GB)
    out = tmp_path / "e"
    args = ["export", "--checkpoint", str(tiny_checkpoints["gqa_tied"]), "--out", str(out), "--sequence-length", "8",
            "--context-length", "32", "--precision", "fp32", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: this export needs about") and not out.exists()
    assert main([*args, "--skip-memory-check"]) == 0 and (out / "manifest.json").exists()


def test_manifest_records_estimate_and_measured_peak(tiny_checkpoints, tmp_path):
    """In a fresh process (as the CLI runs), the measured peak and the estimate agree within 25%."""
    out = tmp_path / "e"
    subprocess.run([sys.executable, "-m", "ondevice_llama.cli.main", "export", "--checkpoint",
                    str(tiny_checkpoints["mha_untied"]), "--out", str(out), "--sequence-length", "8",
                    "--context-length", "32", "--precision", "w4a16", "--algorithm", "rtn", "--quiet"], check=True)
    memory = json.loads((out / "manifest.json").read_text())["extra"]["memory"]
    assert set(memory["estimated_phases_gb"]) == {"quantize", "export"}
    assert memory["estimated_peak_gb"] == max(memory["estimated_phases_gb"].values())
    assert abs(memory["estimated_peak_gb"] / memory["measured_peak_gb"] - 1) < 0.25

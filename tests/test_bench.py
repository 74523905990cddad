"""`ondevice-llama bench` on tiny CPU-target and NPU-target exports: the JSON is complete and sane, the plot exists."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ondevice_llama.cli.main import main
from ondevice_llama.config import LlamaConfig
from ondevice_llama.export import ExportOptions, export_model
from ondevice_llama.loading import open_checkpoint
from ondevice_llama.loading.synthetic import write_synthetic_checkpoint
from ondevice_llama.runtime import ExportedModel
from ondevice_llama.runtime.bench import draw_tokens, median_spread, timed_parts

CONFIG = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)
TARGETS = {"cpu": ExportOptions(target="cpu", context_length=256),
           "npu": ExportOptions(sequence_length=16, context_length=256, num_parts=2)}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    checkpoint = open_checkpoint(write_synthetic_checkpoint(CONFIG, root / "ck"))
    for target, options in TARGETS.items():
        export_model(checkpoint, root / target, options, progress=False)
    return {target: root / target for target in TARGETS}


def check_spread(s: dict, positive: bool = True) -> None:
    assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
    assert s["n"] == 2
    if positive:
        assert s["min"] > 0


@pytest.mark.parametrize("target", list(TARGETS))
def test_bench_writes_sane_json_and_plot(exports, tmp_path, capsys, target):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(["bench", "--model", str(exports[target]), "--threads", "1", "--repetitions", "2",
                 "--prompt-lengths", "16,64,1000", "--json", str(out_json), "--plot", str(out_png)])
    assert code == 0
    report = json.loads(out_json.read_text())
    assert (report["target"], report["threads"], report["repetitions"]) == (target, 1, 2)
    assert report["precision"] == ("w4" if target == "cpu" else "w4a16")
    assert set(report["ttft_s"]) == {"16", "64"}  # 1000 does not fit the context of 256
    assert any("1000" in note for note in report["notes"])
    assert report["pp512"] is None and report["pp512_spread"] is None
    for n, s in report["ttft_spread_s"].items():
        check_spread(s)
        assert report["ttft_s"][n] == s["median"]
        check_spread(report["prefill_tok_per_s_spread"][n])
    assert report["ttft_s"]["16"] < 10
    for key in ("decode_tok_per_s", "tg128"):
        check_spread(report[f"{key}_spread"])
        assert report[key] == report[f"{key}_spread"]["median"]
    # The npu export is quantized: its attention sink is inside the graphs and takes none of the 256 slots.
    assert report["decode_prompt_tokens"] == 128 and report["decode_steps"] == 128 and report["tg_steps"] == 128
    assert 0 < report["peak_rss_gb"] < 64
    machine = report["machine"]
    assert machine["cpu_count"] >= 1 and machine["platform"] and machine["onnxruntime"]
    parts = report["part_latency_ms"]
    for kind in ("decode_step", "prefill"):
        assert len(parts[kind]["parts_ms"]) == report["parts"] == (1 if target == "cpu" else 2)
        for s in parts[kind]["parts_ms"]:
            assert s["min"] <= s["median"] <= s["max"] and s["min"] > 0
        assert sum(s["median"] for s in parts[kind]["parts_ms"]) <= parts[kind]["wall_ms"]["max"]
    assert out_png.stat().st_size > 1000 and out_png.read_bytes()[:4] == b"\x89PNG"
    assert "TTFT 16 tokens" in capsys.readouterr().out


def test_timing_proxy_restores_the_sessions(exports):
    model = ExportedModel(exports["npu"])
    before = {kind: list(sessions) for kind, sessions in model.engine.sessions.items()}
    cache = model.new_cache()
    with timed_parts(model.engine) as clock:
        model.prefill(list(range(3, 40)), cache)  # 3 prompt-processor chunks per part
        assert clock.calls == [3, 3] and all(s > 0 for s in clock.seconds)
    assert {kind: list(sessions) for kind, sessions in model.engine.sessions.items()} == before


def test_helpers():
    s = median_spread([3.0, 1.0, 2.0, 10.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 10.0, 4)
    assert s["q1"] <= s["median"] <= s["q3"]
    assert median_spread([4.0])["q3"] == 4.0
    tokens = draw_tokens(500, 300, avoid={0, 1, 2})
    assert tokens == draw_tokens(500, 300, avoid={0, 1, 2}) and not {0, 1, 2} & set(tokens)
    assert all(0 <= t < 300 for t in tokens)


def test_bench_module_does_not_import_torch():
    code = ("import sys, ondevice_llama.cli.bench, ondevice_llama.runtime.bench; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

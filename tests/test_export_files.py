"""The exported folder on disk: its files, their weight sharing, the manifest contract, atomic writes, the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from ondevice_llama.cli.main import main
from ondevice_llama.config import LlamaConfig
from ondevice_llama.export import ExportOptions, export_model
from ondevice_llama.loading import open_checkpoint
from ondevice_llama.loading.names import LAYER_TENSORS, num_parameters
from ondevice_llama.loading.synthetic import write_synthetic_checkpoint
from ondevice_llama.manifest import ManifestError, load_manifest, verify_checksums

# Wide enough that page-alignment padding stays well under 5% of a part's weights.
CONFIG = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
                     num_kv_heads=2, tie_word_embeddings=True)
OPTIONS = ExportOptions(num_parts=2, sequence_length=8, context_length=32, precision="fp32")
SMALL_ARGS = ["--sequence-length", "8", "--context-length", "32", "--quiet"]


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    return write_synthetic_checkpoint(CONFIG, tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="module")
def checkpoint(checkpoint_dir):
    return open_checkpoint(checkpoint_dir)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    export_model(checkpoint, out, OPTIONS, progress=False)
    return out


def fresh_copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def leftovers(parent: Path, name: str) -> list[str]:
    """Hidden temporary folders an export of `name` may leave beside it (.name.partial, .name.old-*)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def part_tensors(config: LlamaConfig, layers: range, first: bool, last: bool) -> list[str]:
    names = [f"layers.{i}.{t}" for i in layers for t in LAYER_TENSORS]
    if first:
        names.append("embed_tokens")
    if last:
        names += ["norm", "embed_tokens" if config.tie_word_embeddings else "lm_head"]
    return names


def external_ranges(model: onnx.ModelProto) -> dict[str, tuple[str, int, int]]:
    """Initializer name -> (location, offset, length) for every weight stored outside the .onnx file."""
    ranges = {}
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            ranges[init.name] = (info["location"], int(info.get("offset", 0)), int(info["length"]))
    return ranges


def value_specs(values) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(v.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).name,
             tuple(d.dim_value for d in v.type.tensor_type.shape.dim)) for v in values]


def manifest_specs(specs) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(s.name, s.dtype, tuple(s.shape)) for s in specs]


# ---------------------------------------------------------------- files


def test_export_folder_holds_exactly_the_expected_files(exported):
    expected = {"manifest.json", "tokenizer.json"}
    for k in (1, 2):
        expected |= {f"prompt_processor_part{k}.onnx", f"token_generator_part{k}.onnx", f"weights_part{k}.bin"}
    assert {p.name for p in exported.iterdir()} == expected
    assert leftovers(exported.parent, exported.name) == []


@pytest.mark.parametrize("k", [1, 2])
def test_part_graphs_share_one_weight_file_without_duplicates(exported, checkpoint, k):
    """Both graphs of part K point into weights_partK.bin only, at the same bytes, each weight stored once."""
    manifest = load_manifest(exported)
    part = manifest.parts[k - 1]
    weights = exported / f"weights_part{k}.bin"
    assert part.weights_file == weights.name
    prompt = onnx.load(exported / f"prompt_processor_part{k}.onnx", load_external_data=False)
    generator = onnx.load(exported / f"token_generator_part{k}.onnx", load_external_data=False)
    ranges = external_ranges(prompt)
    assert ranges, "weights must be external, not inlined into the .onnx file"
    assert external_ranges(generator) == ranges  # the token generator reuses the prompt processor's weights
    assert {location for location, _, _ in ranges.values()} == {weights.name}

    # No two initializers overlap, all lie inside the file, and together they are exactly the part's weights.
    spans = sorted((offset, offset + length) for _, offset, length in ranges.values())
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:], strict=False))
    size = weights.stat().st_size
    assert spans[-1][1] <= size
    names = part_tensors(CONFIG, part.layers, k == 1, k == len(manifest.parts))
    param_bytes = 4 * sum(int(np.prod(checkpoint.tensors.shape(n))) for n in names)
    assert sum(end - start for start, end in spans) == param_bytes
    assert size <= 1.05 * param_bytes


def test_weight_bytes_hold_the_checkpoint_values(exported, checkpoint):
    _, offset, length = external_ranges(onnx.load(exported / "prompt_processor_part1.onnx",
                                                  load_external_data=False))["embed_tokens.weight"]
    stored = np.fromfile(exported / "weights_part1.bin", dtype=np.float32, count=length // 4, offset=offset)
    np.testing.assert_array_equal(stored.reshape(CONFIG.vocab_size, CONFIG.hidden_size),
                                  checkpoint.tensors.get("embed_tokens"))


@pytest.mark.parametrize("graph", ["prompt_processor", "token_generator"])
@pytest.mark.parametrize("k", [1, 2])
def test_onnx_checker_passes(exported, graph, k):
    onnx.checker.check_model(str(exported / f"{graph}_part{k}.onnx"), full_check=True)


def test_manifest_describes_the_graphs_and_files(exported):
    manifest = load_manifest(exported)
    assert manifest.config == CONFIG
    assert [(p.first_layer, p.end_layer) for p in manifest.parts] == [(0, 2), (2, 4)]
    for part in manifest.parts:
        digest = hashlib.sha256((exported / part.weights_file).read_bytes()).hexdigest()
        assert part.weights_sha256 == digest
        assert set(part.graphs) == {"prompt_processor", "token_generator"}
        for kind, graph in part.graphs.items():
            assert graph.file == f"{kind}_part{part.index + 1}.onnx"
            model = onnx.load(exported / graph.file, load_external_data=False)
            assert manifest_specs(graph.inputs) == value_specs(model.graph.input)
            assert manifest_specs(graph.outputs) == value_specs(model.graph.output)
            assert graph.sequence_length == (8 if kind == "prompt_processor" else 1)
    # Spot-check the contract itself, not just its agreement with the graphs.
    first = manifest.parts[0].graphs["prompt_processor"]
    assert ("input_ids", "int32", (1, 8)) in manifest_specs(first.inputs)
    last = manifest.parts[1].graphs["token_generator"]
    assert ("logits", "float32", (1, 1, CONFIG.vocab_size)) in manifest_specs(last.outputs)


def test_single_part_tied_export_stores_the_embedding_once(tmp_path):
    config = replace(CONFIG, vocab_size=2048)
    checkpoint = open_checkpoint(write_synthetic_checkpoint(config, tmp_path / "ckpt"))
    out = tmp_path / "one"
    export_model(checkpoint, out, replace(OPTIONS, num_parts=1), progress=False)
    assert (out / "weights_part1.bin").stat().st_size <= 1.05 * 4 * num_parameters(config)


# ---------------------------------------------------------------- atomic writes


class FailingSource:
    """Raises after `allowed` tensor reads, like a disk error or Ctrl-C halfway through an export."""

    def __init__(self, inner, allowed: int):
        self.inner, self.allowed, self.calls = inner, allowed, 0

    def names(self):
        return self.inner.names()

    def shape(self, name):
        return self.inner.shape(name)

    def get(self, name):
        self.calls += 1
        if self.calls > self.allowed:
            raise RuntimeError("disk on fire")
        return self.inner.get(name)


def test_failed_export_leaves_nothing_behind(checkpoint, tmp_path):
    broken = replace(checkpoint, tensors=FailingSource(checkpoint.tensors, allowed=12))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_model(broken, out, OPTIONS, progress=False)
    assert broken.tensors.calls > 12  # it really failed midway, after writing some weights
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_reexport_keeps_the_previous_export(checkpoint, exported, tmp_path):
    out = fresh_copy(exported, tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RuntimeError):
        export_model(replace(checkpoint, tensors=FailingSource(checkpoint.tensors, 5)), out, OPTIONS, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path, out.name) == []


def test_reexport_replaces_an_existing_export(checkpoint, exported, tmp_path):
    out = fresh_copy(exported, tmp_path)
    (out / "stale.txt").write_text("from an older export")
    manifest = export_model(checkpoint, out, replace(OPTIONS, num_parts=1), progress=False)
    assert len(manifest.parts) == 1 and len(load_manifest(out).parts) == 1
    assert not (out / "stale.txt").exists()
    assert not (out / "weights_part2.bin").exists()
    assert leftovers(tmp_path, out.name) == []


def test_export_refuses_a_foreign_non_empty_folder(checkpoint, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    with pytest.raises(FileExistsError, match="photos"):
        export_model(checkpoint, out, OPTIONS, progress=False)
    assert [p.name for p in out.iterdir()] == ["holiday.jpg"]
    assert (out / "holiday.jpg").read_bytes() == b"\xff\xd8 precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_export_into_an_empty_existing_folder(checkpoint, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    export_model(checkpoint, out, replace(OPTIONS, num_parts=1), progress=False)
    assert len(load_manifest(out).parts) == 1


def test_export_folder_permissions_follow_the_umask(exported):
    """Another user (or `adb push`, or a web server) must be able to read an export, as with any new folder."""
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(exported.stat().st_mode) == 0o777 & ~umask


# ---------------------------------------------------------------- load_manifest errors


def manifest_error(folder: Path) -> str:
    with pytest.raises(ManifestError) as info:
        load_manifest(folder)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_load_manifest_missing_folder(tmp_path):
    assert manifest_error(tmp_path / "nowhere").startswith(f"{tmp_path / 'nowhere'}: ")


def test_load_manifest_folder_without_manifest(tmp_path):
    message = manifest_error(tmp_path)
    assert message.startswith(f"{tmp_path}: ") and "manifest.json" in message


def test_load_manifest_wrong_format_version(exported, tmp_path):
    folder = fresh_copy(exported, tmp_path)
    path = folder / "manifest.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"format_version": 999}))
    message = manifest_error(folder)
    assert message.startswith(f"{path}: ") and "999" in message


def test_load_manifest_invalid_json(exported, tmp_path):
    folder = fresh_copy(exported, tmp_path)
    (folder / "manifest.json").write_text("{not json")
    assert manifest_error(folder).startswith(f"{folder / 'manifest.json'}: ")


@pytest.mark.parametrize("victim", ["weights_part2.bin", "token_generator_part1.onnx", "tokenizer.json"])
def test_load_manifest_listed_file_missing(exported, tmp_path, victim):
    folder = fresh_copy(exported, tmp_path)
    (folder / victim).unlink()
    message = manifest_error(folder)
    assert message.startswith(f"{folder / 'manifest.json'}: ") and victim in message


# ---------------------------------------------------------------- CLI


def bad_checkpoints(tmp_path: Path, checkpoint_dir: Path) -> dict[str, Path]:
    mistral = fresh_copy(checkpoint_dir, tmp_path)
    config = mistral / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"model_type": "mistral"}))
    (tmp_path / "weights.txt").write_text("hello")
    return {"missing": tmp_path / "missing", "mistral": mistral, "wrong_suffix": tmp_path / "weights.txt"}


@pytest.mark.parametrize("kind", ["missing", "mistral", "wrong_suffix"])
def test_cli_bad_checkpoint_is_one_error_line(checkpoint_dir, tmp_path, capsys, kind):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    bad = bad_checkpoints(inputs, checkpoint_dir)[kind]
    out = tmp_path / "o"
    code = main(["export", "--checkpoint", str(bad), "--out", str(out), *SMALL_ARGS])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and str(bad) in lines[0]
    assert not out.exists()
    assert leftovers(tmp_path, "o") == []


def test_cli_num_parts_out_of_range(checkpoint_dir, tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["export", "--checkpoint", str(checkpoint_dir), "--out", str(out), "--num-parts", "99",
                 *SMALL_ARGS])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--num-parts" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_foreign_out_folder(checkpoint_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = main(["export", "--checkpoint", str(checkpoint_dir), "--out", str(out), *SMALL_ARGS])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {out}")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_cli_out_is_a_file(checkpoint_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.write_text("not a folder")
    code = main(["export", "--checkpoint", str(checkpoint_dir), "--out", str(out), *SMALL_ARGS])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {out}")
    assert out.read_text() == "not a folder"


def test_cli_export_succeeds(checkpoint_dir, tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["export", "--checkpoint", str(checkpoint_dir), "--out", str(out), "--num-parts", "2",
                 *SMALL_ARGS])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "error" not in captured.err
    assert str(out) in captured.out
    manifest = load_manifest(out)
    assert len(manifest.parts) == 2
    assert (manifest.sequence_length, manifest.context_length) == (8, 32)


# ---------------------------------------------------------------- resuming an interrupted export


def _stop_at_second_part(monkeypatch) -> None:
    """Make the export stop (as on Ctrl-C) when it reaches part 2."""
    from ondevice_llama.export import exporter

    real = exporter._export_part

    def export_part(checkpoint, folder, part, *args):
        if part.index == 1:
            raise KeyboardInterrupt
        return real(checkpoint, folder, part, *args)

    monkeypatch.setattr(exporter, "_export_part", export_part)


def _export_interrupted_at_second_part(checkpoint, out: Path, monkeypatch) -> None:
    """Run an export into ``out`` that stops (as on Ctrl-C) when it reaches part 2."""
    with monkeypatch.context() as patch:
        _stop_at_second_part(patch)
        with pytest.raises(KeyboardInterrupt):
            export_model(checkpoint, out, OPTIONS, progress=False)


def _count_parts(monkeypatch) -> list[int]:
    """Record which parts the export really builds."""
    from ondevice_llama.export import exporter

    real, calls = exporter._export_part, []

    def export_part(checkpoint, folder, part, *args):
        calls.append(part.index)
        return real(checkpoint, folder, part, *args)

    monkeypatch.setattr(exporter, "_export_part", export_part)
    return calls


def test_interrupted_export_resumes_with_verified_parts(checkpoint_dir, tmp_path, monkeypatch):
    """A stop after part 1 keeps it in the staging folder; the re-run reuses it (checksums verified), a
    damaged part is exported again, and the result equals an uninterrupted export."""
    from ondevice_llama.staging import staging_folder

    checkpoint = open_checkpoint(checkpoint_dir)
    out = tmp_path / "model"
    _export_interrupted_at_second_part(checkpoint, out, monkeypatch)
    staging = staging_folder(out)
    assert not out.exists() and (staging / "weights_part1.bin").exists()
    assert not (staging / "weights_part2.bin").exists()
    with monkeypatch.context() as patch:
        calls = _count_parts(patch)
        manifest = export_model(checkpoint, out, OPTIONS, progress=False)
    assert calls == [1] and not staging.exists()
    reference = export_model(checkpoint, tmp_path / "reference", OPTIONS, progress=False)
    assert [p.weights_sha256 for p in manifest.parts] == [p.weights_sha256 for p in reference.parts]
    assert load_manifest(out).parts == manifest.parts

    _export_interrupted_at_second_part(checkpoint, tmp_path / "again", monkeypatch)  # a damaged part is not trusted
    damaged = staging_folder(tmp_path / "again") / "weights_part1.bin"
    damaged.write_bytes(b"\1" + damaged.read_bytes()[1:])
    with monkeypatch.context() as patch:
        calls = _count_parts(patch)
        export_model(checkpoint, tmp_path / "again", OPTIONS, progress=False)
    assert calls == [0, 1]


def test_changed_options_do_not_resume(checkpoint_dir, tmp_path, monkeypatch):
    checkpoint = open_checkpoint(checkpoint_dir)
    _export_interrupted_at_second_part(checkpoint, tmp_path / "m", monkeypatch)
    with monkeypatch.context() as patch:
        calls = _count_parts(patch)
        export_model(checkpoint, tmp_path / "m", replace(OPTIONS, sequence_length=4), progress=False)
    assert calls == [0, 1]


@pytest.mark.parametrize("shape", ["[]", '{"key": KEY, "parts": 5}',
                                   '{"key": KEY, "parts": [{"index": 0, "record": []}]}',
                                   '{"key": KEY, "parts": [{"index": 0, "record": PART, "sha256": []}]}',
                                   '{"key": KEY, "parts": [{"index": 0, "record": PART}]}',
                                   '{"key": KEY, "parts": [{"index": 0, "record": {"index": 0}, "sha256": SHA}]}',
                                   "not json"])
def test_progress_of_the_wrong_shape_counts_as_absent(checkpoint_dir, tmp_path, monkeypatch, shape):
    """A damaged progress.json in the staging folder: the export starts over instead of raising every time."""
    from ondevice_llama.staging import PROGRESS_FILE, staging_folder

    checkpoint = open_checkpoint(checkpoint_dir)
    out = tmp_path / "model"
    _export_interrupted_at_second_part(checkpoint, out, monkeypatch)
    progress = staging_folder(out) / PROGRESS_FILE
    real = json.loads(progress.read_text())
    first = real["parts"][0]
    progress.write_text(shape.replace("KEY", json.dumps(real["key"])).replace("PART", json.dumps(first["record"]))
                        .replace("SHA", json.dumps(first["sha256"])))
    with monkeypatch.context() as patch:
        calls = _count_parts(patch)
        export_model(checkpoint, out, OPTIONS, progress=False)
    assert calls == [0, 1]
    assert load_manifest(out).parts[0].weights_sha256 == first["record"]["weights_sha256"]


def test_quiet_still_says_it_resumes(checkpoint_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model"
    argv = ["export", "--checkpoint", str(checkpoint_dir), "--out", str(out), "--num-parts", "2",
            "--precision", "fp32", *SMALL_ARGS]
    with monkeypatch.context() as patch:
        _stop_at_second_part(patch)
        assert main(argv) == 130
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "resuming the export" in err and "part(s) 1 already done and verified" in err


def test_a_damaged_cached_export_is_exported_again(checkpoint_dir, tmp_path, monkeypatch, capsys):
    """The chat's export cache: a cached export whose weights were damaged is not reused silently."""
    monkeypatch.setenv("ONDEVICE_LLAMA_CACHE", str(tmp_path / "cache"))
    chat = ["chat", "--checkpoint", str(checkpoint_dir), "--prompt", "hi", "--max-new-tokens", "3",
            "--context-length", "32"]
    assert main(chat) == 0
    first = capsys.readouterr()
    (folder,) = (tmp_path / "cache" / "exports").iterdir()
    weights = folder / "weights_part1.bin"
    weights.write_bytes(bytes(b ^ 1 for b in weights.read_bytes()[:4096]) + weights.read_bytes()[4096:])
    assert main(chat) == 0
    again = capsys.readouterr()
    assert "does not match the sha256" in again.err and "exporting again" in again.err
    assert again.out == first.out
    verify_checksums(folder, load_manifest(folder))


def test_a_damaged_cached_quantized_checkpoint_is_made_again(checkpoint, tmp_path, monkeypatch, capsys):
    from ondevice_llama.files import cache_root

    monkeypatch.setenv("ONDEVICE_LLAMA_CACHE", str(tmp_path / "cache"))
    options = replace(OPTIONS, precision="w4a16", algorithm="rtn", num_parts=1)
    export_model(checkpoint, tmp_path / "a", options, progress=False)
    (quantized,) = (cache_root() / "quantized").iterdir()
    (quantized / "quantization.json").write_text("[]")
    manifest = export_model(checkpoint, tmp_path / "b", options, progress=True)
    assert "quantizing again" in capsys.readouterr().err
    assert manifest.parts == load_manifest(tmp_path / "a").parts

"""Concurrent runs and leftovers: every folder we write is written by one process at a time (`files.folder_lock`),
so two exports to one --out, or two first-use chats on one cache, end consistent; staging folders of a writer
that was killed are removed the next time, those of a live writer are not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from ondevice_llama.cli.main import _export_options, build_parser
from ondevice_llama.config import LlamaConfig
from ondevice_llama.export import ExportOptions, export_model
from ondevice_llama.files import folder_lock, make_staging_folder, remove_stale_staging
from ondevice_llama.loading import open_checkpoint
from ondevice_llama.loading.synthetic import write_synthetic_checkpoint
from ondevice_llama.manifest import load_manifest, verify_checksums

CONFIG = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
                     num_kv_heads=2, tie_word_embeddings=True, max_position_embeddings=256)
EXPORT = ["--sequence-length", "8", "--context-length", "32", "--num-parts", "2", "--quiet"]
WAIT_S = 120


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    return write_synthetic_checkpoint(CONFIG, tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


def cli(args: list[str], cache: Path, stderr: Path) -> subprocess.Popen:
    env = os.environ | {"ONDEVICE_LLAMA_CACHE": str(cache)}
    return subprocess.Popen([sys.executable, "-m", "ondevice_llama.cli.main", *args], env=env,
                            stdout=subprocess.PIPE, stderr=open(stderr, "w"), text=True)


def wait_for_text(paths: list[Path], text: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not all(p.exists() and text in p.read_text() for p in paths):
        assert time.monotonic() < deadline, [p.read_text() for p in paths]
        time.sleep(0.05)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    out, _ = process.communicate(timeout=WAIT_S)
    return process.returncode, out


def beside(folder: Path) -> list[str]:
    """Hidden staging, replaced or lock entries beside `folder` (`.NAME.*`)."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def test_two_exports_to_one_out_end_consistent(checkpoint_dir, tmp_path):
    """An fp32 and an fp16 export of one checkpoint to one --out: both wait for the folder, then run one after the
    other; the folder holds one of them whole (manifest, weights and checksums agree), nothing else beside it."""
    checkpoint = open_checkpoint(checkpoint_dir)
    options = ExportOptions(num_parts=2, sequence_length=8, context_length=32)
    weights = {p: [part.weights_sha256 for part in export_model(checkpoint, tmp_path / p, replace(options, precision=p),
                                                                progress=False).parts] for p in ("fp32", "fp16")}
    assert weights["fp32"] != weights["fp16"]
    out = tmp_path / "out"
    logs = [tmp_path / "fp32.log", tmp_path / "fp16.log"]
    with folder_lock(out):  # both start while the folder is busy: both must wait, then take turns
        runs = [cli(["export", "--checkpoint", str(checkpoint_dir), "--out", str(out), "--precision", p, *EXPORT],
                    tmp_path / "cache", log) for p, log in zip(("fp32", "fp16"), logs, strict=True)]
        wait_for_text(logs, "waiting for process")
    results = [finish(run) for run in runs]
    assert [code for code, _ in results] == [0, 0], [log.read_text() for log in logs]
    manifest = load_manifest(out)
    verify_checksums(out, manifest)
    assert [p.weights_sha256 for p in manifest.parts] == weights[manifest.precision]
    assert beside(out) == []


def test_two_first_use_chats_on_one_cache_export_once(checkpoint_dir, tmp_path):
    """Two chats with one checkpoint on an empty cache: one exports, the other waits and reuses that export;
    both answer the same, and the cache holds one intact export."""
    chat = ["chat", "--checkpoint", str(checkpoint_dir), "--prompt", "hello", "--max-new-tokens", "6",
            "--context-length", "64"]
    cache = tmp_path / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ONDEVICE_LLAMA_CACHE", str(cache))
        from ondevice_llama.cli.cached_export import cache_folder

        folder = cache_folder(checkpoint_dir.resolve(), _export_options(build_parser().parse_args(chat)))
        logs = [tmp_path / "a.log", tmp_path / "b.log"]
        with folder_lock(folder):
            runs = [cli(chat, cache, log) for log in logs]
            wait_for_text(logs, "waiting for process")
    results = [finish(run) for run in runs]
    errors = [log.read_text() for log in logs]
    assert [code for code, _ in results] == [0, 0], errors
    assert results[0][1] == results[1][1] and results[0][1].strip()
    assert sum("exporting tiny once" in err for err in errors) == 1, errors
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]
    verify_checksums(folder, load_manifest(folder))


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ondevice_llama.files import folder_lock, make_staging_folder
    out = Path(sys.argv[1])
    with folder_lock(out):
        staging = make_staging_folder(out)
        (staging / "weights.bin").write_bytes(b"0" * 1000)
        print(staging, flush=True)
        time.sleep(600)
""")


def hold(out: Path) -> tuple[subprocess.Popen, Path]:
    """A process writing `out` (holding its lock, with a staging folder), stopped in the middle."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    return process, Path(process.stdout.readline().strip())


def test_a_killed_writers_staging_folder_is_removed_a_live_ones_is_kept(tmp_path):
    killed, killed_staging = hold(tmp_path / "a")
    live, live_staging = hold(tmp_path / "b")
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=WAIT_S)
        assert killed_staging.is_dir() and live_staging.is_dir()
        with folder_lock(tmp_path / "c"):
            make_staging_folder(tmp_path / "c")  # any write into this folder cleans up beside it
        assert not killed_staging.exists()
        assert live_staging.is_dir()  # its writer still holds the lock
    finally:
        live.kill()
        live.wait(timeout=WAIT_S)
    remove_stale_staging(tmp_path)
    assert not live_staging.exists()


def test_a_folder_moved_aside_by_a_killed_rename_is_put_back(tmp_path):
    """replace_folder renames the old export aside before moving the new one in; killed in between, the old one
    comes back."""
    (tmp_path / ".model.old-abcd1234").mkdir()
    (tmp_path / ".model.old-abcd1234" / "manifest.json").write_text("{}")
    (tmp_path / ".other.old-abcd1234").mkdir()
    (tmp_path / "other").mkdir()  # its replacement did arrive: the old one is only a leftover
    for name in ("model", "other"):  # what a killed writer leaves: its lock file, unlocked
        (tmp_path / f".{name}.lock").write_text("12345")
    (tmp_path / ".notes.old-20240101").mkdir()  # a folder of the user's that merely looks like ours: no lock file
    remove_stale_staging(tmp_path)
    assert (tmp_path / "model" / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.old-20240101", "model", "other"]


def test_a_busy_folder_with_a_timeout_is_one_error_line(tmp_path):
    live, _ = hold(tmp_path / "busy")
    try:
        with pytest.raises(OSError) as caught, folder_lock(tmp_path / "busy", timeout=0.3):
            pass
    finally:
        live.kill()
        live.wait(timeout=WAIT_S)
    assert caught.value.filename == str(tmp_path / "busy")
    assert f"process {live.pid} is writing it" in caught.value.strerror


def test_the_lock_is_reentrant_and_leaves_nothing_behind(tmp_path):
    with folder_lock(tmp_path / "m"), folder_lock(tmp_path / "m"):
        assert (tmp_path / ".m.lock").exists()
    assert list(tmp_path.iterdir()) == []

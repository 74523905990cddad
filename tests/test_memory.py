"""Host memory helpers, and weight reading that does not keep a checkpoint resident."""

from __future__ import annotations

import gc
import mmap
from pathlib import Path

import numpy as np
import pytest

from ondevice_llama import memory
from ondevice_llama.loading import safetensors_reader
from ondevice_llama.loading.safetensors_reader import SafetensorsFile, write_safetensors
from ondevice_llama.memory import PeakRssSampler, current_rss_bytes

MB = 2**20


def test_memory_figures_are_sane():
    total, available = memory.total_bytes(), memory.available_bytes()
    assert 256 * MB < total < 2**50
    assert 0 < available < 2 * total + 2**40  # swap may add to it
    rss = current_rss_bytes()
    assert 10 * MB < rss < total
    assert memory.peak_rss_bytes() >= 0.9 * rss


def test_peak_sampler_sees_a_phase_peak_after_the_memory_is_freed():
    gc.collect()
    with PeakRssSampler(interval=0.01) as sampler:
        # An anonymous mapping of its own, written, so resident: pages the allocator kept from earlier tests
        # in this process cannot stand in for new ones, as they could for a numpy array.
        block = mmap.mmap(-1, 64 * MB)
        block.write(b"\1" * (64 * MB))
        sampler.sample()
        block.close()
    assert sampler.growth_bytes >= 60 * MB
    assert sampler.peak_bytes >= sampler.start_bytes + 60 * MB
    # The peak above is read after the block was freed: remembered. Whether the allocator returns those pages
    # at once depends on what ran before in the process, so the current RSS is not asserted.


def test_chunked_reads_convert_exactly(tmp_path, monkeypatch):
    """Every stored dtype, read through chunks smaller than one tensor, gives the exact float32 values."""
    rng = np.random.default_rng(0)
    wide = rng.standard_normal((37, 29)).astype(np.float32)
    tensors = {"f32": wide, "f16": wide.astype(np.float16), "i8": (wide * 10).astype(np.int8)}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    monkeypatch.setattr(safetensors_reader, "READ_CHUNK_BYTES", 100)
    file = SafetensorsFile(tmp_path / "x.safetensors")
    for name, array in tensors.items():
        got = file.read(name)
        assert got.dtype == np.float32 and got.shape == array.shape
        np.testing.assert_array_equal(got, array.astype(np.float32))


def test_reading_a_whole_file_keeps_rss_far_below_its_size(tmp_path):
    """Stream every tensor of a 128 MB float16 file: memory is one tensor at a time, not the file (a memory
    map kept open would leave every page read resident)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "big.safetensors"
    block = rng.standard_normal(2 * MB).astype(np.float16)  # 4 MB stored, 8 MB as float32
    write_safetensors(path, {f"t{i}": block.reshape(1024, 2048) for i in range(32)})
    size = path.stat().st_size
    assert size > 128 * MB
    file = SafetensorsFile(path)
    file.read("t0")
    gc.collect()
    checksum = 0.0
    with PeakRssSampler(interval=0.005) as sampler:
        for name in file.names():
            checksum += float(file.read(name)[0, 0])
    assert sampler.growth_bytes < size / 4, f"RSS grew {sampler.growth_bytes / MB:.0f} MB reading {size / MB:.0f} MB"
    assert checksum == 32 * float(block[0])


def _file_backed_rss_bytes() -> int:
    """Resident pages mapped from files (RssFile in /proc/self/status): what a kept memory map would hold.
    Anonymous memory is left out: whether freed arrays go back to the OS depends on the allocator's state."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssFile in /proc/self/status")


def test_reading_a_gguf_does_not_keep_it_resident(default_path):
    """The default model's GGUF: after dequantizing every tensor, none of the file's pages stay mapped."""
    from ondevice_llama.loading import open_checkpoint

    if not default_path.is_file():
        pytest.skip("default model not installed")
    checkpoint = open_checkpoint(default_path)
    gc.collect()
    before = _file_backed_rss_bytes()
    total = 0
    for name in checkpoint.tensors.names():
        total += checkpoint.tensors.get(name).size
    gc.collect()
    grown = _file_backed_rss_bytes() - before
    assert total > 100_000_000  # every weight was read
    assert grown < default_path.stat().st_size / 4, f"file-backed RSS grew {grown / MB:.0f} MB"


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux")
def test_release_free_memory_returns_a_fragmented_heap():
    """Freed arrays served from the heap stay resident until trimmed (glibc raises its mmap threshold after
    a large block is freed); `release_free_memory` gives them back."""
    import ctypes

    try:
        assert ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    big = np.ones(16 * MB // 8)
    del big  # raises glibc's dynamic mmap threshold to 16 MB
    arrays = [np.ones(MB // 8) for _ in range(100)]  # now served from the heap
    keep = arrays[-1]  # holds the heap's top, so freeing the rest leaves a hole the heap cannot shrink past
    del arrays
    gc.collect()
    before = current_rss_bytes()
    memory.release_free_memory()
    assert before - current_rss_bytes() > 50 * MB
    assert keep.sum() == MB // 8

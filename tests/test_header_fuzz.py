"""Seeded fuzzing of the GGUF and safetensors header readers.

Each case applies one to three random byte-level mutations (bit flips, byte changes, small additions to a
little-endian count or offset, insertions, deletions, truncation) to the header region of a small valid file,
as a damaged disk or a bad copy would, and opens the result as a checkpoint. The outcome must be a one-line
ValueError or OSError naming the file (what the CLI turns into exit 2), or a checkpoint whose every weight
equals the original's: never another exception, a crash, a hang or a memory blow-up. The cases run in a child
process with a time and memory limit, so that a crash or a hang fails the test instead of the test run.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ondevice_llama.config import LlamaConfig

from .tiny_files import gguf_bytes, gguf_spec, header_size, tensor_info_region

CASES = 400  # per format
SEED = 20240610
MEMORY_LIMIT = 6 << 30  # address space of the child: a blow-up raises MemoryError instead of swapping
RSS_LIMIT = 1 << 30
TIME_LIMIT_S = 240  # both formats together; about 15 s here
CONFIG = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, max_position_embeddings=256)
PLAUSIBLE = b'0123456789"[]{},: .-eFBIU'


OPERATORS = ("bit", "byte", "plausible", "digit", "add32", "add64", "insert", "delete", "truncate")
WEIGHTS = (0.2, 0.15, 0.15, 0.15, 0.1, 0.1, 0.05, 0.05, 0.05)


def mutate(data: bytes, region: int, focus: tuple[int, int], rng: np.random.Generator) -> tuple[bytes, str]:
    """One to three mutations inside data[:region], half of them inside `focus` (where the tensor table is);
    returns the bytes and a description."""
    out, done = bytearray(data), []
    for _ in range(int(rng.integers(1, 4))):
        low, high = focus if rng.random() < 0.5 else (0, region)
        high = min(high, len(out))
        if high <= low:
            break
        at = int(rng.integers(low, high))
        kind = str(rng.choice(OPERATORS, p=WEIGHTS))
        if kind == "bit":
            out[at] ^= 1 << int(rng.integers(0, 8))
        elif kind == "byte":
            out[at] = int(rng.integers(0, 256))
        elif kind == "plausible":
            out[at] = PLAUSIBLE[int(rng.integers(0, len(PLAUSIBLE)))]
        elif kind == "digit":
            digits = [i for i in range(low, high) if 48 <= out[i] <= 57]
            at = digits[int(rng.integers(0, len(digits)))] if digits else at
            out[at] = 48 + int(rng.integers(0, 10))
        elif kind in ("add32", "add64"):
            width = 4 if kind == "add32" else 8
            if at + width <= len(out):
                value = int.from_bytes(out[at:at + width], "little")
                delta = int(rng.choice([-1, 1, -32, 32, 64, 1 << 20, 1 << 31]))
                out[at:at + width] = ((value + delta) % (1 << (8 * width))).to_bytes(width, "little")
        elif kind == "insert":
            out.insert(at, int(rng.integers(0, 256)))
        elif kind == "delete":
            del out[at]
        else:
            del out[at:]
        done.append(f"{kind}@{at}")
    return bytes(out), " ".join(done)


def _open_and_read(path: Path) -> dict[str, np.ndarray]:
    from ondevice_llama.loading import open_checkpoint

    checkpoint = open_checkpoint(path)
    return {name: checkpoint.tensors.get(name) for name in checkpoint.tensors.names()}


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


def _peak_rss() -> int:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(kind: str, folder: str, count: int, seed: int, results: str) -> None:
    """Run the cases of one format in this (child) process, one JSON line per case."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    root = Path(folder)
    if kind == "gguf":
        original = root / "original.gguf"
        region, focus = header_size(gguf_spec()), tensor_info_region(gguf_spec())
        target = root / "mutant.gguf"
    else:
        original = root / "original" / "model.safetensors"
        region = 8 + int.from_bytes(original.read_bytes()[:8], "little")
        focus = (8, region)
        target = root / "mutant" / "model.safetensors"
    reference = _open_and_read(original.parent if kind != "gguf" else original)
    data = original.read_bytes()
    rng = np.random.default_rng(seed)
    with open(results, "w") as out:
        for i in range(count):
            mutant, how = mutate(data, region, focus, rng)
            target.write_bytes(mutant)
            opened = target if kind == "gguf" else target.parent
            started = time.perf_counter()
            try:
                outcome = "same" if _same(_open_and_read(opened), reference) else "DIFFERENT"
                message = ""
            except (ValueError, OSError) as e:
                message = str(e)
                clean = "\n" not in message and message.startswith(str(opened))
                outcome = "error" if clean else "UNCLEAN"
            except BaseException as e:  # noqa: BLE001 - any other exception is what this test looks for
                outcome, message = "TRACEBACK", f"{type(e).__name__}: {e}"
            row = {"case": i, "mutation": how, "outcome": outcome, "message": message[:300],
                   "seconds": round(time.perf_counter() - started, 3), "rss_bytes": _peak_rss()}
            out.write(json.dumps(row) + "\n")
            out.flush()


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Path:
    from ondevice_llama.loading.synthetic import write_synthetic_checkpoint

    root = tmp_path_factory.mktemp("fuzz")
    (root / "original.gguf").write_bytes(gguf_bytes(gguf_spec()))
    write_synthetic_checkpoint(CONFIG, root / "original", seed=0, dtype="bfloat16")
    write_synthetic_checkpoint(CONFIG, root / "mutant", seed=0, dtype="bfloat16")  # its side files
    return root


@pytest.mark.parametrize("kind", ["gguf", "safetensors"])
def test_header_fuzz_never_misloads(kind, originals, tmp_path):
    results = tmp_path / "results.jsonl"
    repo = Path(__file__).resolve().parents[1]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    code = (f"from tests.test_header_fuzz import worker; "
            f"worker({kind!r}, {str(originals)!r}, {CASES}, {SEED}, {str(results)!r})")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=TIME_LIMIT_S)
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    last = rows[-1]["mutation"] if rows else "none"
    assert done.returncode == 0, f"the child died after {len(rows)} cases (last: {last}): {done.stderr[-2000:]}"
    assert len(rows) == CASES
    bad = [r for r in rows if r["outcome"] in ("DIFFERENT", "UNCLEAN", "TRACEBACK")]
    assert not bad, bad[:5]
    assert max(r["seconds"] for r in rows) < 10, max(rows, key=lambda r: r["seconds"])
    assert max(r["rss_bytes"] for r in rows) < RSS_LIMIT
    outcomes = {o: sum(r["outcome"] == o for r in rows) for o in ("error", "same")}
    assert outcomes["error"] > CASES // 2, outcomes  # the mutations do reach the checks
    print(f"{kind}: {CASES} mutations, {outcomes}, {time.perf_counter() - started:.1f} s")

"""Safe writes: build in a temporary folder beside the destination, rename into place when complete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def cache_root() -> Path:
    """Where derived artefacts (cached exports, quantized checkpoints) live; $ONDEVICE_LLAMA_CACHE overrides."""
    return Path(os.environ.get("ONDEVICE_LLAMA_CACHE", Path.home() / ".cache" / "ondevice-llama"))


def fingerprint(path: Path) -> list:
    """Identity of a file or folder for cache keys: resolved path, and size and mtime of each file in it."""
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [str(path)] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def make_staging_folder(out: Path) -> Path:
    """A temporary folder beside `out`, readable like any folder the user makes (mkdtemp's is private)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished export into place; an earlier export there is removed only afterwards."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
    out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        old.rename(out)  # put the earlier export back
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_versioned_json(path: Path, fmt: str, version: int, what: str) -> dict:
    """A JSON file of format `fmt` and `version`, or a one-line ValueError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read {what} ({e})") from None
    if not isinstance(data, dict) or data.get("format") != fmt or data.get("format_version") != version:
        raise ValueError(f"{path}: not an ondevice-llama {what} version {version}")
    return data


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()

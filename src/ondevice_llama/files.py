"""Files we read and folders we write.

Reading: one checked JSON reader, whose errors are one line naming the file. Writing: a folder is built in a
staging folder beside its destination and renamed into place when complete, under an exclusive lock on the
destination, so that two processes never write one folder at once and a folder that looks complete is
complete. Staging folders whose writer was killed are removed the next time their parent is written to.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any


class FileError(ValueError):
    """An unusable file or folder; the message starts with its path."""

    def __init__(self, path: Path | str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)


def cache_root() -> Path:
    """Where derived artefacts (cached exports, quantized checkpoints, calibration text, verified checksums)
    live; $ONDEVICE_LLAMA_CACHE overrides."""
    return Path(os.environ.get("ONDEVICE_LLAMA_CACHE", Path.home() / ".cache" / "ondevice-llama"))


def cache_key(*identity: Any) -> str:
    """The one cache-key rule: the sha256 (hex) of what identifies a derived artefact, as JSON with sorted keys
    (anything JSON does not know, such as a Path, as its str), followed by the package version, so that an
    artefact made by another version is never reused."""
    text = json.dumps([*identity, version("ondevice-llama")], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_path(kind: str, name: str, *identity: Any, suffix: str = "") -> Path:
    """Where a derived artefact of `kind` lives: cache_root()/kind/<name>-<12 hex digits of cache_key><suffix>."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)
    return cache_root() / kind / f"{safe}-{cache_key(*identity)[:12]}{suffix}"


def fingerprint(path: Path) -> list:
    """Identity of a file or folder for cache keys: resolved path, and size and mtime of each file in it."""
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [str(path)] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


# ---------------------------------------------------------------- reading


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a repeated key is an error (json.loads would silently keep the last one)."""
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {repeated!r} appears twice")
    return data


def parse_json(raw: bytes, path: Path | str, what: str, error: type[FileError] = FileError) -> Any:
    """JSON from bytes read from `path`: bad UTF-8, invalid JSON or a repeated key is a one-line `error`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(path, f"{what} is not UTF-8 text (byte {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except ValueError as e:  # JSONDecodeError, or a repeated key
        raise error(path, f"{what} is not valid JSON ({e})") from None


def read_json(path: Path | str, what: str, error: type[FileError] = FileError) -> Any:
    """The JSON value in `path`; an unreadable file is a one-line `error` naming it."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise error(path, f"cannot read the {what} ({e.strerror or e})") from None
    return parse_json(raw, path, what, error)


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (for messages)."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def read_json_object(path: Path | str, what: str, error: type[FileError] = FileError) -> dict[str, Any]:
    """`read_json`, refusing anything but a JSON object."""
    data = read_json(path, what, error)
    if not isinstance(data, dict):
        raise error(path, f"the {what} must be a JSON object, not {json_type(data)}")
    return data


def read_versioned_json(path: Path, fmt: str, version: int, what: str) -> dict:
    """A JSON file of format `fmt` and `version`, or a one-line ValueError naming the file."""
    data = read_json(path, what)
    if not isinstance(data, dict) or data.get("format") != fmt or data.get("format_version") != version:
        raise FileError(path, f"not an ondevice-llama {what} version {version}")
    return data


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_matches(path: Path, expected: str) -> bool:
    """Whether `path` hashes to `expected`, hashing it only the first time: a match is remembered in the cache
    folder under the file's path, size and mtime, so a file changed since (even in place) is hashed again."""
    path = Path(path).resolve()
    stat = path.stat()
    stamp = cache_root() / "verified" / cache_key(str(path), stat.st_size, stat.st_mtime_ns, expected)
    if stamp.exists():
        return True
    if sha256_file(path) != expected:
        return False
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.touch()
    except OSError:  # a read-only cache only costs hashing again next time
        pass
    return True


# ---------------------------------------------------------------- locking


_held: dict[str, list] = {}  # lock file -> [owning thread, fd, depth]: locks this process holds
_held_guard = threading.Lock()


def _canonical(folder: Path | str) -> Path:
    """`folder` with its parent resolved (created if needed), so that one folder has one lock whatever the path."""
    folder = Path(folder).absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    return folder.parent.resolve() / folder.name


def lock_path(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.lock")


def _try_flock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path` (created if needed), or None if another holder has it.

    The holder deletes the file when it lets go; a lock taken on a file deleted meanwhile is worthless, so
    it is taken again on the new file."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


@contextmanager
def folder_lock(folder: Path | str, timeout: float | None = None) -> Iterator[None]:
    """Hold the exclusive right to write `folder` (a `.NAME.lock` file beside it) for the `with` block.

    Another process holding it is waited for, saying so once on stderr; with `timeout` (seconds), a one-line
    OSError naming the folder instead. Re-entrant within a thread, so that a command holding the lock may call
    a writer that takes it too. Write errors that name no file (a full disk) name the folder."""
    folder = _canonical(folder)
    path = lock_path(folder)
    me = threading.get_ident()
    with _held_guard:
        entry = _held.get(str(path))
        if entry is not None and entry[0] == me:
            entry[2] += 1
        else:
            entry = None
    if entry is None:
        fd = _acquire(path, folder, timeout)
        with _held_guard:
            entry = _held[str(path)] = [me, fd, 1]
    try:
        with naming_write_errors(folder):
            yield
    finally:
        with _held_guard:
            entry[2] -= 1
            last = entry[2] == 0
            if last:
                del _held[str(path)]
        if last:
            path.unlink(missing_ok=True)  # before letting go: see _try_flock
            os.close(entry[1])


def _acquire(path: Path, folder: Path, timeout: float | None) -> int:
    started, said = time.monotonic(), False
    while (fd := _try_flock(path)) is None:
        waited = time.monotonic() - started
        if timeout is not None and waited >= timeout:
            raise OSError(errno.EBUSY, f"{_holder(path)} is writing it (waited {waited:.0f} s); try again later",
                          str(folder))
        if not said:
            print(f"waiting for {_holder(path)}, which is writing {folder}", file=sys.stderr, flush=True)
            said = True
        time.sleep(0.1)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


@contextmanager
def naming_write_errors(folder: Path) -> Iterator[None]:
    """An OSError without a file name (ENOSPC from a write) is re-raised naming `folder`."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(folder)) from None


# ---------------------------------------------------------------- staging folders

STAGING_MARK, OLD_MARK = ".partial-", ".old-"
# .NAME.partial-XXXXXXXX (make_staging_folder) and .NAME.old-XXXXXXXX (replace_folder; XXXXXXXX: mkdtemp's suffix,
# or ".partial" after the exporter's own staging folder)
_LEFTOVER = re.compile(r"\.(?P<name>.+)(?P<mark>\.partial-|\.old-)(?:[a-z0-9_]{8}|\.partial)")


def remove_stale_staging(parent: Path, own: Path | None = None) -> None:
    """Delete the staging folders in `parent` that no live process is writing: a killed export or quantization
    leaves them behind (gigabytes at 7B). A writer holds its destination's lock, so a leftover whose lock file is
    there (its writer was killed before deleting it) but free is stale; `own` is a destination the caller holds
    the lock for. Folders of our names without a lock file are not ours to judge and stay. A `.old-` folder
    whose destination is missing (killed mid-rename) is put back."""
    for leftover in sorted(Path(parent).resolve().glob(".*.*-*")):
        match = _LEFTOVER.fullmatch(leftover.name)
        if match is None or not leftover.is_dir():
            continue
        folder, mark = leftover.with_name(match["name"]), match["mark"]
        if own is not None and folder == _canonical(own):
            _discard(leftover, folder, mark)
            continue
        path = lock_path(folder)
        with _held_guard:
            if str(path) in _held:  # this process is writing it
                continue
        if not path.exists() or (fd := _try_flock(path)) is None:
            continue
        try:
            _discard(leftover, folder, mark)
        finally:
            path.unlink(missing_ok=True)
            os.close(fd)


def _discard(leftover: Path, folder: Path, mark: str) -> None:
    if mark == OLD_MARK and not folder.exists():
        leftover.rename(folder)
    else:
        shutil.rmtree(leftover, ignore_errors=True)


def make_staging_folder(out: Path) -> Path:
    """A temporary folder beside `out`, readable like any folder the user makes (mkdtemp's is private).

    Call it holding `folder_lock(out)`: stale staging folders beside `out` are removed first."""
    out = _canonical(out)
    remove_stale_staging(out.parent, own=out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_MARK}", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished export into place; an earlier export there is removed only afterwards."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}{OLD_MARK}{tmp.name[-8:]}")
    out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        old.rename(out)  # put the earlier export back
        raise
    shutil.rmtree(old, ignore_errors=True)

"""Export a checkpoint once into a cache folder and reuse it, so `chat --checkpoint` starts fast."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from ..files import cache_path, fingerprint, folder_lock
from ..manifest import FORMAT_VERSION, ManifestError, load_manifest, verify_checksums


def cached_export(checkpoint_path: Path | None, options) -> Path:
    """The folder of an export of `checkpoint_path` with `options`, exporting it on first use."""
    from ..export import export_model
    from ..loading import default_checkpoint_path, open_checkpoint

    path = (checkpoint_path or default_checkpoint_path()).resolve()
    folder = cache_folder(path, options)
    with folder_lock(folder):  # a second first-use chat waits for this export, then reuses it
        if _intact(folder):
            return folder
        checkpoint = open_checkpoint(path)  # a bad checkpoint is reported before anything is said
        print(f"exporting {path.name} once into {folder} (reused next time)", file=sys.stderr)
        export_model(checkpoint, folder, options)
    return folder


def cache_folder(path: Path, options) -> Path:
    """Where the export of checkpoint `path` with `options` is cached: a key of the file(s) and the options."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    return cache_path("exports", path.stem, fingerprint(path), asdict(options), FORMAT_VERSION)


def _intact(folder: Path) -> bool:
    """Whether `folder` holds a complete export whose files match their checksums (a damaged one is redone)."""
    if not folder.exists():
        return False
    try:
        verify_checksums(folder, load_manifest(folder))
    except ManifestError as e:
        print(f"{e}; exporting again", file=sys.stderr)
        return False
    return True

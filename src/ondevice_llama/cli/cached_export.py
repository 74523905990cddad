"""Export a checkpoint once into a cache folder and reuse it, so `chat --checkpoint` starts fast."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

from ..files import cache_root, fingerprint
from ..manifest import FORMAT_VERSION, ManifestError, load_manifest


def cached_export(checkpoint_path: Path | None, options) -> Path:
    """The folder of an export of `checkpoint_path` with `options`, exporting it on first use."""
    from ..export import export_model
    from ..loading import default_checkpoint_path, open_checkpoint

    path = (checkpoint_path or default_checkpoint_path()).resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    key = json.dumps([fingerprint(path), asdict(options), FORMAT_VERSION, version("ondevice-llama")], sort_keys=True,
                     default=str)
    folder = cache_root() / "exports" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    try:
        load_manifest(folder)
        return folder
    except ManifestError:
        pass
    print(f"exporting {path.name} once into {folder} (reused next time)", file=sys.stderr)
    export_model(open_checkpoint(path), folder, options)
    return folder

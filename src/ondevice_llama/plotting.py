"""Plots are optional (the `plot` extra): one place that imports matplotlib headless, or says what to install."""

from __future__ import annotations

from types import ModuleType

INSTALL_HINT = "pip install 'ondevice-llama[plot]' (matplotlib)"


def require_pyplot(option: str = "--plot") -> ModuleType:
    """matplotlib.pyplot with the file-only Agg backend; a one-line error naming `option` when it is missing.

    Commands call it before measuring, so a missing extra costs nothing.
    """
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise RuntimeError(f"{option}: plots need matplotlib, which is not installed: {INSTALL_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

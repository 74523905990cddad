"""The PyTorch reference model: the definition of correct for every later stage."""

from .reference import Transformer, build_reference, load_reference

__all__ = ["Transformer", "build_reference", "load_reference"]

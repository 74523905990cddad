"""Compile an export for a Snapdragon NPU: per part one QNN context binary holding the prompt processor and the
token generator with shared weights, EPContext wrappers our runtime loads, and a Genie bundle."""

from .compiler import CompileError, compile_export, weight_options

__all__ = ["CompileError", "compile_export", "weight_options"]

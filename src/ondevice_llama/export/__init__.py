"""Export: build per-part prompt-processor and token-generator ONNX graphs straight from weights."""

from .exporter import ExportOptions, default_context_length, default_num_parts, export_model, plan_parts

__all__ = ["ExportOptions", "default_context_length", "default_num_parts", "export_model", "plan_parts"]

"""Export: build per-part prompt-processor and token-generator ONNX graphs straight from weights."""

from .exporter import export_model
from .plan import ExportOptions, ExportPlan, default_context_length, default_num_parts, plan_export, plan_parts

__all__ = ["ExportOptions", "ExportPlan", "default_context_length", "default_num_parts", "export_model", "plan_export",
           "plan_parts"]

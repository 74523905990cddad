"""Quantization: pure quantizers on arrays; module swapping and encodings live elsewhere."""

from .quantizers import QuantizedWeight, choose_qparams, dequantize, quantize, quantize_weight

__all__ = ["QuantizedWeight", "choose_qparams", "dequantize", "quantize", "quantize_weight"]

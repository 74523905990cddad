"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding error
onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

Symmetric codes, per output channel or block-wise along the input dimension (scales chosen when a block
starts, from the error-updated weights).
"""

from __future__ import annotations

import numpy as np
import torch

from .quantizers import QuantizedWeight, choose_qparams, dequantize


def gptq_quantize(weight: np.ndarray, hessian: torch.Tensor, bits: int, block_size: int | None,
                  damp: float = 0.01, step: int = 128) -> QuantizedWeight:
    """weight [out, in] float32; hessian [in, in] = sum of x^T x over calibration inputs."""
    w = torch.from_numpy(weight.astype(np.float32)).double()
    h = hessian.double().clone()
    cols = w.shape[1]
    group = block_size or cols
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    qmax = 2 ** (bits - 1) - 1
    codes = torch.zeros_like(w, dtype=torch.int8)
    scales = np.zeros((w.shape[0], cols // group), np.float32)
    for start in range(0, cols, step):
        end = min(start + step, cols)
        block, errors = w[:, start:end].clone(), torch.zeros_like(w[:, start:end])
        block_inv = h_inv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if col % group == 0:  # a block starts: its scale comes from the weights as updated so far
                source = block[:, i:i + group] if group <= end - col else w[:, col:col + group]
                scales[:, col // group] = choose_qparams(source.float().numpy(), bits, group)[0][:, 0]
            scale = torch.from_numpy(scales[:, col // group]).double()
            q = torch.clamp(torch.round(block[:, i] / scale), -qmax - 1, qmax)
            codes[:, col] = q.to(torch.int8)
            error = (block[:, i] - q * scale) / block_inv[i, i]
            block[:, i:] -= error[:, None] * block_inv[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    codes_np = codes.numpy()
    result = dequantize(codes_np, scales, None, group)
    return QuantizedWeight(codes_np, scales, None, bits, group, float(np.abs(result - weight).max()))

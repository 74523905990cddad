"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding error
onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

Symmetric codes, per output channel or block-wise along the input dimension. Options:

- `act_order` (GPTQ's "desc_act"): visit columns by decreasing Hessian diagonal, so the inputs that carry
  the most energy are rounded first, while many columns are still left to absorb their error. Block scales
  are then "static": chosen up front from the original weights in the original column order, so the
  blocks stay contiguous (what the on-device format stores) whatever the visiting order.
- `clip_search`: each group's scale is the absmax scale shrunk by the factor (from `CLIP_GRID`) that gives
  the smallest squared rounding error, weighted by the Hessian diagonal (1.0 is on the grid, so this
  never does worse than absmax on that measure).
- without `act_order`, block scales are chosen when a block starts, from the error-updated weights.
- `refit_scales`: once the codes are fixed, every row's scales are solved for jointly by least squares on
  the layer's output error, tr((W - S C) H (W - S C)^T): the scales GPTQ chose before rounding are not the
  best ones for the codes it ended with.
- `scale_bits`: block scales on the LPBQ grid (`quantizers.lpbq_scales`) before the column loop, so that GPTQ
  pushes the grid's error onto later columns too; refit scales are put back on it at the end.
"""

from __future__ import annotations

import numpy as np
import torch

from .quantizers import QuantizedWeight, dequantize, lpbq_scales, lpbq_unit, on_lpbq_grid

CLIP_GRID = tuple(1.0 - 0.02 * i for i in range(26))  # shrink factors 1.00, 0.98, ..., 0.50


def search_scales(w: torch.Tensor, bits: int, group_size: int, importance: torch.Tensor | None = None,
                  grid: tuple[float, ...] = CLIP_GRID) -> torch.Tensor:
    """Symmetric scales [out, groups] minimizing sum importance[col] * (w - dequantized w)^2 per group.

    w: [out, in]; importance: [in] non-negative column weights (None: plain MSE). Shrink factors below 1
    clip the group's largest weights to get a finer grid for the rest.
    """
    out, cols = w.shape
    if cols % group_size:
        raise ValueError(f"input size {cols} is not a multiple of the block size {group_size}")
    qmax = 2 ** (bits - 1) - 1
    absmax = w.reshape(out, cols // group_size, group_size).abs().amax(dim=-1).double()
    g = w.reshape(out, cols // group_size, group_size).float()  # the search itself in fp32 (fast)
    weights = (torch.ones(cols) if importance is None else importance.float()).reshape(1, cols // group_size,
                                                                                    group_size)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    best_scale, best_error = absmax / qmax, None
    work = torch.empty_like(g)
    for shrink in grid:
        scale = absmax * shrink / qmax
        s = scale.float()[..., None]
        torch.div(g, s, out=work).round_().clamp_(-qmax - 1, qmax).mul_(s).sub_(g).square_().mul_(weights)
        error = work.sum(dim=-1, dtype=torch.float64)
        if best_error is None:
            best_scale, best_error = scale, error
        else:
            better = error < best_error
            best_scale, best_error = torch.where(better, scale, best_scale), torch.where(better, error, best_error)
    return best_scale.to(w.dtype)


def _scales(w: torch.Tensor, bits: int, group_size: int, clip_search: bool, importance: torch.Tensor) -> torch.Tensor:
    if clip_search:
        return search_scales(w, bits, group_size, importance)
    qmax = 2 ** (bits - 1) - 1
    absmax = w.reshape(w.shape[0], -1, group_size).abs().amax(dim=-1)
    return torch.where(absmax > 0, absmax, torch.full_like(absmax, float(qmax))) / qmax


class FactorCache:
    """The last inverse-Hessian factor `gptq_quantize` computed, for the next call given the very same Hessian
    tensor: q/k/v (and gate/up) share one input and so one Hessian, which is then factored once. One cache per
    layer being quantized, passed explicitly (`factors=`)."""

    def __init__(self):
        self._key: tuple | None = None
        self._value: tuple[torch.Tensor, np.ndarray] | None = None

    def get(self, hessian: torch.Tensor, damp: float, act_order: bool) -> tuple[torch.Tensor, np.ndarray] | None:
        key = self._key
        return self._value if key is not None and key[0] is hessian and key[1:] == (damp, act_order) else None

    def put(self, hessian: torch.Tensor, damp: float, act_order: bool, value: tuple[torch.Tensor, np.ndarray]
            ) -> None:
        self._key, self._value = (hessian, damp, act_order), value


def _inverse_factor(hessian: torch.Tensor, h: torch.Tensor, damp: float, act_order: bool,
                    factors: FactorCache | None) -> tuple[torch.Tensor, np.ndarray]:
    """The visiting order and the upper Cholesky factor U of the damped, permuted H^-1 (H^-1 = U^T U).

    With J the reversal, chol(J H J) = L gives U = J L^-1 J: one Cholesky and one triangular solve. With
    `factors`, a factor already computed there for this very Hessian tensor is reused.
    """
    cached = factors.get(hessian, damp, act_order) if factors is not None else None
    if cached is not None:
        return cached
    cols = h.shape[0]
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(cols)
    h = h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
    lower = torch.linalg.cholesky(h.flip(0, 1))
    factor = torch.linalg.solve_triangular(lower, torch.eye(cols, dtype=h.dtype), upper=False).flip(0, 1).numpy()
    if factors is not None:
        factors.put(hessian, damp, act_order, (perm, factor))
    return perm, factor


REFIT_ROWS = 256  # rows per least-squares batch in `refit_scales` (bounds its memory)


def refit_scales(weight: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, hessian: torch.Tensor,
                 group: int) -> torch.Tensor:
    """Per row, the block scales s minimizing (w - C s)^T H (w - C s) for fixed codes (float64 in and out).

    weight, codes [out, in]; scales [out, groups]; hessian [in, in]. A tiny ridge towards the given scales
    keeps blocks whose codes are all zero (or nearly) where they were; a solution that is not positive and
    at least a tenth of the given scale is not taken for that block.
    """
    out, cols = weight.shape
    blocks = cols // group
    h_blocks = hessian.reshape(cols, blocks, group)
    refit = scales.clone()
    for begin in range(0, out, REFIT_ROWS):
        c = codes[begin:begin + REFIT_ROWS].reshape(-1, blocks, group)
        s0 = scales[begin:begin + REFIT_ROWS]
        hc = torch.einsum("icj,rcj->ric", h_blocks, c)  # H times each block's codes alone: [rows, in, blocks]
        system = torch.einsum("rbi,rbic->rbc", c, hc.reshape(-1, blocks, group, blocks))
        rhs = torch.einsum("rbi,rbi->rb", c, (weight[begin:begin + REFIT_ROWS] @ hessian).reshape(-1, blocks, group))
        ridge = 1e-6 * torch.diagonal(system, dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)[:, None]
        system = system + torch.diag_embed(ridge.expand(-1, blocks))
        s = torch.linalg.solve(system, rhs + ridge * s0)
        refit[begin:begin + REFIT_ROWS] = torch.where((s > 0.1 * s0) & torch.isfinite(s), s, s0)
    return refit


def gptq_quantize(weight: np.ndarray, hessian: torch.Tensor, bits: int, block_size: int | None,
                  damp: float = 0.01, step: int = 32, act_order: bool = False,
                  clip_search: bool = False, factors: FactorCache | None = None,
                  refit: bool = False, scale_bits: int | None = None,
                  cross: torch.Tensor | None = None) -> QuantizedWeight:
    """weight [out, in] float32; hessian [in, in] = sum of x^T x over calibration inputs.

    damp: fraction of the mean Hessian diagonal added to the diagonal (regularizes a Hessian estimated from
    few positions, pulling GPTQ towards plain rounding). step: columns per lazy batch update (speed only).
    factors: where projections sharing this Hessian tensor share its inverse factor (`FactorCache`).
    refit: least-squares scales for the final codes (`refit_scales`).
    scale_bits: block scales on the LPBQ grid of that many bits (per channel); None leaves them free.
    cross: X^T X_t, where X are the inputs `hessian` sums (the quantized model's) and X_t the float model's at
    the same positions: the weight is first moved to the least-squares W' with X W'^T = X_t W^T (damped
    towards W), so GPTQ's error X (W' - Q)^T is measured against the float model's outputs (asymmetric
    calibration, GPTAQ: earlier layers' quantization error is compensated where it arrives).
    """
    w = torch.from_numpy(np.asarray(weight, np.float32)).double()
    h = torch.as_tensor(hessian).double().clone()
    out, cols = w.shape
    group = block_size or cols
    if cols % group:
        raise ValueError(f"input size {cols} is not a multiple of the block size {group}")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    if cross is not None:
        ridge = damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
        w = torch.linalg.solve(h + ridge, (torch.as_tensor(cross).double() + ridge) @ w.T).T
    w[:, dead] = 0
    importance = torch.diag(h).clone()
    static = act_order or group == cols
    lpbq = scale_bits is not None and group < cols
    scales = (_scales(w, bits, group, clip_search, importance) if static or lpbq
              else torch.zeros(out, cols // group, dtype=w.dtype))
    if lpbq:  # the grid's unit per row, from the scales of the weight as given
        grid_unit = lpbq_unit(scales.numpy(), scale_bits)[:, 0]
        scales = torch.from_numpy(lpbq_scales(scales.numpy(), scale_bits)).double()
    perm, h_inv = _inverse_factor(hessian, h, damp, act_order, factors)
    # The column loop in numpy on the transposed weight (one visited column = one contiguous row): several
    # times faster than torch for these small steps.
    wt = w[:, perm].T.contiguous().numpy()
    scales_t = scales.T.contiguous().numpy()  # [groups, out], filled in as blocks start when not static
    group_of = (perm // group).numpy()  # the (original, contiguous) block of each visited column
    qmax = 2 ** (bits - 1) - 1
    codes = np.zeros((cols, out), np.int8)
    for begin in range(0, cols, step):
        end = min(begin + step, cols)
        block, errors = wt[begin:end].copy(), np.zeros((end - begin, out))
        block_inv = h_inv[begin:end, begin:end]
        for i in range(end - begin):
            col = begin + i
            if not static and col % group == 0:  # a block starts: its scale comes from the weights updated so far
                source = block[i:i + group] if group <= end - col else wt[col:col + group]
                fresh = _scales(torch.from_numpy(source.T.copy()), bits, group, clip_search,
                                importance[col:col + group])
                fresh = fresh[:, 0].numpy()
                scales_t[col // group] = on_lpbq_grid(fresh, grid_unit, scale_bits) if lpbq else fresh
            scale = scales_t[group_of[col]]
            q = np.clip(np.round(block[i] / scale), -qmax - 1, qmax)
            codes[col] = q
            error = (block[i] - q * scale) / block_inv[i, i]
            block[i:] -= block_inv[i, i:, None] * error[None, :]
            errors[i] = error
        wt[end:] -= h_inv[begin:end, end:].T @ errors
    codes_np = np.empty((out, cols), np.int8)
    codes_np[:, perm.numpy()] = codes.T
    scales_np = scales_t.T.astype(np.float32)
    if refit:  # against w: the weight as given, dead columns zeroed (the column loop worked on copies)
        scales_np = refit_scales(w, torch.from_numpy(codes_np).double(), torch.from_numpy(scales_np).double(),
                                 h, group).numpy().astype(np.float32)
    if lpbq:  # refit scales, or a row whose largest block ended below the grid's top: back on the grid
        scales_np = lpbq_scales(scales_np, scale_bits)
    result = dequantize(codes_np, scales_np, None, group)
    return QuantizedWeight(codes_np, scales_np, None, bits, group, float(np.abs(result - weight).max()))

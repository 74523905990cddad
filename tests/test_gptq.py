"""GPTQ options on tiny random tensors: act-order with static block scales, the clip search, damping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ondevice_llama.quantization import dequantize, quantize_weight
from ondevice_llama.quantization.gptq import CLIP_GRID, gptq_quantize, refit_scales, search_scales
from ondevice_llama.quantization.recipe import Recipe


def _hessian_error(w: np.ndarray, q, h: np.ndarray) -> float:
    """trace((W - Q) H (W - Q)^T): the layer-output error on the inputs H came from."""
    d = (w - dequantize(q.codes, q.scales, None, q.group_size)).astype(np.float64)
    return float(np.einsum("oi,ij,oj->", d, h, d))


def _correlated_inputs(rng, positions: int, features: int) -> np.ndarray:
    """Correlated inputs whose channels differ in scale by up to 30x (as an LLM's do)."""
    scale = np.exp(rng.uniform(0, np.log(30), features))
    return (rng.standard_normal((positions, features)) @ rng.standard_normal((features, features)) * 0.1) * scale


@pytest.mark.parametrize("block_size", [None, 32])
def test_act_order_gptq_beats_round_to_nearest(block_size):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 128)).astype(np.float32)
    x = _correlated_inputs(rng, 1024, 128)
    h = x.T @ x
    rtn = _hessian_error(w, quantize_weight(w, 4, block_size), h)
    plain = _hessian_error(w, gptq_quantize(w, torch.from_numpy(h), 4, block_size), h)
    ordered = _hessian_error(w, gptq_quantize(w, torch.from_numpy(h), 4, block_size, act_order=True), h)
    both = _hessian_error(w, gptq_quantize(w, torch.from_numpy(h), 4, block_size, act_order=True,
                                           clip_search=True), h)
    assert plain < 0.7 * rtn
    assert ordered < 0.7 * rtn and both < 0.7 * rtn


def test_diagonal_hessian_without_damping_is_round_to_nearest():
    """With uncorrelated inputs there is no other column to push an error onto: GPTQ is exactly RTN."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    h = torch.diag(torch.from_numpy(rng.uniform(0.5, 2.0, 64)))
    for block_size in (None, 32):
        rtn = quantize_weight(w, 4, block_size)
        for act_order in (False, True):
            q = gptq_quantize(w, h, 4, block_size, damp=0.0, act_order=act_order)
            np.testing.assert_array_equal(q.codes, rtn.codes)
            np.testing.assert_allclose(q.scales, rtn.scales, rtol=1e-6)


def test_static_groups_keep_contiguous_blocks_in_range():
    """With act-order, each block's scale is its original absmax / 7 and every code is a signed 4-bit one,
    whatever order the columns were visited in."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 96)).astype(np.float32)
    w[:, 40] *= 20  # an outlier column in the second block
    x = _correlated_inputs(rng, 512, 96)
    q = gptq_quantize(w, torch.from_numpy(x.T @ x), 4, 32, act_order=True)
    assert q.codes.dtype == np.int8 and q.codes.min() >= -8 and q.codes.max() <= 7
    assert q.scales.shape == (16, 3) and q.group_size == 32
    np.testing.assert_allclose(q.scales, np.abs(w.reshape(16, 3, 32)).max(-1) / 7, rtol=1e-6)
    assert (q.codes[:, 40] != 0).all()  # the outlier itself is representable in its own block


def test_clip_search_never_increases_the_error():
    rng = np.random.default_rng(4)
    w = torch.from_numpy(rng.standard_normal((32, 128)) * rng.uniform(0.1, 3, (32, 1)))
    importance = torch.from_numpy(rng.uniform(0, 5, 128))
    for group in (32, 128):
        for weights in (None, importance):
            searched = search_scales(w, 4, group, weights)
            absmax = w.reshape(32, -1, group).abs().amax(-1) / 7
            c = torch.ones(128, dtype=w.dtype) if weights is None else weights

            def error(scales, group=group, c=c):
                s = scales.repeat_interleave(group, dim=1)
                return ((torch.clamp(torch.round(w / s), -8, 7) * s - w) ** 2 * c).reshape(32, -1, group).sum(-1)

            assert (error(searched) <= error(absmax) * (1 + 1e-5)).all()  # the search runs in fp32
            assert error(searched).sum() < 0.9 * error(absmax).sum()  # Gaussian weights gain from clipping
            ratio = (searched / absmax).numpy()
            assert ratio.min() >= min(CLIP_GRID) - 1e-9 and ratio.max() <= 1 + 1e-9


def test_clip_search_exact_on_a_small_group():
    """One outlier and values halfway between absmax grid points: shrinking by 0.9 wins (squared errors
    0.0649 at 1.0, 0.0296 at 0.9, 0.0567 at 0.8, hand-computed), and the search picks exactly that."""
    values = [1.0] + [(k + 0.5) / 7 for k in range(6)] + [-(k + 0.5) / 7 for k in range(6)] + [0.3, -0.3, 0.2]
    w = torch.tensor([values], dtype=torch.float64)
    assert float(search_scales(w, 4, 16, grid=(1.0, 0.9, 0.8))) == pytest.approx(0.9 / 7)
    assert float(search_scales(w, 4, 16, grid=(1.0, 0.5))) == pytest.approx(1 / 7)  # clipping to 0.5 costs 0.25


def test_more_damping_moves_towards_round_to_nearest():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    x = _correlated_inputs(rng, 256, 64)
    h = torch.from_numpy(x.T @ x)
    rtn = quantize_weight(w, 4, None).codes
    changed = [(gptq_quantize(w, h, 4, None, damp=d).codes != rtn).mean() for d in (0.01, 1.0, 9.0)]
    assert changed[0] > changed[1] > changed[2]


def test_recipe_gptq_options_round_trip():
    recipe = Recipe(block_size=32, damp=0.2, act_order=False, clip_search=False)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    old = {k: v for k, v in Recipe().to_dict().items() if k not in ("damp", "act_order", "clip_search")}
    assert Recipe.from_dict(old) == Recipe()  # recipes saved before these options read with the defaults
    with pytest.raises(ValueError, match="damping"):
        Recipe(damp=-1)


def test_refit_scales_lowers_the_output_error_for_the_same_codes():
    """Least-squares scales for GPTQ's final codes: never a larger tr(E H E^T), the codes unchanged, and a block
    whose codes are all zero keeps its scale."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 128)) * np.exp(rng.standard_normal(128))
    w = (rng.standard_normal((48, 128)) * 0.02).astype(np.float32)
    w[0, :32] = 0  # a block that rounds to all-zero codes
    hessian = torch.from_numpy(x.T @ x)

    def error(q) -> float:
        e = dequantize(q.codes, q.scales, None, 32) - w
        return float(np.einsum("ri,ij,rj->", e, hessian.numpy(), e))

    plain = gptq_quantize(w, hessian, 4, 32, damp=0.05, act_order=True, clip_search=True)
    refit = gptq_quantize(w, hessian, 4, 32, damp=0.05, act_order=True, clip_search=True, refit=True)
    np.testing.assert_array_equal(refit.codes, plain.codes)
    assert error(refit) < 0.99 * error(plain)
    assert refit.scales[0, 0] == plain.scales[0, 0]
    scales = refit_scales(torch.from_numpy(w).double(), torch.from_numpy(plain.codes).double(),
                          torch.from_numpy(plain.scales).double(), hessian, 32)
    np.testing.assert_allclose(scales.numpy(), refit.scales, rtol=1e-6)


def _on_lpbq_grid(scales: np.ndarray) -> bool:
    """Per row: the largest scale / 16 times an integer 1..16, the largest itself at 16 (what QNN derives)."""
    multiples = scales / (scales.max(axis=1, keepdims=True) / 16)
    return bool(np.allclose(multiples, np.round(multiples), atol=1e-4) and multiples.min() >= 1 - 1e-6
                and np.allclose(multiples.max(axis=1), 16))


@pytest.mark.parametrize("act_order, refit", [(True, True), (True, False), (False, False)])
def test_lpbq_gptq_scales_stay_on_the_grid(act_order, refit):
    """GPTQ with 4-bit block scales: every row's scales on the LPBQ grid (after the refit too), at a small cost in
    output error against free scales, and still well below round to nearest on the same grid."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((48, 128)).astype(np.float32)
    x = _correlated_inputs(rng, 1024, 128)
    h = x.T @ x
    options = dict(damp=0.05, act_order=act_order, clip_search=True, refit=refit)
    lpbq = gptq_quantize(w, torch.from_numpy(h), 4, 32, scale_bits=4, **options)
    free = gptq_quantize(w, torch.from_numpy(h), 4, 32, **options)
    assert _on_lpbq_grid(lpbq.scales) and not _on_lpbq_grid(free.scales)
    rtn = _hessian_error(w, quantize_weight(w, 4, 32, scale_bits=4), h)
    assert _hessian_error(w, free, h) < _hessian_error(w, lpbq, h) < min(1.3 * _hessian_error(w, free, h), 0.7 * rtn)


def test_recipe_lpbq_is_opt_in():
    """LPBQ block scales when a recipe asks (`block_scale_bits` 4, for int4 weights only); free scales by default
    and for recipes saved before the field existed; nothing but 4 or none."""
    assert Recipe.from_precision("w4a16", block_size=32).block_scale_bits is None
    recipe = Recipe.from_precision("w4a16", block_size=32, block_scale_bits=4)
    assert "LPBQ" in recipe.describe() and "LPBQ" not in Recipe().describe()
    assert recipe.scale_bits_for(4) == 4 and recipe.scale_bits_for(8) is None
    saved = {k: v for k, v in recipe.to_dict().items() if k != "block_scale_bits"}
    assert Recipe.from_dict(saved).block_scale_bits is None and Recipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(ValueError, match="block scale bits"):
        Recipe(block_size=32, block_scale_bits=3)


def test_asymmetric_calibration_targets_the_float_outputs():
    """With the float model's inputs X_t beside the quantized model's X: the cross product X^T X equal to the
    Hessian changes nothing, and for X = X_t (I + E), GPTQ on the cross product lands nearer the float outputs
    X_t W^T than plain GPTQ does (which only reproduces X W^T)."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((32, 64)).astype(np.float32)
    target = _correlated_inputs(rng, 1024, 64)
    x = target @ (np.eye(64) + 0.1 * rng.standard_normal((64, 64)))  # an earlier layer's error, linear here
    h = torch.from_numpy(x.T @ x)
    options = dict(damp=0.05, act_order=True, clip_search=True)
    same = gptq_quantize(w, h, 4, 32, cross=h, **options)
    np.testing.assert_array_equal(same.codes, gptq_quantize(w, h, 4, 32, **options).codes)

    def float_output_error(q) -> float:
        return float(np.linalg.norm(x @ dequantize(q.codes, q.scales, None, 32).T - target @ w.T))

    plain = gptq_quantize(w, h, 4, 32, **options)
    asymmetric = gptq_quantize(w, h, 4, 32, cross=torch.from_numpy(x.T @ target), **options)
    assert float_output_error(asymmetric) < 0.5 * float_output_error(plain)


def test_recipe_asymmetric_calibration_round_trip():
    recipe = Recipe(block_size=32, asymmetric_calibration=0.25)
    assert Recipe.from_dict(recipe.to_dict()) == recipe and Recipe().asymmetric_calibration == 0.5
    assert "asymmetric calibration 0.25" in recipe.describe()
    assert "asymmetric" not in Recipe(algorithm="rtn", asymmetric_calibration=0.25).describe()
    saved = {k: v for k, v in recipe.to_dict().items() if k != "asymmetric_calibration"}
    assert Recipe.from_dict(saved).asymmetric_calibration == 0  # recipes saved before it did not
    for bad in (1.5, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="asymmetric calibration"):
            Recipe(asymmetric_calibration=bad)

"""The pure quantizers on known tensors, and lossless round trips of the GGUF formats we read."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import quants

from ondevice_llama.quantization import choose_qparams, dequantize, quantize, quantize_weight


def test_symmetric_per_channel_hand_computed():
    w = np.array([[-1.0, 0.6, 0.25, 1.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    q = quantize_weight(w, bits=4)
    np.testing.assert_allclose(q.scales[:, 0], [1 / 7, 1.0], rtol=1e-7)  # absmax / 7; all-zero row gets 1
    np.testing.assert_array_equal(q.codes, [[-7, 4, 2, 7], [0, 0, 0, 0]])  # 4.2 -> 4 and 1.75 -> 2
    assert q.zero_points is None and q.group_size == 4
    np.testing.assert_allclose(dequantize(q.codes, q.scales, None, 4)[0], [-1, 4 / 7, 2 / 7, 1], rtol=1e-6)
    assert q.max_error == pytest.approx(max(0.6 - 4 / 7, 2 / 7 - 0.25), abs=1e-6)


def test_clamping_to_the_code_range():
    w = np.array([[-3.0, 1.0]], np.float32)
    scales = np.array([[0.5]], np.float32)  # a scale too small for the range, as a calibrated clip would give
    np.testing.assert_array_equal(quantize(w, scales, None, 4, 2), [[-6, 2]])
    np.testing.assert_array_equal(quantize(w * 4, scales, None, 4, 2), [[-8, 7]])  # clamped both ends
    np.testing.assert_array_equal(quantize(w * 4, scales, np.array([[8]], np.uint8), 4, 2), [[0, 15]])


def test_blocks_have_their_own_scales():
    w = np.array([[1.0, -0.5, 100.0, 50.0]], np.float32)
    q = quantize_weight(w, bits=8, block_size=2)
    np.testing.assert_allclose(q.scales, [[1 / 127, 100 / 127]], rtol=1e-6)
    np.testing.assert_array_equal(q.codes, [[127, -64, 127, 64]])  # -63.5 -> -64, 63.5 -> 64 (half to even)
    with pytest.raises(ValueError, match="multiple of the block size"):
        quantize_weight(np.zeros((2, 6), np.float32), 4, block_size=4)


def test_asymmetric_range_holds_zero_and_affine_does_not_need_to():
    w = np.array([[0.1, 0.5]], np.float32)
    scales, zero_points = choose_qparams(w, 4, 2, "asymmetric")
    assert zero_points.dtype == np.uint8 and zero_points[0, 0] == 0
    np.testing.assert_allclose(scales, [[0.5 / 15]], rtol=1e-6)
    q = quantize_weight(w, 4, 2, "affine")
    np.testing.assert_array_equal(q.codes, [[0, 15]])
    np.testing.assert_allclose(dequantize(q.codes, q.scales, q.zero_points, 2), w, rtol=1e-6)  # min and max exact


def test_round_trip_error_bounds():
    w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    for bits in (4, 8):
        for mode in ("symmetric", "asymmetric", "affine"):
            q = quantize_weight(w, bits, 32, mode)
            step = q.scales.repeat(32, axis=1)
            error = np.abs(dequantize(q.codes, q.scales, q.zero_points, 32) - w)
            assert (error <= step / 2 * (1 + 1e-5)).all(), (bits, mode)  # never worse than half a step
            assert q.max_error == pytest.approx(float(error.max()))


@pytest.mark.parametrize("gguf_type, bits, mode", [(gguf.GGMLQuantizationType.Q4_1, 4, "affine"),
                                                    (gguf.GGMLQuantizationType.Q8_0, 8, "symmetric")])
def test_gguf_blocks_round_trip_losslessly(gguf_type, bits, mode):
    """Weights dequantized from GGUF Q4_1 / Q8_0 re-quantize to the same grid: our 4/8-bit export loses nothing."""
    w = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)
    from_gguf = quants.dequantize(quants.quantize(w, gguf_type), gguf_type).reshape(w.shape)
    q = quantize_weight(from_gguf, bits, 32, mode)
    again = dequantize(q.codes, q.scales, q.zero_points, 32)
    np.testing.assert_allclose(again, from_gguf, rtol=0, atol=1e-6 * np.abs(from_gguf).max())
    assert not np.allclose(from_gguf, w, atol=1e-3)  # the test data really was quantized by GGUF


def test_lpbq_scales_hand_computed():
    """Per row: the largest / 16 times the nearest integer in [1, 16]; the largest stays exact."""
    from ondevice_llama.quantization.quantizers import lpbq_scales

    scales = np.array([[16.0, 8.4, 3.6, 0.01], [2.0, 1.0, 0.5, 0.24]], np.float32)
    np.testing.assert_allclose(lpbq_scales(scales, 4), [[16, 8, 4, 1], [2, 1, 0.5, 0.25]], rtol=1e-6)
    w = np.random.default_rng(0).standard_normal((8, 128)).astype(np.float32)
    free, snapped = quantize_weight(w, 4, 32), quantize_weight(w, 4, 32, scale_bits=4)
    np.testing.assert_array_equal(snapped.scales, lpbq_scales(free.scales, 4))
    assert snapped.codes.min() >= -8 and snapped.codes.max() <= 7
    assert quantize_weight(w, 4, None, scale_bits=4).scales.shape == (8, 1)  # per channel: nothing to put on a grid

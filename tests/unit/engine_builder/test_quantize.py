"""INT8 / INT4 weight quantization: error bounds and the documented packing layout."""

from __future__ import annotations

import numpy as np
import pytest

from engine_builder.quantize import (
    check_int4_shape,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

pytestmark = pytest.mark.unit


def _weights(seed: int = 0, shape: tuple[int, int] = (48, 96)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Rows of very different magnitudes, so a shared scale would fail the bound.
    return (rng.standard_normal(shape) * np.logspace(-3, 1, shape[0])[:, None]).astype(np.float32)


def test_int8_per_channel_error_is_at_most_half_a_step() -> None:
    w = _weights()
    q, scales = quantize_int8(w)
    assert q.dtype == np.int8 and q.shape == w.shape
    assert scales.dtype == np.float32 and scales.shape == (w.shape[0],)
    np.testing.assert_allclose(scales, np.abs(w).max(axis=1) / 127, rtol=1e-6)
    err = np.abs(dequantize_int8(q, scales) - w)
    assert np.all(err <= scales[:, None] / 2 * (1 + 1e-5))
    assert np.abs(q).max() == 127  # the largest element of each row uses the full range


def _naive_int4(w: np.ndarray, g: int) -> np.ndarray:
    """Reference: the max-abs scheme (scale = max|w| / 7, round to nearest), dequantized."""
    groups = w.reshape(w.shape[0], -1, g)
    amax = np.abs(groups).max(axis=2, keepdims=True)
    scale = np.where(amax > 0, amax / 7, 1.0)
    return (np.clip(np.rint(groups / scale), -8, 7) * scale).reshape(w.shape)


def _group_sq_error(a: np.ndarray, b: np.ndarray, g: int) -> np.ndarray:
    return ((a - b).astype(np.float64) ** 2).reshape(a.shape[0], -1, g).sum(axis=2)


@pytest.mark.parametrize("g", [16, 32, 64])
def test_int4_error_beats_the_max_abs_scheme_on_heavy_tailed_weights(g: int) -> None:
    rng = np.random.default_rng(3)
    # Student-t (3 dof) rows of different magnitudes: outliers that max-abs stretches for.
    w = (rng.standard_t(3, (64, 256)) * np.logspace(-3, 1, 64)[:, None]).astype(np.float32)
    packed, scales = quantize_int4(w, g)
    assert packed.dtype == np.uint8 and packed.shape == (64, 128)
    assert scales.dtype == np.float32 and scales.shape == (64, 256 // g)
    assert np.all(np.isfinite(scales)) and np.all(scales > 0)
    ours = _group_sq_error(dequantize_int4(packed, scales, g), w, g)
    naive = _group_sq_error(_naive_int4(w, g), w, g)
    assert np.all(ours <= naive * (1 + 1e-4))  # no group is worse
    assert ours.sum() < 0.9 * naive.sum()  # and the whole is clearly better (~0.84 here)
    # Relative error stays the same for tiny and large rows: the point of group scales.
    rel = np.sqrt(ours.sum(axis=1) / (w.astype(np.float64) ** 2).sum(axis=1))
    assert rel.max() < 0.3  # a scale shared across rows would zero the small ones (rel 1)


def test_int4_uses_the_extra_negative_code() -> None:
    # One group whose extreme is negative: -8 * s reaches it exactly with a finer step than
    # max-abs / 7, so the fit uses q = -8 and reconstructs the group exactly.
    q = np.arange(-8, 8, dtype=np.int64).repeat(2)[None, :]  # [1, 32], every code twice
    w = (q * 0.25).astype(np.float32)
    packed, scales = quantize_int4(w, 32)
    np.testing.assert_array_equal(unpack_int4(packed), q)
    np.testing.assert_allclose(scales, [[0.25]], rtol=1e-6)
    assert np.abs(_naive_int4(w, 32) - w).max() > 0.01  # the old scheme could not


def test_int4_packing_layout_low_nibble_even_column() -> None:
    q = np.array([[-8, 7, 0, -1], [3, -3, 1, 2]], dtype=np.int8)
    packed = pack_int4(q)
    # byte j = (q[2j] + 8) | (q[2j + 1] + 8) << 4
    assert packed.tolist() == [[0 | 15 << 4, 8 | 7 << 4], [11 | 5 << 4, 9 | 10 << 4]]
    np.testing.assert_array_equal(unpack_int4(packed), q)


def test_int4_round_trip_of_exact_grid_values() -> None:
    rng = np.random.default_rng(2)
    q = rng.integers(-7, 8, size=(8, 64))
    scales = rng.uniform(0.1, 2.0, size=(8, 2)).astype(np.float32)
    q[:, 0] = 7  # make sure each group's max magnitude is 7 so the scales are recovered
    q[:, 32] = -7
    w = (q * np.repeat(scales, 32, axis=1)).astype(np.float32)
    packed, got_scales = quantize_int4(w, 32)
    np.testing.assert_allclose(got_scales, scales, rtol=1e-6)
    np.testing.assert_array_equal(unpack_int4(packed), q)


def test_zero_rows_and_groups_quantize_to_zero() -> None:
    w = np.zeros((2, 64), dtype=np.float32)
    w[1, 40] = 3.0
    q8, s8 = quantize_int8(w)
    assert np.all(q8[0] == 0) and np.isfinite(s8).all()
    p4, s4 = quantize_int4(w, 32)
    assert np.all(np.isfinite(s4)) and np.all(s4 > 0)
    np.testing.assert_array_equal(unpack_int4(p4)[0], 0)
    np.testing.assert_allclose(dequantize_int4(p4, s4, 32), w, atol=1e-6)


@pytest.mark.parametrize(("shape", "group"), [((4, 48), 32), ((4, 64), 3), ((4, 64), 0)])
def test_int4_rejects_shapes_the_group_does_not_divide(shape: tuple[int, int], group: int) -> None:
    with pytest.raises(ValueError, match="group size"):
        check_int4_shape(shape, group)
    with pytest.raises(ValueError, match="group size"):
        quantize_int4(np.ones(shape, dtype=np.float32), group)

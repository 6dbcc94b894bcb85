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


def test_int4_groupwise_error_is_at_most_half_a_step() -> None:
    w = _weights(1)
    g = 32
    packed, scales = quantize_int4(w, g)
    assert packed.dtype == np.uint8 and packed.shape == (48, 48)
    assert scales.shape == (48, 96 // g)
    deq = dequantize_int4(packed, scales, g)
    err = np.abs(deq - w)
    bound = np.repeat(scales, g, axis=1) / 2 * (1 + 1e-5)
    assert np.all(err <= bound)
    # Relative error stays the same for tiny and large rows: the point of group scales.
    rel = np.linalg.norm(deq - w, axis=1) / np.linalg.norm(w, axis=1)
    assert rel.max() < 0.2


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
    np.testing.assert_allclose(dequantize_int4(p4, s4, 32), w, atol=1e-6)


@pytest.mark.parametrize(("shape", "group"), [((4, 48), 32), ((4, 64), 3), ((4, 64), 0)])
def test_int4_rejects_shapes_the_group_does_not_divide(shape: tuple[int, int], group: int) -> None:
    with pytest.raises(ValueError, match="group size"):
        check_int4_shape(shape, group)
    with pytest.raises(ValueError, match="group size"):
        quantize_int4(np.ones(shape, dtype=np.float32), group)

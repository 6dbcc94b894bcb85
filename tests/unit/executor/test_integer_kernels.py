"""The integer (VNNI) kernels of source blocks against the float reference, and how the
activation setting is chosen."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from server.executor.cpu import activations, block_weights
from server.executor.cpu.activations import (
    ACTIVATIONS_ENV,
    integer_kernels,
    requested_activations,
    resolve_activations,
)
from server.executor.cpu.block_weights import KERNEL_MAX_ROWS, BlockLinear
from tests.unit.executor.gguf_blocks import quantized_blocks

pytestmark = pytest.mark.unit

KERNEL_TYPES = ("Q4_0", "Q4_1", "Q8_0")
# Largest error against the float64 product, relative to its largest magnitude: 15-bit
# activations stay near float rounding, 8-bit ones do not.
TOLERANCE = {"int16": 2e-4, "int8": 3e-2}


@pytest.fixture
def needs_vnni() -> None:
    if integer_kernels() is None:
        pytest.skip("integer kernels need numba and a CPU with AVX-512 VNNI")


def _inputs(rows: int, width: int, seed: int) -> np.ndarray:
    """Random rows, one of them all zeros and one spanning six orders of magnitude."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, width)).astype(np.float32)
    x[0] = 0.0
    if rows > 1:
        x[1] *= np.logspace(-3, 3, width, dtype=np.float32)
    return x


@pytest.mark.usefixtures("needs_vnni")
@pytest.mark.parametrize("qtype", KERNEL_TYPES)
@pytest.mark.parametrize("mode", ["int16", "int8"])
@pytest.mark.parametrize("rows", [1, 3, 8, 64])
def test_integer_kernels_match_the_float_product(qtype: str, mode: str, rows: int) -> None:
    raw = quantized_blocks(qtype, 100, 96, seed=rows)  # 100 rows: the last tile is partly padding
    x = _inputs(rows, 96, seed=rows)
    linear = BlockLinear(qtype, raw, activations=mode)
    assert linear.activations == mode
    w = dequantize(raw, GGMLQuantizationType[qtype]).astype(np.float64)
    expected = x.astype(np.float64) @ w.T
    got = linear(x)
    np.testing.assert_array_equal(got[0], 0.0)
    for i in range(rows):  # each row against its own scale (row 1 is far larger)
        scale = max(np.abs(expected[i]).max(), 1e-30)
        np.testing.assert_allclose(got[i], expected[i], atol=TOLERANCE[mode] * scale, rtol=0)


@pytest.mark.usefixtures("needs_vnni")
@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_a_rows_result_does_not_depend_on_its_batch(qtype: str) -> None:
    """Activations are quantized per row, and integer sums are exact: a sequence gets the same
    bits in any batch (of two rows or more for Q8_0, whose single rows take the float kernel)."""
    linear = BlockLinear(qtype, quantized_blocks(qtype, 130, 64, seed=3), activations="int16")
    x = _inputs(8, 64, seed=4)
    together = linear(x)
    for i in range(7):
        np.testing.assert_array_equal(linear(x[i : i + 2]), together[i : i + 2])
        if qtype != "Q8_0":
            np.testing.assert_array_equal(linear(x[i : i + 1])[0], together[i])
    np.testing.assert_array_equal(linear(x[2:7]), together[2:7])


@pytest.mark.usefixtures("needs_vnni")
def test_prefill_sized_products_stay_float32() -> None:
    raw = quantized_blocks("Q4_1", 64, 64, seed=5)
    x = _inputs(KERNEL_MAX_ROWS + 6, 64, seed=6)
    expected = x.astype(np.float64) @ dequantize(raw, GGMLQuantizationType.Q4_1).T
    got = BlockLinear("Q4_1", raw, activations="int8")(x)
    np.testing.assert_allclose(got, expected, atol=2e-6 * np.abs(expected).max(), rtol=0)


def test_the_setting_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ACTIVATIONS_ENV, raising=False)
    assert requested_activations() == "auto"
    monkeypatch.setenv(ACTIVATIONS_ENV, "int8")
    assert requested_activations() == "int8"
    monkeypatch.setenv(ACTIVATIONS_ENV, "fp8")
    with pytest.raises(ValueError, match=ACTIVATIONS_ENV):
        requested_activations()
    with pytest.raises(ValueError, match="activations must be one of"):
        resolve_activations("fp8")


def test_auto_picks_int16_only_where_the_cpu_runs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_activations("float32") == "float32"
    expected = "int16" if integer_kernels() is not None else "float32"
    assert resolve_activations("auto") == expected
    monkeypatch.setattr(activations, "integer_kernels", lambda: None)
    assert resolve_activations("auto") == "float32"
    with pytest.raises(ValueError, match="need numba and a CPU with AVX-512 VNNI"):
        resolve_activations("int8")


def test_a_host_without_vnni_refuses_integer_activations(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("numba")
    monkeypatch.setattr(block_weights, "integer_kernels", lambda: None)
    raw = quantized_blocks("Q4_0", 64, 64, seed=7)
    with pytest.raises(ValueError, match="AVX-512 VNNI"):
        BlockLinear("Q4_0", raw, activations="int16")
    assert BlockLinear("Q4_0", raw).activations == "float32"

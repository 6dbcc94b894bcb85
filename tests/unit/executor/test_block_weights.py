"""GGUF block weights: the compiled kernels against the NumPy reference, and the reference
against the gguf package's own decoder (llama.cpp's Python reference for every block type)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from server.executor.cpu import block_weights
from server.executor.cpu.blas import default_threads, set_thread_blas_threads, thread_blas_threads
from server.executor.cpu.block_weights import (
    BlockLinear,
    StackedLinear,
    WidenedLinear,
    block_geometry,
    reencode_blocks,
    reencoded_type,
    widen_blocks,
)
from tests.unit.executor.gguf_blocks import quantized_blocks

pytestmark = pytest.mark.unit

KERNEL_TYPES = ("Q4_0", "Q4_1", "Q8_0")


def _random_blocks(qtype: str, out: int, width: int, seed: int) -> np.ndarray:
    """Random bytes with finite float16 scales, for types gguf cannot quantize (K-quants), and
    for Q5_0 with every high bit pattern (its scale is set by the caller)."""
    block, size = block_geometry(qtype)
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (out, width // block, size), dtype=np.uint8)
    # Scales sit in the block's first (Q4_K: d, dmin) or last (Q6_K: d) float16 slots.
    halves = (rng.standard_normal((out, width // block, 2)) * 0.01).astype(np.float16)
    if qtype == "Q6_K":
        raw[..., -2:] = halves[..., :1].view(np.uint8)
    else:
        raw[..., :4] = halves.view(np.uint8).reshape(out, width // block, 4)
    return raw.reshape(out, -1)


def _reference(raw: np.ndarray, qtype: str, x: np.ndarray) -> np.ndarray:
    w = dequantize(raw, GGMLQuantizationType[qtype]).astype(np.float64)
    return x.astype(np.float64) @ w.T


@pytest.mark.parametrize("qtype", KERNEL_TYPES)
@pytest.mark.parametrize("rows", [1, 3, 8, 70])
def test_kernels_match_the_numpy_reference(qtype: str, rows: int) -> None:
    pytest.importorskip("numba")
    raw = quantized_blocks(qtype, 100, 96, seed=rows)
    x = np.random.default_rng(rows).standard_normal((rows, 96)).astype(np.float32)
    fast, slow = BlockLinear(qtype, raw), BlockLinear(qtype, raw, use_kernels=False)
    assert fast.compiled and not slow.compiled
    expected = _reference(raw, qtype, x)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(fast(x), expected, atol=2e-6 * scale, rtol=0)
    np.testing.assert_allclose(slow(x), expected, atol=2e-6 * scale, rtol=0)
    ids = np.array([0, 99, 63, 64, 5])
    w = dequantize(raw, GGMLQuantizationType[qtype])
    np.testing.assert_allclose(fast.rows(ids), w[ids], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(slow.rows(ids), w[ids])


@pytest.mark.parametrize("qtype", KERNEL_TYPES)
def test_kernel_layout_keeps_the_source_bytes(qtype: str) -> None:
    pytest.importorskip("numba")
    raw = quantized_blocks(qtype, 128, 64, seed=1)  # whole tiles: no padding rows
    assert BlockLinear(qtype, raw).nbytes == raw.nbytes
    assert BlockLinear(qtype, raw, use_kernels=False).nbytes == raw.nbytes
    if qtype == "Q4_1":
        assert raw.nbytes / raw.shape[0] / 64 == 0.625  # 20 bytes per 32 weights


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q5_0"])
def test_other_block_types_run_on_the_reference(qtype: str) -> None:
    width = 512
    raw = (_random_blocks(qtype, 40, width, seed=2) if qtype.endswith("_K")
           else quantized_blocks(qtype, 40, width, seed=2))
    linear = BlockLinear(qtype, raw)
    assert not linear.compiled and linear.in_features == width
    x = np.random.default_rng(3).standard_normal((5, width)).astype(np.float32)
    expected = _reference(raw, qtype, x)
    np.testing.assert_allclose(linear(x), expected, atol=1e-5 * np.abs(expected).max())


def test_q5_0_is_reencoded_as_q8_0_exactly() -> None:
    """Every 5-bit value and sign of scale, and a high bit in each position of qh."""
    raw = _random_blocks("Q5_0", 70, 256, seed=9)
    raw.reshape(70, -1, 22)[..., :2] = (np.random.default_rng(9).standard_normal(
        (70, 8, 1)) * 0.01).astype(np.float16).view(np.uint8)
    assert reencoded_type("Q5_0") == "Q8_0" and reencoded_type("Q4_K") is None
    q8 = reencode_blocks(raw, "Q5_0")
    assert q8.shape == (70, 8 * 34)
    np.testing.assert_array_equal(dequantize(q8, GGMLQuantizationType.Q8_0),
                                  dequantize(raw, GGMLQuantizationType.Q5_0))
    with pytest.raises(ValueError, match="no exact re-encoding"):
        reencode_blocks(raw, "Q4_K")
    pytest.importorskip("numba")
    x = np.random.default_rng(10).standard_normal((3, 256)).astype(np.float32)
    expected = _reference(raw, "Q5_0", x)
    np.testing.assert_allclose(BlockLinear("Q8_0", q8)(x), expected,
                               atol=2e-6 * np.abs(expected).max(), rtol=0)


def test_stacked_parts_of_different_types() -> None:
    a, b = quantized_blocks("Q8_0", 30, 64, seed=4), quantized_blocks("Q4_0", 20, 64, seed=5)
    parts = [BlockLinear("Q8_0", a), BlockLinear("Q4_0", b)]
    stacked = StackedLinear(parts)
    assert stacked.out_features == 50 and stacked.nbytes == sum(p.nbytes for p in parts)
    x = np.random.default_rng(6).standard_normal((2, 64)).astype(np.float32)
    expected = np.concatenate([_reference(a, "Q8_0", x), _reference(b, "Q4_0", x)], axis=1)
    np.testing.assert_allclose(stacked(x), expected, atol=1e-5)
    full = np.concatenate([dequantize(a, GGMLQuantizationType.Q8_0),
                           dequantize(b, GGMLQuantizationType.Q4_0)])
    ids = np.array([49, 0, 30, 29])
    np.testing.assert_allclose(stacked.rows(ids), full[ids], rtol=1e-6, atol=1e-7)


def test_bad_blocks_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown GGML block type 'Q9_9'"):
        BlockLinear("Q9_9", np.zeros((2, 18), np.uint8))
    with pytest.raises(ValueError, match="do not tile a row"):
        BlockLinear("Q4_0", np.zeros((2, 19), np.uint8))
    raw = quantized_blocks("Q4_1", 64, 32, seed=7)
    raw[3, :2] = np.array([np.inf], np.float16).view(np.uint8)
    if block_weights.load_kernels() is not None:
        with pytest.raises(ValueError, match="non-finite scale"):
            BlockLinear("Q4_1", raw)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 5, 70])
def test_widened_blocks_compute_what_the_file_means(threads: int, rows: int) -> None:
    """Types without kernels are widened at load; split among helper threads or not, their
    products are the reference's."""
    width = 512
    raw = _random_blocks("Q4_K", 37, width, seed=7)
    linear = WidenedLinear(widen_blocks(raw, "Q4_K"))
    assert linear.nbytes == 37 * width * 4 and linear.out_features == 37
    x = np.random.default_rng(8).standard_normal((rows, width)).astype(np.float32)
    expected = _reference(raw, "Q4_K", x)
    before = thread_blas_threads()
    set_thread_blas_threads(threads)
    try:
        np.testing.assert_allclose(linear(x), expected, atol=1e-5 * np.abs(expected).max())
    finally:
        set_thread_blas_threads(before if before is not None else default_threads())
    ids = np.array([36, 0, 7])
    np.testing.assert_array_equal(linear.rows(ids), dequantize(raw, GGMLQuantizationType.Q4_K)[ids])

"""The compiled per-step kernels against their NumPy references (model.py, attention.py)."""

from __future__ import annotations

import numpy as np
import pytest

from server.executor.cpu import model
from server.executor.cpu.attention import DecodeGroup, decode_attention, decode_attention_numpy
from server.executor.kv.paged import PagedKvCache

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _needs_numba() -> None:
    pytest.importorskip("numba")


def _rng() -> np.random.Generator:
    return np.random.default_rng(7)


def test_rms_norm_matches_reference() -> None:
    rng = _rng()
    x = rng.standard_normal((5, 96)).astype(np.float32) * 3
    w = rng.standard_normal(96).astype(np.float32)
    np.testing.assert_allclose(model.rms_norm(x, w, 1e-5), model.rms_norm_numpy(x, w, 1e-5),
                               rtol=1e-5, atol=1e-6)
    # a strided view (rows picked out of a larger batch) gives the same rows
    np.testing.assert_allclose(model.rms_norm(x[::2], w, 1e-5),
                               model.rms_norm_numpy(x[::2], w, 1e-5), rtol=1e-5, atol=1e-6)


def test_rope_matches_reference_and_leaves_its_input() -> None:
    rng = _rng()
    x = rng.standard_normal((4, 6, 16)).astype(np.float32)
    cos, sin = model.rope_tables(32, 16, 10_000.0)
    cos, sin = cos[[3, 9, 0, 31]], sin[[3, 9, 0, 31]]
    before = x.copy()
    np.testing.assert_allclose(model.apply_rope(x, cos, sin),
                               model.apply_rope_numpy(x, cos, sin), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(x, before)


def test_silu_mul_matches_reference_over_the_float_range() -> None:
    rng = _rng()
    gate_up = rng.standard_normal((3, 64)).astype(np.float32) * 20
    gate_up[0, :4] = [-200.0, -87.5, 88.5, 200.0]  # past exp's float32 range either way
    with np.errstate(over="ignore"):  # the reference's exp(200) is inf, and silu 0
        want = model.silu_mul_numpy(gate_up)
    np.testing.assert_allclose(model.silu_mul(gate_up), want, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("window", [None, 5])
def test_decode_attention_matches_reference(window: int | None) -> None:
    rng = _rng()
    tpb, heads, kv_heads, dim = 4, 6, 2, 8
    cache = PagedKvCache(2, 16, tpb, kv_heads, dim)
    cache.k[:] = rng.standard_normal(cache.k.shape)
    cache.v[:] = rng.standard_normal(cache.v.shape)
    lens = np.array([1, 7, 13, 4])
    tables = [rng.permutation(16)[: -(-n // tpb)] for n in lens]
    blocks = np.zeros((4, max(len(t) for t in tables)), np.int64)
    for i, t in enumerate(tables):
        blocks[i, : len(t)], blocks[i, len(t):] = t, t[0]
    group = DecodeGroup(np.arange(4), lens, blocks)
    q = rng.standard_normal((4, heads, dim)).astype(np.float32)
    got = decode_attention(q, cache, 1, group, 0.3, window)
    want = decode_attention_numpy(q, cache, 1, group, 0.3, window)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_step_kernels_run_on_the_tbb_layer_in_a_fresh_process() -> None:
    """A float32 engine never imports the block kernels, which load TBB; numba would then
    take OpenMP for the whole process (a batch-1 decode step of the default engine measured
    255 ms against 27 ms here)."""
    import subprocess
    import sys

    from server.executor.cpu.block_kernels import TBB

    if not TBB:
        pytest.skip("numba's TBB layer is not installed (the cpu extra's tbb wheel)")
    code = (  # the step kernels imported, then any parallel launch
        "import numpy as np, numba\n"
        "from server.executor.cpu import step_kernels\n"
        "@numba.njit(parallel=True)\n"
        "def total(x):\n"
        "    s = 0.0\n"
        "    for i in numba.prange(x.shape[0]):\n"
        "        s += x[i]\n"
        "    return s\n"
        "total(np.ones(64))\n"
        "print(numba.threading_layer())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "tbb"

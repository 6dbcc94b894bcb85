"""Compiled (numba) versions of the small per-step operations around the matmuls: RMSNorm,
RoPE, the SiLU gate and decode attention over the paged KV cache.

Each one reads its input once and writes its output once, where the NumPy reference (model.py,
attention.py) makes several passes and temporaries: at 32 decode rows these operations cost
about a quarter of a step of the default engine in NumPy. They compute the same float32
arithmetic, in another summation order. Importing this module compiles nothing; each kernel
compiles on first use and is cached on disk.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from server.executor.cpu.threading_layer import TBB  # noqa: F401  (loaded before any launch)

F32 = np.float32

_kernel = njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
_parallel_kernel = njit(cache=True, fastmath=True, nogil=True, error_model="numpy",
                        parallel=True)
_inline = njit(cache=True, fastmath=True, nogil=True, error_model="numpy", inline="always")

_LOG2E = F32(1.4426950408889634)
_LN2_HI = F32(0.693359375)  # ln 2 split so that n * _LN2_HI is exact for |n| < 2^8
_LN2_LO = F32(-2.12194440e-4)


@_inline
def _exp(x):  # pragma: no cover - compiled
    """exp(x) in float32, within 2 ulp, from arithmetic that vectorizes (numba's np.exp calls
    libm one element at a time): x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor series to
    r^7, times 2^n built in the exponent bits. Underflows to 0 below -87."""
    x = min(max(x, F32(-87.0)), F32(88.0))
    n = np.floor(x * _LOG2E + F32(0.5))
    r = x - n * _LN2_HI - n * _LN2_LO
    p = F32(1.0 / 5040.0)
    p = p * r + F32(1.0 / 720.0)
    p = p * r + F32(1.0 / 120.0)
    p = p * r + F32(1.0 / 24.0)
    p = p * r + F32(1.0 / 6.0)
    p = p * r + F32(0.5)
    p = p * r + F32(1.0)
    p = p * r + F32(1.0)
    bits = np.uint32((np.int32(n) + np.int32(127)) << np.int32(23))
    return p * bits.view(np.float32)


@_kernel
def rms_norm(x, weight, eps, out):  # pragma: no cover - compiled
    """out[n, hidden] = x / rms(x) * weight, row by row."""
    n, hidden = x.shape
    for i in range(n):
        total = F32(0.0)
        for c in range(hidden):
            total += x[i, c] * x[i, c]
        inv = F32(1.0) / np.sqrt(total / F32(hidden) + F32(eps))
        for c in range(hidden):
            out[i, c] = x[i, c] * inv * weight[c]


@_kernel
def rope_(x, cos, sin):  # pragma: no cover - compiled
    """In place, x [n, heads, head_dim]: rotates (x[i], x[i + d/2]) by the row's angles."""
    n, heads, dim = x.shape
    half = dim // 2
    for i in range(n):
        for h in range(heads):
            for c in range(half):
                a, b = x[i, h, c], x[i, h, c + half]
                x[i, h, c] = a * cos[i, c] - b * sin[i, c]
                x[i, h, c + half] = b * cos[i, c] + a * sin[i, c]


@_kernel
def silu_mul(gate_up, out):  # pragma: no cover - compiled
    """out[n, inter] = silu(gate) * up, gate_up [n, 2 * inter] (gate then up)."""
    n, inter = out.shape
    for i in range(n):
        for c in range(inter):
            g = gate_up[i, c]
            out[i, c] = g / (F32(1.0) + _exp(-g)) * gate_up[i, inter + c]


@_parallel_kernel
def decode_attention(q, k_pool, v_pool, blocks, context_lens, first, scale,
                     out):  # pragma: no cover - compiled
    """One query per sequence over its pages.

    q [B, heads, head_dim]; k_pool, v_pool [num_blocks, tpb, kv_heads, head_dim] (one layer);
    blocks [B, max_blocks]; sequence b attends to positions [first[b], context_lens[b]);
    out [B, heads * head_dim]. One task per sequence, and every query head meets each key
    and value row while it is in cache: a row's KV heads are contiguous, so the pages stream
    in order. (One task per KV head instead read a third of each row per pass: in decode
    steps of the default engine, where the weights between two layers evict the cache, that
    ran 1.1x slower at batch 1 and 1.2x at batch 32.)"""
    batch, heads, dim = q.shape
    tpb, kv_heads = k_pool.shape[1], k_pool.shape[2]
    group = heads // kv_heads
    for b in prange(batch):
        lo, hi = first[b], context_lens[b]
        scores = np.empty((heads, hi - lo), F32)
        for p in range(lo, hi):
            blk, off = blocks[b, p // tpb], p % tpb
            for h in range(heads):
                kh = h // group
                s = F32(0.0)
                for c in range(dim):
                    s += q[b, h, c] * k_pool[blk, off, kh, c]
                scores[h, p - lo] = s * scale
        for h in range(heads):
            top = scores[h].max()
            total = F32(0.0)
            for i in range(hi - lo):
                scores[h, i] = _exp(scores[h, i] - top)
                total += scores[h, i]
            inv = F32(1.0) / total
            for i in range(hi - lo):
                scores[h, i] *= inv
        acc = np.zeros((heads, dim), F32)
        for p in range(lo, hi):
            blk, off = blocks[b, p // tpb], p % tpb
            for h in range(heads):
                kh = h // group
                w = scores[h, p - lo]
                for c in range(dim):
                    acc[h, c] += w * v_pool[blk, off, kh, c]
        for h in range(heads):
            for c in range(dim):
                out[b, h * dim + c] = acc[h, c]

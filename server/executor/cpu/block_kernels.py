"""Compiled (numba) kernels over GGUF quantized blocks in the row-tiled layout of block_weights.

Every kernel reads the packed bytes directly and accumulates in float32. A weight of
`rows x in_features` is held as tiles of ``TILE`` output rows; within a tile, byte k of block b
of all ``TILE`` rows is contiguous (`quants[tile, block, k, row]`), and so are the float16 scale
bits (`scales[tile, block, row]`). The innermost loops therefore run along output rows, 16
float32 lanes at a time, with no horizontal sums; several input rows share each unpacked byte
(four at a time), and each pass over k handles several bytes, so partial sums are loaded and
stored less often. These kernels run about as fast as OpenBLAS's float32 GEMM (some 30 GMAC/s
per core on the development host), from a fifth of the bytes.

- 4-bit blocks (Q4_0, Q4_1): 32 weights per block, byte k holds weight k (low nibble) and
  weight k + 16 (high nibble); `w = d * q + m`, with `m = -8 d` for Q4_0.
- 8-bit blocks (Q8_0): `w = d * q`, q int8.

Importing this module compiles nothing: each kernel compiles on first use and is cached on disk
(``cache=True``), so a process after the first loads machine code instead of compiling it.
"""

from __future__ import annotations

import contextlib
import threading
from contextlib import AbstractContextManager

import numba
import numpy as np
from numba import njit, prange

from server.executor.cpu.threading_layer import TBB  # noqa: F401  (loaded before any launch)

TILE = 64  # output rows per tile: four 16-lane float32 vectors
# Tiles a kernel thread takes at a time. Small chunks handed out on demand (not one static
# share per thread) let the running threads take over the work of one the OS has descheduled,
# instead of waiting for it at the end of every kernel on a busy host.
PARALLEL_CHUNK = 2
NIBBLE_BYTES = 16  # bytes of quants in a 4-bit block of 32
F32 = np.float32
_F16_SCALE = np.float32(2.0**112)  # float16 bits << 13 read as float32, times this, is exact
_serial_launches = threading.Lock()
_layer: str | None = None  # numba's threading layer, known after the first parallel launch

# Every kernel: cached on disk, float reassociation allowed (vectorized sums), GIL released.
_kernel = njit(cache=True, fastmath=True, nogil=True, error_model="numpy")
_parallel_kernel = njit(cache=True, fastmath=True, nogil=True, error_model="numpy",
                        parallel=True)
_inline = njit(cache=True, fastmath=True, nogil=True, error_model="numpy", inline="always")


@_inline
def _f16(bits: np.uint16) -> np.float32:
    """IEEE half (raw bits) -> float32, exact for finite values (the builder rejects others)."""
    mag = np.uint32((np.uint32(bits) & np.uint32(0x7FFF)) << np.uint32(13))
    value = mag.view(np.float32) * _F16_SCALE
    return -value if bits & 0x8000 else value


@_parallel_kernel
def matmul_nibbles(quants, d, m, has_min, x, rows, out):  # pragma: no cover - compiled
    """out[n, rows] = x[n, in] @ W.T for 4-bit blocks.
    n must be a multiple of 4: each unpacked byte feeds four input rows from registers."""
    n, tiles, blocks = x.shape[0], quants.shape[0], quants.shape[1]
    for t in prange(tiles):
        p0 = np.empty(TILE, F32)
        p1 = np.empty(TILE, F32)
        p2 = np.empty(TILE, F32)
        p3 = np.empty(TILE, F32)
        xsum = np.empty(4, F32)
        acc = np.zeros((n, TILE), F32)
        for j in range(0, n, 4):
            for b in range(blocks):
                p0[:] = 0.0
                p1[:] = 0.0
                p2[:] = 0.0
                p3[:] = 0.0
                for i in range(4):
                    xsum[i] = _block_sum(x, j + i, b)
                for k in range(NIBBLE_BYTES):
                    c = b * 32 + k
                    for r in range(TILE):
                        byte = quants[t, b, k, r]
                        lo, hi = F32(np.int32(byte & 15)), F32(np.int32(byte >> 4))
                        p0[r] += lo * x[j, c] + hi * x[j, c + 16]
                        p1[r] += lo * x[j + 1, c] + hi * x[j + 1, c + 16]
                        p2[r] += lo * x[j + 2, c] + hi * x[j + 2, c + 16]
                        p3[r] += lo * x[j + 3, c] + hi * x[j + 3, c + 16]
                for r in range(TILE):
                    scale = _f16(d[t, b, r])
                    bias = _f16(m[t, b, r]) if has_min else F32(-8.0) * scale
                    acc[j, r] += scale * p0[r] + bias * xsum[0]
                    acc[j + 1, r] += scale * p1[r] + bias * xsum[1]
                    acc[j + 2, r] += scale * p2[r] + bias * xsum[2]
                    acc[j + 3, r] += scale * p3[r] + bias * xsum[3]
        _store(acc, t, rows, out)


@_parallel_kernel
def matvec_nibbles(quants, d, m, has_min, x, rows, out):  # pragma: no cover - compiled
    """matmul_nibbles for one input row (decode at batch 1)."""
    tiles, blocks = quants.shape[0], quants.shape[1]
    for t in prange(tiles):
        part = np.empty(TILE, F32)
        acc = np.zeros((1, TILE), F32)
        for b in range(blocks):
            part[:] = 0.0
            xsum = _block_sum(x, 0, b)
            for k in range(0, NIBBLE_BYTES, 2):  # two bytes per pass: fewer part loads/stores
                c = b * 32 + k
                for r in range(TILE):
                    b0, b1 = quants[t, b, k, r], quants[t, b, k + 1, r]
                    part[r] += (F32(np.int32(b0 & 15)) * x[0, c]
                                + F32(np.int32(b0 >> 4)) * x[0, c + 16]
                                + F32(np.int32(b1 & 15)) * x[0, c + 1]
                                + F32(np.int32(b1 >> 4)) * x[0, c + 17])
            for r in range(TILE):
                scale = _f16(d[t, b, r])
                bias = _f16(m[t, b, r]) if has_min else F32(-8.0) * scale
                acc[0, r] += scale * part[r] + bias * xsum
        _store(acc, t, rows, out)


@_parallel_kernel
def matmul_int8(quants, d, x, rows, out):  # pragma: no cover - compiled
    """out[n, rows] = x[n, in] @ W.T for 8-bit blocks of 32; n a multiple of 4."""
    n, tiles, blocks = x.shape[0], quants.shape[0], quants.shape[1]
    for t in prange(tiles):
        p0 = np.empty(TILE, F32)
        p1 = np.empty(TILE, F32)
        p2 = np.empty(TILE, F32)
        p3 = np.empty(TILE, F32)
        acc = np.zeros((n, TILE), F32)
        for j in range(0, n, 4):
            for b in range(blocks):
                p0[:] = 0.0
                p1[:] = 0.0
                p2[:] = 0.0
                p3[:] = 0.0
                for k in range(0, 32, 4):  # four bytes per pass: fewer p loads/stores
                    c = b * 32 + k
                    for r in range(TILE):
                        w0 = F32(np.int32(quants[t, b, k, r]))
                        w1 = F32(np.int32(quants[t, b, k + 1, r]))
                        w2 = F32(np.int32(quants[t, b, k + 2, r]))
                        w3 = F32(np.int32(quants[t, b, k + 3, r]))
                        p0[r] += (w0 * x[j, c] + w1 * x[j, c + 1]
                                  + w2 * x[j, c + 2] + w3 * x[j, c + 3])
                        p1[r] += (w0 * x[j + 1, c] + w1 * x[j + 1, c + 1]
                                  + w2 * x[j + 1, c + 2] + w3 * x[j + 1, c + 3])
                        p2[r] += (w0 * x[j + 2, c] + w1 * x[j + 2, c + 1]
                                  + w2 * x[j + 2, c + 2] + w3 * x[j + 2, c + 3])
                        p3[r] += (w0 * x[j + 3, c] + w1 * x[j + 3, c + 1]
                                  + w2 * x[j + 3, c + 2] + w3 * x[j + 3, c + 3])
                for r in range(TILE):
                    scale = _f16(d[t, b, r])
                    acc[j, r] += scale * p0[r]
                    acc[j + 1, r] += scale * p1[r]
                    acc[j + 2, r] += scale * p2[r]
                    acc[j + 3, r] += scale * p3[r]
        _store(acc, t, rows, out)


@_parallel_kernel
def matvec_int8(quants, d, x, rows, out):  # pragma: no cover - compiled
    """matmul_int8 for one input row (decode at batch 1)."""
    tiles, blocks = quants.shape[0], quants.shape[1]
    for t in prange(tiles):
        part = np.empty(TILE, F32)
        acc = np.zeros((1, TILE), F32)
        for b in range(blocks):
            part[:] = 0.0
            for k in range(0, 32, 4):  # four bytes per pass: fewer part loads/stores
                c = b * 32 + k
                for r in range(TILE):
                    part[r] += (F32(np.int32(quants[t, b, k, r])) * x[0, c]
                                + F32(np.int32(quants[t, b, k + 1, r])) * x[0, c + 1]
                                + F32(np.int32(quants[t, b, k + 2, r])) * x[0, c + 2]
                                + F32(np.int32(quants[t, b, k + 3, r])) * x[0, c + 3])
            for r in range(TILE):
                acc[0, r] += _f16(d[t, b, r]) * part[r]
        _store(acc, t, rows, out)


@_inline
def _block_sum(x, j, b):  # pragma: no cover - compiled
    """Sum of x row j over block b: what a block's min (or Q4_0's -8 d) multiplies."""
    total = F32(0.0)
    for k in range(32):
        total += x[j, b * 32 + k]
    return total


@_inline
def _store(acc, t, rows, out):  # pragma: no cover - compiled
    for r in range(min(TILE, rows - t * TILE)):
        for j in range(acc.shape[0]):
            out[j, t * TILE + r] = acc[j, r]


@_kernel
def dequant_nibbles_t(quants, d, m, has_min, t0, t1, out):  # pragma: no cover - compiled
    """Tiles [t0, t1) as W.T: out[in, (t1 - t0) * TILE], float32. Serial: BLAS runs right
    after it with its own threads, and two thread pools handing the cores back and forth,
    each spinning while the other works, ran several times slower than this."""
    blocks = quants.shape[1]
    for i in range((t1 - t0) * blocks):
        t, b = t0 + i // blocks, i % blocks
        c = (t - t0) * TILE
        scale = np.empty(TILE, F32)
        bias = np.empty(TILE, F32)
        _block_scales(d, m, has_min, t, b, scale, bias)
        for k in range(NIBBLE_BYTES):
            lo, hi = out[b * 32 + k, c : c + TILE], out[b * 32 + 16 + k, c : c + TILE]
            for r in range(TILE):
                byte = quants[t, b, k, r]
                lo[r] = scale[r] * F32(np.int32(byte & 15)) + bias[r]
                hi[r] = scale[r] * F32(np.int32(byte >> 4)) + bias[r]


@_kernel
def dequant_int8_t(quants, d, t0, t1, out):  # pragma: no cover - compiled
    """Tiles [t0, t1) as W.T: out[in, (t1 - t0) * TILE], float32."""
    blocks = quants.shape[1]
    for i in range((t1 - t0) * blocks):
        t, b = t0 + i // blocks, i % blocks
        c = (t - t0) * TILE
        scale = np.empty(TILE, F32)
        for r in range(TILE):
            scale[r] = _f16(d[t, b, r])
        for k in range(32):
            row = out[b * 32 + k, c : c + TILE]
            for r in range(TILE):
                row[r] = scale[r] * F32(np.int32(quants[t, b, k, r]))


@_inline
def _block_scales(d, m, has_min, t, b, scale, bias):  # pragma: no cover - compiled
    for r in range(TILE):
        scale[r] = _f16(d[t, b, r])
        bias[r] = _f16(m[t, b, r]) if has_min else F32(-8.0) * scale[r]


@_kernel
def gather_nibbles(quants, d, m, has_min, ids, out):  # pragma: no cover - compiled
    """Rows `ids` of W: out[len(ids), in], float32 (embedding lookups)."""
    for i in range(ids.shape[0]):
        t, r = ids[i] // TILE, ids[i] % TILE
        for b in range(quants.shape[1]):
            scale = _f16(d[t, b, r])
            bias = _f16(m[t, b, r]) if has_min else F32(-8.0) * scale
            for k in range(NIBBLE_BYTES):
                byte = quants[t, b, k, r]
                out[i, b * 32 + k] = scale * F32(np.int32(byte & 15)) + bias
                out[i, b * 32 + 16 + k] = scale * F32(np.int32(byte >> 4)) + bias


@_kernel
def gather_int8(quants, d, ids, out):  # pragma: no cover - compiled
    """Rows `ids` of W: out[len(ids), in], float32 (embedding lookups)."""
    for i in range(ids.shape[0]):
        t, r = ids[i] // TILE, ids[i] % TILE
        for b in range(quants.shape[1]):
            scale = _f16(d[t, b, r])
            for k in range(32):
                out[i, b * 32 + k] = scale * F32(np.int32(quants[t, b, k, r]))


def launch_guard() -> AbstractContextManager[object]:
    """Held around a parallel kernel call. numba's ``workqueue`` threading layer (the fallback
    when neither OpenMP nor TBB is installed) aborts the process when two threads launch at
    once, so there launches take turns; the others are thread-safe and need no lock."""
    global _layer
    if _layer is None:
        try:
            _layer = str(numba.threading_layer())
        except ValueError:  # nothing launched yet: the first launch takes the lock
            return _serial_launches
    return _serial_launches if _layer == "workqueue" else contextlib.nullcontext()


def get_threads() -> int:
    """Kernel threads for calls made from the current thread."""
    return int(numba.get_num_threads())


def set_threads(num_threads: int) -> int:
    """Kernel threads for calls made from the current thread (numba's setting is per thread);
    clamped to the pool numba started with. Returns the number set."""
    pool = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    num_threads = max(1, min(num_threads, pool))
    numba.set_num_threads(num_threads)
    numba.set_parallel_chunksize(PARALLEL_CHUNK)
    return num_threads

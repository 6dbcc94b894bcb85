"""Linear layers over GGUF quantized blocks, kept exactly as the source file made them.

A ``BlockLinear`` holds one weight `[out, in]` as its GGUF blocks (docs/engine-format.md,
`quantization.weights = "source"`). Two ways to compute with them:

- compiled kernels (numba, the ``cpu`` extra) for Q4_0, Q4_1 and Q8_0: the blocks are rearranged
  once at load (the same bytes, not widened) into row tiles (see block_kernels), products with up
  to ``KERNEL_MAX_ROWS`` input rows read the packed bytes directly, larger ones dequantize a tile
  of W.T at a time into a cache-sized float32 buffer and hand it to BLAS;
- the NumPy reference for every other block type, and for all of them when numba is absent:
  row tiles dequantized with the ``gguf`` package's own decoder, then BLAS. Tests compare the
  kernels against it. An engine does not serve the other types this way (decoding at every
  product is about 30x slower than BLAS on the result): a type whose values a kernel type
  holds exactly is re-encoded as that type once at load (``reencode_blocks``: Q5_0 as Q8_0),
  the rest are widened to float32 once at load (``widen_blocks``, the same decoder).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import numpy as np

from server.executor.cpu.activations import integer_kernels
from server.executor.cpu.blas import set_thread_blas_threads, thread_blas_threads
from server.executor.cpu.linears import DenseLinear

# Input rows up to which the kernels multiply straight from the packed bytes: every decode step
# of a 32-slot engine. At 32 rows they matched dequantize + BLAS (about 30 GMAC/s on one core,
# either way) and keep decode steps off BLAS, whose idle threads spin against the kernels'.
# Prefill chunks past this go through BLAS, which gains more from many rows.
KERNEL_MAX_ROWS = 64
# Elements of the float32 tile a matmul dequantizes into: 256K = 1 MiB, within a 2 MiB L2.
_TILE_ELEMENTS = 1 << 18
# Byte offsets inside a 32-weight block of the types the kernels read: (scale, min, quants).
_KERNEL_LAYOUTS: dict[str, tuple[int, int | None, int]] = {
    "Q4_0": (0, None, 2),
    "Q4_1": (0, 2, 4),
    "Q8_0": (0, None, 2),
}
# Types re-encoded at load as a kernel type that holds their values exactly: a Q5_0 weight is
# d * (q - 16) with q 5 bits and d float16, so q - 16 is an int8 of a Q8_0 block of the same d.
_REENCODED = {"Q5_0": "Q8_0"}
_scratch = threading.local()  # .buf: one float32 tile per calling thread, shared by all layers
_pools: dict[int, ThreadPoolExecutor] = {}  # helper pools by size (one per thread setting)
_pool_lock = threading.Lock()


def block_geometry(qtype: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a GGML type name; ValueError if unknown."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    except KeyError:
        raise ValueError(f"unknown GGML block type {qtype!r}") from None


def load_kernels() -> ModuleType | None:
    """The compiled kernels, or None when numba is not installed."""
    try:
        from server.executor.cpu import block_kernels
    except ImportError:
        return None
    return block_kernels


def _helpers(threads: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``threads`` helpers whose BLAS calls use one thread each."""
    with _pool_lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = _pools[threads] = ThreadPoolExecutor(
                threads, thread_name_prefix="block-tiles", initializer=set_thread_blas_threads,
                initargs=(1,))
        return pool


def _scratch_buffer(elements: int) -> np.ndarray:
    buf: np.ndarray | None = getattr(_scratch, "buf", None)
    if buf is None or buf.size < elements:
        buf = _scratch.buf = np.empty(max(elements, _TILE_ELEMENTS), np.float32)
    return buf[:elements]


class BlockLinear:
    """`W [out, in]` as GGUF blocks; calling it computes `x @ W.T` with float32 accumulation.
    ``activations`` (activations.py, resolved: float32, int16 or int8) picks the kernels for
    products of up to ``KERNEL_MAX_ROWS`` rows."""

    def __init__(self, qtype: str, raw: np.ndarray, *, use_kernels: bool = True,
                 activations: str = "float32") -> None:
        block, type_size = block_geometry(qtype)
        raw = np.ascontiguousarray(raw, dtype=np.uint8)  # [out, row bytes]
        if raw.ndim != 2 or raw.shape[1] % type_size:
            raise ValueError(f"{qtype} blocks of {type_size} bytes do not tile a row of "
                             f"{raw.shape[1:]} bytes")
        self.qtype = qtype
        self.out_features = raw.shape[0]
        self.in_features = raw.shape[1] // type_size * block
        kernels = load_kernels() if use_kernels and qtype in _KERNEL_LAYOUTS else None
        self._kernels = kernels
        self._integer = integer_kernels() if kernels is not None and activations != "float32" \
            else None
        if activations != "float32" and kernels is not None and self._integer is None:
            raise ValueError(f"{activations} activations need a CPU with AVX-512 VNNI")
        self.activations = activations if self._integer is not None else "float32"
        self._raw: np.ndarray | None = None
        if kernels is None:
            self._raw = raw
        else:
            self._tiles = _to_tiles(raw, qtype, kernels.TILE)

    @property
    def compiled(self) -> bool:
        """True when products run on the compiled kernels (else on the NumPy reference)."""
        return self._kernels is not None

    @staticmethod
    def has_kernels(qtype: str) -> bool:
        return qtype in _KERNEL_LAYOUTS

    @property
    def nbytes(self) -> int:
        if self._raw is not None:
            return int(self._raw.nbytes)
        return sum(int(a.nbytes) for a in self._tiles if isinstance(a, np.ndarray))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)  # [n, in]
        if self._kernels is None:
            return self._reference_matmul(x)
        if x.shape[0] <= KERNEL_MAX_ROWS:
            return self._kernel_matmul(x)
        return self._tiled_matmul(x)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of W as float32 `[k, in]` (embedding lookups)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._kernels is None:
            assert self._raw is not None
            return _dequantize(self._raw[ids], self.qtype)
        out = np.empty((len(ids), self.in_features), np.float32)
        quants, d, m = self._tiles
        if self.qtype == "Q8_0":
            self._kernels.gather_int8(quants, d, ids, out)
        else:
            self._kernels.gather_nibbles(quants, d, m if m is not None else d, m is not None,
                                         ids, out)
        return out

    # -- the three paths ------------------------------------------------------------------

    def _kernel_matmul(self, x: np.ndarray) -> np.ndarray:
        assert self._kernels is not None
        n = x.shape[0]
        # A single row of Q8_0 takes the float kernel: regrouping a tile's bytes for the
        # integer one (and summing them) costs more than one row's product gains.
        if self._integer is not None and (n > 1 or self.qtype != "Q8_0"):
            return self._integer_matmul(self._integer, x)
        if n > 1 and n % 4:  # the multi-row kernels take rows four at a time
            x = np.concatenate([x, np.zeros((4 - n % 4, x.shape[1]), np.float32)])
        out = np.empty((x.shape[0], self.out_features), np.float32)  # [n, out]
        quants, d, m = self._tiles
        kernels = self._kernels
        with kernels.launch_guard():
            if self.qtype == "Q8_0":
                kernel = kernels.matvec_int8 if n == 1 else kernels.matmul_int8
                kernel(quants, d, x, self.out_features, out)
            else:
                kernel = kernels.matvec_nibbles if n == 1 else kernels.matmul_nibbles
                kernel(quants, d, m if m is not None else d, m is not None, x,
                       self.out_features, out)
        return out[:n]

    def _integer_matmul(self, kernels: ModuleType, x: np.ndarray) -> np.ndarray:
        """x quantized per block of 32 (int16: two bytes, int8: one), then integer products."""
        assert self._kernels is not None
        n, width = x.shape
        split, unsigned = self.activations == "int16", self.qtype == "Q8_0"
        high = np.empty((n, width), np.uint8)
        low = np.empty((n, width), np.uint8)
        dx = np.empty((n, width // 32), np.float32)  # activation scale per block
        sx = np.empty((n, width // 32), np.float32)  # activation sum per block
        kernels.quantize_rows(x, split, unsigned, high, low, dx, sx)
        high_w, low_w = high.reshape(-1).view(np.int32), low.reshape(-1).view(np.int32)
        out = np.empty((n, self.out_features), np.float32)  # [n, out]
        quants, d, m = self._tiles
        with self._kernels.launch_guard():
            if unsigned:
                kernels.matmul_int8(quants, d, high_w, low_w, split, dx, self.out_features, out)
            else:
                kernels.matmul_nibbles(quants, d, m if m is not None else d, m is not None,
                                       high_w, low_w, split, dx, sx, self.out_features, out)
        return out

    def _tiled_matmul(self, x: np.ndarray) -> np.ndarray:
        """Dequantizes W.T a few tiles at a time into an L2-sized buffer for BLAS; with more
        than one thread, helper threads take equal shares of the tiles, each with one BLAS
        thread (one pool, no second set of spinning BLAS workers against the kernels')."""
        assert self._kernels is not None
        out = np.empty((x.shape[0], self.out_features), np.float32)  # [n, out]
        tiles = self._tiles[0].shape[0]
        threads = min(self._kernels.get_threads(), tiles)
        if threads == 1:
            self._tiled_range(x, out, 0, tiles)
            return out
        bounds = np.linspace(0, tiles, threads + 1).astype(int)
        pool = _helpers(threads)
        jobs = [pool.submit(self._tiled_range, x, out, int(a), int(b))
                for a, b in itertools.pairwise(bounds)]
        for job in jobs:
            job.result()
        return out

    def _tiled_range(self, x: np.ndarray, out: np.ndarray, first: int, last: int) -> None:
        """out[:, rows of tiles first..last) = x @ those rows of W.T."""
        assert self._kernels is not None
        kernels, (quants, d, m) = self._kernels, self._tiles
        tile = kernels.TILE
        step = max(1, _TILE_ELEMENTS // (self.in_features * tile))  # tiles per buffer
        buf = _scratch_buffer(self.in_features * step * tile)
        for t0 in range(first, last, step):
            t1 = min(t0 + step, last)
            wt = buf[: self.in_features * (t1 - t0) * tile].reshape(self.in_features, -1)
            if self.qtype == "Q8_0":
                kernels.dequant_int8_t(quants, d, t0, t1, wt)
            else:
                kernels.dequant_nibbles_t(quants, d, m if m is not None else d, m is not None,
                                          t0, t1, wt)
            r0, r1 = t0 * tile, min(t1 * tile, self.out_features)
            out[:, r0:r1] = x @ wt[:, : r1 - r0]

    def _reference_matmul(self, x: np.ndarray) -> np.ndarray:
        assert self._raw is not None
        out = np.empty((x.shape[0], self.out_features), np.float32)  # [n, out]
        step = max(1, _TILE_ELEMENTS // self.in_features)
        for r0 in range(0, self.out_features, step):
            w = _dequantize(self._raw[r0 : r0 + step], self.qtype)  # [rows, in]
            out[:, r0 : r0 + step] = x @ w.T
        return out


def reencoded_type(qtype: str) -> str | None:
    """The kernel type ``reencode_blocks`` turns qtype's blocks into, or None."""
    return _REENCODED.get(qtype)


def reencode_blocks(raw: np.ndarray, qtype: str) -> np.ndarray:
    """[out, row bytes] blocks -> the same weights, exactly, as blocks of
    ``reencoded_type(qtype)`` ([out, row bytes of that type])."""
    if qtype != "Q5_0":
        raise ValueError(f"{qtype} blocks have no exact re-encoding")
    out = raw.shape[0]
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(out, -1, 22)
    # Q5_0: d (float16), qh (32 high bits, little-endian), 16 bytes of low nibbles: byte k
    # holds weight k (low nibble) and weight k + 16 (high nibble); bit j of qh, weight j's 5th.
    qh = np.ascontiguousarray(blocks[..., 2:6]).view("<u4")  # [out, blocks, 1]
    high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4  # [out, blocks, 32]
    qs = blocks[..., 6:]
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [out, blocks, 32]
    q = ((low | high).astype(np.int16) - 16).astype(np.int8)
    return np.concatenate([blocks[..., :2], q.view(np.uint8)], axis=-1).reshape(out, -1)


def widen_blocks(raw: np.ndarray, qtype: str) -> np.ndarray:
    """[out, row bytes] blocks -> the float32 weight `[out, in]` they encode."""
    out = raw.shape[0]
    return _dequantize(np.ascontiguousarray(raw, dtype=np.uint8), qtype).reshape(out, -1)


def _dequantize(raw: np.ndarray, qtype: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return np.asarray(dequantize(raw, GGMLQuantizationType[qtype]), dtype=np.float32)


def _to_tiles(raw: np.ndarray, qtype: str, tile: int) -> tuple[np.ndarray, np.ndarray,
                                                                np.ndarray | None]:
    """[out, row bytes] blocks -> (quants [T, blocks, bytes, tile], d [T, blocks, tile] and
    m (or None) as float16 bits); rows padded with zero blocks to a whole number of tiles."""
    _, type_size = block_geometry(qtype)
    d_at, m_at, q_at = _KERNEL_LAYOUTS[qtype]
    out_features, num_blocks = raw.shape[0], raw.shape[1] // type_size
    tiles = -(-out_features // tile)
    blocks = np.zeros((tiles * tile, num_blocks, type_size), np.uint8)
    blocks[:out_features] = raw.reshape(out_features, num_blocks, type_size)

    def half(at: int) -> np.ndarray:
        bits = np.ascontiguousarray(blocks[..., at : at + 2]).view(np.uint16)[..., 0]
        if not np.isfinite(bits.view(np.float16)).all():
            raise ValueError(f"{qtype} blocks carry a non-finite scale")
        return np.ascontiguousarray(bits.reshape(tiles, tile, num_blocks).transpose(0, 2, 1))

    quants = blocks[..., q_at:].reshape(tiles, tile, num_blocks, -1).transpose(0, 2, 3, 1)
    quants = np.ascontiguousarray(quants)
    if qtype == "Q8_0":
        quants = quants.view(np.int8)
    return quants, half(d_at), None if m_at is None else half(m_at)


class WidenedLinear(DenseLinear):
    """A float32 weight widened at load from blocks that have no kernels (``widen_blocks``),
    in an engine whose other weights run on the kernels. With more than one thread its
    products are split by output rows among the kernels' helper threads, one BLAS thread each:
    OpenBLAS's own threads, left spinning after each call, kept the kernels' threads off the
    cores (a 2-thread decode step of Gemma 3 270M took 240-580 ms instead of about 45)."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)  # [n, in]
        out = np.empty((x.shape[0], self.out_features), np.float32)  # [n, out]
        threads = min(thread_blas_threads() or 1, self.out_features)
        if threads == 1:
            self._part(x, out, 0, self.out_features)
            return out
        bounds = np.linspace(0, self.out_features, threads + 1).astype(int)
        pool = _helpers(threads)
        jobs = [pool.submit(self._part, x, out, int(a), int(b))
                for a, b in itertools.pairwise(bounds)]
        for job in jobs:
            job.result()
        return out

    def _part(self, x: np.ndarray, out: np.ndarray, first: int, last: int) -> None:
        """out[:, first:last] = x @ W[first:last].T"""
        w = self.weight[first:last]
        if x.shape[0] <= KERNEL_MAX_ROWS:  # few rows: the weight on the left runs faster
            out[:, first:last] = (w @ x.T).T
        else:
            out[:, first:last] = x @ w.T


class StackedLinear:
    """Linears of different block types stacked along the output axis (a fused q/k/v whose
    parts the source stored in different types): one product per part."""

    def __init__(self, parts: Sequence[Any]) -> None:
        self.parts = tuple(parts)
        self.in_features = self.parts[0].in_features
        if any(p.in_features != self.in_features for p in self.parts):
            raise ValueError("stacked linears must share in_features")
        self.out_features = sum(p.out_features for p in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(int(p.nbytes) for p in self.parts)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([p(x) for p in self.parts], axis=1)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.in_features), np.float32)
        start = 0
        for part in self.parts:
            mine = (ids >= start) & (ids < start + part.out_features)
            if mine.any():
                out[mine] = part.rows(ids[mine] - start)
            start += part.out_features
        return out

"""Linear layers of a CPU engine: dense float32 and weight-only INT8/INT4, all computing
`x @ W.T`.

Quantized weights stay quantized at run time (see docs/engine-format.md for the layout). A matmul
`x @ W.T` dequantizes W in row tiles into one reusable float32 buffer sized to stay in L2, so the
full float32 matrix never exists and the GEMM reads the tile from cache right after writing it.
(The GGUF block types of ``source`` engines are in block_weights.)
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from server.executor.cpu.blas import thread_blas_threads

# Elements per dequantized tile: 256K float32 = 1 MiB, a quarter of this machine's L2.
_TILE_ELEMENTS = 1 << 18
# Up to this many input rows, matmuls put the weight on the left (see _matmul_wt).
_SMALL_BATCH_ROWS = 64
# From 2 up to this many input rows, dense matmuls run in row tiles of the weight of about
# _DENSE_TILE_BYTES each (see _matmul_wt).
_DENSE_TILED_MAX_ROWS = 8
_DENSE_TILE_BYTES = 384 << 10
# Int4 matmuls with at most this many input rows take the grouped path (see Int4Linear).
_INT4_GROUPED_MAX_ROWS = 4


class Linear(Protocol):
    """`W [out_features, in_features]`; calling it computes `x @ W.T`."""

    out_features: int
    in_features: int

    @property
    def nbytes(self) -> int: ...

    def __call__(self, x: np.ndarray) -> np.ndarray: ...  # [n, in] -> [n, out]

    def rows(self, ids: np.ndarray) -> np.ndarray: ...  # [k] -> [k, in] float32 (embedding)


def _matmul_wt(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [n, in] @ w[out, in].T -> [n, out] (C order).

    For few rows OpenBLAS is faster with the weight as the left operand: measured on the
    135M model's layer shapes (interleaved, single thread), `W @ x.T` ran 1.4x faster than
    `x @ W.T` at n = 32 and no slower at n = 1; for prefill-sized n the usual form is kept.

    With one BLAS thread, from 2 to 8 rows the GEMM runs over row tiles of W of a few hundred
    KiB: one whole-matrix call at 2 rows took twice as long as the matrix-vector product at 1
    row (OpenBLAS packs the whole weight, a second pass over memory), while tiles that stay in
    L2 bring 2 rows back to the cost of 1 and 4 rows to 1.1x (the 135M model's 30 layers:
    81 -> 35 ms at n = 2, 67 -> 42 ms at n = 4). From about 12 rows tiling stops paying, and
    with two threads each small call also pays the threads' hand-off, so it was no faster
    at 4 rows and slower at 8 (then the whole matrix is used).
    """
    n = x.shape[0]
    if n > _SMALL_BATCH_ROWS:
        return x @ w.T
    if n == 1 or n > _DENSE_TILED_MAX_ROWS or thread_blas_threads() != 1:
        return np.ascontiguousarray((w @ x.T).T)
    step = max(16, _DENSE_TILE_BYTES // (w.shape[1] * w.itemsize))
    xt = np.ascontiguousarray(x.T)
    out = np.empty((w.shape[0], n), np.float32)
    for r0 in range(0, w.shape[0], step):
        np.matmul(w[r0 : r0 + step], xt, out=out[r0 : r0 + step])
    return np.ascontiguousarray(out.T)


class DenseLinear:
    def __init__(self, weight: np.ndarray) -> None:
        self.weight = np.ascontiguousarray(weight, dtype=np.float32)  # [out, in]
        self.out_features, self.in_features = self.weight.shape

    @property
    def nbytes(self) -> int:
        return int(self.weight.nbytes)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return _matmul_wt(x, self.weight)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return self.weight[ids]


class _TiledLinear:
    """Shared tiling for quantized layers: subclasses dequantize rows [r0, r1) into `buf`."""

    out_features: int
    in_features: int

    def _init_tiles(self) -> None:
        self._tile_rows = max(8, _TILE_ELEMENTS // self.in_features)
        rows = min(self._tile_rows, self.out_features)
        self._buf = np.empty((rows, self.in_features), np.float32)

    def _dequant_into(self, r0: int, r1: int, buf: np.ndarray) -> None:
        raise NotImplementedError

    def _matmul_input(self, x: np.ndarray) -> np.ndarray:
        return x

    def _tile_epilogue(self, x: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
        pass

    def __call__(self, x: np.ndarray) -> np.ndarray:
        xm = self._matmul_input(x)
        out = np.empty((x.shape[0], self.out_features), np.float32)  # [n, out]
        for r0 in range(0, self.out_features, self._tile_rows):
            r1 = min(r0 + self._tile_rows, self.out_features)
            buf = self._buf[: r1 - r0]
            self._dequant_into(r0, r1, buf)
            out[:, r0:r1] = _matmul_wt(xm, buf)
            self._tile_epilogue(x, out, r0, r1)
        return out


class Int8Linear(_TiledLinear):
    """Per-output-channel symmetric int8: `W ≈ qweight * scales[:, None]`.

    The scale is applied to the output columns after the GEMM, so dequantizing a tile is a
    single int8 -> float32 cast.
    """

    def __init__(self, qweight: np.ndarray, scales: np.ndarray) -> None:
        self.qweight = np.ascontiguousarray(qweight, dtype=np.int8)  # [out, in]
        self.scales = np.ascontiguousarray(scales, dtype=np.float32)  # [out]
        self.out_features, self.in_features = self.qweight.shape
        self._init_tiles()

    @property
    def nbytes(self) -> int:
        return int(self.qweight.nbytes + self.scales.nbytes)

    def _dequant_into(self, r0: int, r1: int, buf: np.ndarray) -> None:
        np.copyto(buf, self.qweight[r0:r1], casting="unsafe")

    def _tile_epilogue(self, x: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
        out[:, r0:r1] *= self.scales[r0:r1]

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return self.qweight[ids].astype(np.float32) * self.scales[ids, None]


class Int4Linear(_TiledLinear):
    """Group-wise symmetric int4, two values per byte (low nibble = even column), stored `q + 8`.

    `W = (u - 8) * s` with u the stored nibble, so `x @ W.T = x @ (u * s).T - 8 * xg @ s.T`
    where xg sums x over each group: the offset costs one small GEMM instead of a pass over W.
    At load the packed bytes are rearranged (not widened) to `[groups, g/2, out]`, so a tile of
    output rows unpacks into W.T in the input order [nibble, group, g/2]: every NumPy pass runs
    along the long output axis, and the per-group GEMMs read contiguous operands. Measured on
    the default model, one thread: 1.4x faster batch-1 decode than unpacking `[out, in]` rows,
    whose per-group strided inner loops are 16 elements long.
    """

    def __init__(self, qweight: np.ndarray, scales: np.ndarray, group_size: int) -> None:
        qweight = np.asarray(qweight, dtype=np.uint8)  # [out, in // 2]
        scales = np.asarray(scales, dtype=np.float32)  # [out, in // g]
        self.group_size = group_size
        self.out_features = qweight.shape[0]
        self.in_features = qweight.shape[1] * 2
        if group_size % 2 or self.in_features % group_size:
            raise ValueError(f"int4 group size {group_size} does not divide {self.in_features}")
        self.num_groups = self.in_features // group_size
        if scales.shape != (self.out_features, self.num_groups):
            raise ValueError(f"int4 scales shape {scales.shape} does not match weight")
        half = group_size // 2
        # [out, groups, g/2] -> [groups, g/2, out]: the same bytes, output axis innermost.
        self._packed_t = np.ascontiguousarray(
            qweight.reshape(self.out_features, self.num_groups, half).transpose(1, 2, 0))
        self._scales_t = np.ascontiguousarray(scales.T)  # [groups, out]
        self._init_tiles()
        self._nibbles = np.empty(self._buf.size, np.uint8)

    @property
    def qweight(self) -> np.ndarray:
        """The packed weight in the file layout, uint8 [out, in // 2] (a copy)."""
        return self._packed_t.transpose(2, 0, 1).reshape(self.out_features, -1)

    @property
    def scales(self) -> np.ndarray:
        """float32 [out, in // g] (a view)."""
        return self._scales_t.T

    @property
    def nbytes(self) -> int:
        return int(self._packed_t.nbytes + self._scales_t.nbytes)

    def _unpack_t(self, r0: int, r1: int) -> np.ndarray:
        """Stored nibbles u of output rows [r0, r1) as float32 [2, groups, g/2, rows] (W.T)."""
        rows, shape = r1 - r0, (2, self.num_groups, self.group_size // 2, r1 - r0)
        packed = self._packed_t[:, :, r0:r1]  # [groups, g/2, rows]
        nib = self._nibbles[: self.in_features * rows].reshape(shape)
        np.bitwise_and(packed, 0x0F, out=nib[0])
        np.right_shift(packed, 4, out=nib[1])
        buf = self._buf.reshape(-1)[: self.in_features * rows].reshape(shape)
        np.copyto(buf, nib, casting="unsafe")
        return buf

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n, groups, half = x.shape[0], self.num_groups, self.group_size // 2
        # [n, groups, g/2, 2] -> [2, groups, n, g/2]: x in the tile's input order.
        xh = np.ascontiguousarray(x.reshape(n, groups, half, 2).transpose(3, 1, 0, 2))
        grouped = n <= _INT4_GROUPED_MAX_ROWS
        xt = None if grouped else xh.transpose(2, 0, 1, 3).reshape(n, -1)  # [n, in]
        out = np.empty((n, self.out_features), np.float32)
        for r0 in range(0, self.out_features, self._tile_rows):
            r1 = min(r0 + self._tile_rows, self.out_features)
            wt = self._unpack_t(r0, r1)  # [2, groups, g/2, rows]
            if xt is None:
                out[:, r0:r1] = self._grouped_tile(xh, wt, r0, r1)
            else:
                np.multiply(wt, self._scales_t[None, :, None, r0:r1], out=wt)
                out[:, r0:r1] = xt @ wt.reshape(self.in_features, r1 - r0)
        xg = x.reshape(n, groups, self.group_size).sum(axis=2)  # [n, groups]
        out -= 8.0 * (xg @ self._scales_t)
        return out

    def _grouped_tile(self, xh: np.ndarray, wt: np.ndarray, r0: int, r1: int) -> np.ndarray:
        """Decode path: the tile gets only the nibble cast (no scale pass); one small GEMM per
        group and nibble gives partial sums, scaled and summed after. Cheaper than scaling the
        tile while n is small, since partials grow with n."""
        partial = xh @ wt  # [2, groups, n, rows]
        return np.einsum("gnr,gr->nr", partial[0] + partial[1], self._scales_t[:, r0:r1])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        packed = self._packed_t[:, :, ids].transpose(2, 0, 1)  # [k, groups, g/2]
        q = np.empty((*packed.shape, 2), np.float32)  # [k, groups, g/2, 2]: column order
        q[..., 0] = packed & 0x0F
        q[..., 1] = packed >> 4
        q -= 8.0
        w = q.reshape(len(ids), self.num_groups, self.group_size) * self.scales[ids, :, None]
        return w.reshape(len(ids), self.in_features)

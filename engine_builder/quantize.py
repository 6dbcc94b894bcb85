"""Weight-only quantization in the layouts of docs/engine-format.md (NumPy, vectorized).

- int8: per-output-channel symmetric. ``W ≈ qweight * scales[:, None]``, scale = max|w| / 127,
  so |error| <= scale / 2 for every element.
- int4: group-wise symmetric over ``g`` input columns, packed two per byte (low nibble = even
  column, high nibble = odd column, each stored as ``q + 8``). ``W[o, c] ≈ q[o, c] *
  scales[o, c // g]``, q in [-8, 7].

Each int4 group's scale minimizes the squared reconstruction error ``||q * s - w||²`` over a set
of candidates instead of taking max|w| / 7. With 16 levels, stretching the grid to cover the
single largest weight wastes resolution on all the others; clipping outliers a little and using
the extra code -8 when the extreme weight is negative cut the error of the default model's
weights by ~1.4x and its int4 (g = 32) perplexity from 43.6 to 38.5 (fp32: 29.45). The same fit for
int8 rows lowered the weight error by only ~1% and measured slightly worse (perplexity 29.8 vs
29.5), so int8 keeps max-abs.
"""

from __future__ import annotations

import numpy as np

INT8_QMAX = 127
INT4_QMIN, INT4_QMAX = -8, 7

# Candidate int4 scales, as fractions of the smallest scale that clips nothing. Each candidate
# rounds the group, then gets its least-squares scale for that rounding; the best one wins.
_INT4_SHRINK = np.linspace(1.0, 0.55, 19)
# Rows of groups fitted at once: ~256K elements keeps the temporaries in L2.
_CHUNK_ELEMENTS = 1 << 18


def _round(w: np.ndarray, inv_scale: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out [n, g] = clip(rint(w * inv_scale[:, None])) in [-8, 7], as float32."""
    np.multiply(w, inv_scale[:, None], out=out)
    np.rint(out, out=out)
    return np.clip(out, INT4_QMIN, INT4_QMAX, out=out)


def _fit_int4_chunk(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [n, g] float32 -> (q int8 [n, g], scales float32 [n]) minimizing ||q * s - w||²."""
    hi, lo = w.max(axis=1), w.min(axis=1)  # [n]
    # The smallest scale at which neither the largest nor the most negative weight clips.
    base = np.maximum(hi / INT4_QMAX, lo / INT4_QMIN)  # [n], >= 0
    inv_base = np.divide(1.0, base, out=np.zeros_like(base), where=base > 0)
    # max|w| / 7 is a candidate too, so no group ends up worse than under that scheme.
    amax = np.maximum(hi, -lo)
    inv_amax = np.divide(INT4_QMAX, amax, out=np.zeros_like(amax), where=amax > 0)
    candidates = [inv_base / r for r in _INT4_SHRINK] + [inv_amax]
    best_gain = np.full(base.shape, -1.0, np.float32)
    best_inv = inv_base.copy()
    q = np.empty_like(w)
    for inv in candidates:  # [n] each
        _round(w, inv, q)
        wq, qq = np.einsum("ng,ng->n", w, q), np.einsum("ng,ng->n", q, q)
        # With the least-squares scale s = wq / qq the error is ||w||² - wq² / qq.
        gain = np.divide(wq * wq, qq, out=np.zeros_like(wq), where=qq > 0)
        better = gain > best_gain
        best_gain[better], best_inv[better] = gain[better], inv[better]
    _round(w, best_inv, q)
    wq, qq = np.einsum("ng,ng->n", w, q), np.einsum("ng,ng->n", q, q)
    # An all-zero group gets scale 1 (positive, finite); its q is all zeros anyway.
    scales = np.divide(wq, qq, out=np.ones_like(wq), where=qq > 0)
    return q.astype(np.int8), scales.astype(np.float32)


def _fit_int4(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """groups [n, g] -> (q int8 [n, g], scales float32 [n]), in cache-sized chunks."""
    n, g = groups.shape
    q = np.empty((n, g), np.int8)
    scales = np.empty(n, np.float32)
    step = max(1, _CHUNK_ELEMENTS // g)
    for r0 in range(0, n, step):
        q[r0 : r0 + step], scales[r0 : r0 + step] = _fit_int4_chunk(groups[r0 : r0 + step])
    return q, scales


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [out, in] float -> (qweight int8 [out, in], scales float32 [out])."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=1)  # [out]
    # An all-zero row gets scale 1 so dividing is safe; its q is all zeros anyway.
    scales = np.where(amax > 0, amax / INT8_QMAX, 1.0).astype(np.float32)
    q = np.rint(w / scales[:, None])
    return np.clip(q, -INT8_QMAX, INT8_QMAX).astype(np.int8), scales


def dequantize_int8(qweight: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return qweight.astype(np.float32) * scales[:, None]


def check_int4_shape(shape: tuple[int, ...], group_size: int) -> None:
    """ValueError unless a [out, in] weight can be grouped by group_size and packed in pairs."""
    if group_size < 2 or group_size % 2:
        raise ValueError(f"int4 group size must be even and >= 2, got {group_size}")
    if len(shape) != 2 or shape[1] % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide the input width of a "
                         f"{list(shape)} weight")


def quantize_int4(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """w [out, in] float -> (qweight uint8 [out, in // 2], scales float32 [out, in // g])."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    check_int4_shape(w.shape, group_size)
    out_dim, in_dim = w.shape
    groups = w.reshape(-1, group_size)  # [out * n_groups, g]
    q, scales = _fit_int4(groups)
    return pack_int4(q.reshape(out_dim, in_dim)), scales.reshape(out_dim, in_dim // group_size)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """q int [out, in] in [-8, 7] -> uint8 [out, in // 2]: low nibble even column, high odd."""
    biased = (q.astype(np.int16) + 8).astype(np.uint8)  # [out, in] in [0, 15]
    return biased[:, 0::2] | (biased[:, 1::2] << 4)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 [out, in // 2] -> int8 [out, in] in [-8, 7]."""
    out_dim, half = packed.shape
    q = np.empty((out_dim, half * 2), dtype=np.int8)
    q[:, 0::2] = (packed & 0x0F).astype(np.int8) - 8
    q[:, 1::2] = (packed >> 4).astype(np.int8) - 8
    return q


def dequantize_int4(qweight: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    q = unpack_int4(qweight).astype(np.float32)  # [out, in]
    return q * np.repeat(scales, group_size, axis=1)

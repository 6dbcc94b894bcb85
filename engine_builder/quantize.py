"""Weight-only quantization in the layouts of docs/engine-format.md (NumPy, vectorized).

- int8: per-output-channel symmetric. ``W ≈ qweight * scales[:, None]``, |error| <= scale / 2.
- int4: group-wise symmetric over ``g`` input columns, packed two per byte (low nibble = even
  column, high nibble = odd column, each stored as ``q + 8``). ``W[o, c] ≈ q[o, c] *
  scales[o, c // g]``, |error| <= scale / 2. Scales use amax / 7, so q stays in [-7, 7] and the
  bound holds for every element; -8 is never produced but is valid input to dequantize.
"""

from __future__ import annotations

import numpy as np

INT8_QMAX = 127
INT4_QMAX = 7


def _safe_scale(amax: np.ndarray, qmax: int) -> np.ndarray:
    # An all-zero row or group gets scale 1 so dividing is safe; its q is all zeros anyway.
    return np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [out, in] float -> (qweight int8 [out, in], scales float32 [out])."""
    w = np.asarray(w, dtype=np.float32)
    scales = _safe_scale(np.abs(w).max(axis=1), INT8_QMAX)  # [out]
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
    w = np.asarray(w, dtype=np.float32)
    check_int4_shape(w.shape, group_size)
    out_dim, in_dim = w.shape
    groups = w.reshape(out_dim, in_dim // group_size, group_size)  # [out, n_groups, g]
    scales = _safe_scale(np.abs(groups).max(axis=2), INT4_QMAX)  # [out, n_groups]
    q = np.clip(np.rint(groups / scales[:, :, None]), -8, INT4_QMAX).astype(np.int8)
    return pack_int4(q.reshape(out_dim, in_dim)), scales


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

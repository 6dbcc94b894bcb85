"""Reading safetensors files as float32 NumPy arrays, bfloat16 included.

``safetensors.numpy`` cannot return bfloat16 (NumPy has no such dtype), yet most Hugging Face
checkpoints are stored in it. The format is simple (8-byte little-endian header length, JSON
header, raw little-endian data), so tensors are read from a memory map and widened here.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

_NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
}
_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: Path) -> dict[str, dict]:
    """Tensor name -> {"dtype", "shape", "data_offsets"}; raises ValueError when malformed."""
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw_len)
        if length > _MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file (header length {length})")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: corrupt safetensors header: {exc}") from exc
    header.pop("__metadata__", None)
    return {name: {**info, "base": 8 + length} for name, info in header.items()}


def iter_float32(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) for every floating tensor in the file, in file order."""
    header = read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        start, end = info["data_offsets"]
        raw = data[info["base"] + start:info["base"] + end]
        yield name, _to_float32(raw, info["dtype"], tuple(info["shape"]), path, name)


def _to_float32(raw: np.ndarray, dtype: str, shape: tuple[int, ...], path: Path,
                name: str) -> np.ndarray:
    if dtype == "BF16":
        # bfloat16 is the top half of a float32: widen by shifting into the high 16 bits.
        wide = raw.view("<u2").astype(np.uint32) << 16
        return wide.view(np.float32).reshape(shape)
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(f"{path}: tensor {name} has unsupported dtype {dtype}")
    return raw.view(np.dtype(_NUMPY_DTYPES[dtype]).newbyteorder("<")).reshape(shape).astype(
        np.float32)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], *, dtype: str = "F32") -> Path:
    """Writes float tensors as F32 or BF16 (truncated; used to make test checkpoints)."""
    header: dict[str, object] = {}
    blobs: list[bytes] = []
    offset = 0
    for name, array in tensors.items():
        a = np.ascontiguousarray(array, dtype=np.float32)
        blob = ((a.view(np.uint32) >> 16).astype("<u2") if dtype == "BF16" else a.astype("<f4"))
        raw = blob.tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # keeps the data 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for raw in blobs:
            f.write(raw)
    return path

"""GGUF blocks of random weights, for the block-weight kernel tests."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import quantize


def quantized_blocks(qtype: str, out: int, width: int, seed: int) -> np.ndarray:
    """[out, row bytes] blocks of random weights, quantized by the gguf package."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((out, width)) * 0.05).astype(np.float32)
    return np.asarray(quantize(w, GGMLQuantizationType[qtype]))

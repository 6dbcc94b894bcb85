"""The compiled per-step kernels (step_kernels.py) when numba is installed (the ``cpu`` extra);
without it every caller runs its NumPy reference."""

from __future__ import annotations

import functools
from types import ModuleType

import numpy as np


@functools.cache
def step_kernels() -> ModuleType | None:
    """The step kernels, or None when numba is not installed."""
    try:
        from server.executor.cpu import step_kernels as kernels
    except ImportError:
        return None
    return kernels


def compiled_for(*arrays: np.ndarray) -> ModuleType | None:
    """The step kernels if they take these arrays (all float32), else None."""
    kernels = step_kernels()
    if kernels is None or any(a.dtype != np.float32 for a in arrays):
        return None
    return kernels

"""What the compiled kernels of ``source`` engines do with their input rows (activations).

- ``float32``: the float kernels (block_kernels) multiply them as they are;
- ``int16``: the integer kernels (vnni_kernels) quantize each block of 32 to 15 bits and
  multiply with AVX-512 VNNI: about twice the float kernels' speed at 8 to 32 rows, within
  float rounding of the float32 result (greedy output and perplexity unchanged on the
  default model);
- ``int8``: the same at 8 bits (as llama.cpp does): faster still, but it changes outputs
  (greedy agreement with fp32 and perplexity drop measurably), so only on request;
- ``auto`` (the default): ``int16`` where the CPU runs VNNI, else ``float32``.

Set with ``BACKFILL_CPU_ACTIVATIONS``. Products of more rows than the kernels take (prefill)
run on BLAS in float32 whatever the setting.
"""

from __future__ import annotations

import os
from types import ModuleType

ACTIVATIONS = ("auto", "float32", "int16", "int8")
ACTIVATIONS_ENV = "BACKFILL_CPU_ACTIVATIONS"


def integer_kernels() -> ModuleType | None:
    """The integer kernels where numba is installed and the CPU runs them, else None."""
    try:
        from server.executor.cpu import vnni_kernels
    except ImportError:
        return None
    return vnni_kernels if vnni_kernels.available() else None


def requested_activations() -> str:
    """The setting of ``BACKFILL_CPU_ACTIVATIONS`` (``auto`` when unset)."""
    value = os.environ.get(ACTIVATIONS_ENV) or "auto"
    if value not in ACTIVATIONS:
        raise ValueError(f"{ACTIVATIONS_ENV} must be one of {', '.join(ACTIVATIONS)}, "
                         f"got {value!r}")
    return value


def resolve_activations(mode: str) -> str:
    """``mode`` with ``auto`` decided for this host; ValueError for an integer mode that the
    host cannot run."""
    if mode not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {mode!r}")
    available = integer_kernels() is not None
    if mode == "auto":
        return "int16" if available else "float32"
    if mode != "float32" and not available:
        raise ValueError(f"{mode} activations need numba and a CPU with AVX-512 VNNI; "
                         f"this host has {'numba but no VNNI' if _has_numba() else 'no numba'}")
    return mode


def _has_numba() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True

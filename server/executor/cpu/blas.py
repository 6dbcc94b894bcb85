"""BLAS thread control for the executor's worker thread.

The worker sets its own BLAS calls (and the compiled block kernels, see
``set_thread_compute_threads``) to `BACKFILL_CPU_THREADS` threads, by default every core
this process may run on: on a quiet 2-core machine two threads took batch-1 decode of the
default engine from 54 ms to 35 ms per step (51% → 86% of the memory roofline) and batch 32
from 226 ms to 124 ms. On an oversubscribed host the opposite holds: a [1, 1536] x [1536, 576]
GEMV took 0.37 ms with one OpenBLAS thread and 15.8 ms with two, because OpenBLAS worker
threads spin and yield against other processes; set `BACKFILL_CPU_THREADS=1` there (the test
suite does). OpenBLAS's thread-local setting is used where it exists, so the rest of the
process keeps its configuration.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

log = logging.getLogger(__name__)
_THREAD = threading.local()  # .blas_threads: what set_thread_blas_threads set for this thread

_LOCAL = "openblas_set_num_threads_local"
_GLOBAL = (
    "scipy_openblas_set_num_threads64_",
    "openblas_set_num_threads64_",
    "openblas_set_num_threads",
)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    value = os.environ.get("BACKFILL_CPU_THREADS") or str(available_cores())
    try:
        return max(1, int(value))
    except ValueError:
        raise ValueError(f"BACKFILL_CPU_THREADS must be an integer, got {value!r}") from None


def thread_blas_threads() -> int | None:
    """The BLAS thread count set for the current thread, None if never set (BLAS default)."""
    value: int | None = getattr(_THREAD, "blas_threads", None)
    return value


def set_thread_blas_threads(num_threads: int) -> bool:
    """Limits BLAS threads for calls made from the current thread; False if no OpenBLAS
    control was found (then BLAS keeps its own setting)."""
    import numpy  # noqa: F401  (loads the BLAS library whose symbols are looked up)

    _THREAD.blas_threads = num_threads

    for lib in _loaded_openblas():
        local = getattr(lib, _LOCAL, None)
        if local is not None:
            local.argtypes = [ctypes.c_int]
            local(num_threads)
            return True
        for name in _GLOBAL:
            setter = getattr(lib, name, None)
            if setter is not None:
                setter.argtypes = [ctypes.c_int]
                setter(num_threads)
                return True
    log.info("no OpenBLAS thread control found; BLAS threads unchanged")
    return False


def set_thread_compute_threads(num_threads: int) -> None:
    """BLAS and compiled-kernel threads for calls made from the current thread.

    Both get the same count: a step calls them one after the other, never at once, so the
    cores are shared in turn rather than oversubscribed."""
    from server.executor.cpu.block_weights import load_kernels

    set_thread_blas_threads(num_threads)
    kernels = load_kernels()
    if kernels is not None:
        kernels.set_threads(num_threads)


def _loaded_openblas() -> list[ctypes.CDLL]:
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower()}
    except OSError:
        return []
    libs = []
    for path in sorted(paths):
        try:
            libs.append(ctypes.CDLL(path))
        except OSError:
            continue
    return libs

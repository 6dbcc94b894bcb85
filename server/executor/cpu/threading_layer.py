"""numba's threading layer for every compiled CPU kernel (block_kernels, step_kernels).

numba picks its layer, for the whole process, when the first parallel kernel launches; both
kernel modules import this one first, so that it is TBB wherever the engine's kernels run,
even in a process that only ever uses the step kernels (a float32 engine).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from pathlib import Path


def _load_tbb() -> bool:
    """Makes numba's TBB threading layer loadable; True if it is.

    With TBB the calling thread runs whatever part of a kernel a descheduled worker has not
    taken, so a busy host costs a kernel only the cores it lost; numba's OpenMP layer instead
    waits at the end of every kernel for each worker to be scheduled again, and with the other
    cores busy a 2-thread decode step went from 14 ms to 930 ms (TBB: 14 ms). The ``tbb`` wheel
    (in the ``cpu`` extra) puts libtbb in the environment's lib directory, which the dynamic
    loader does not search, so it is loaded here first, by path, for numba's TBB pool to find.
    """
    lib = Path(sys.prefix) / "lib" / "libtbb.so.12"
    if lib.exists():
        with contextlib.suppress(OSError):
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    try:
        from numba.np.ufunc import tbbpool  # type: ignore[attr-defined]  # noqa: F401
    except ImportError:
        return False
    return True


TBB = _load_tbb()

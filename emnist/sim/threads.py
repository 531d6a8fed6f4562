"""One BLAS thread for the simulator's math, as every real worker has (the stack file sets
OPENBLAS_NUM_THREADS=1): with numpy already loaded the environment variable is too late, so
the loaded OpenBLAS is told directly (what threadpoolctl does). On this 2-core machine under
load, a 2-thread BLAS made one simulated worker's minibatches ~10x slower."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

SETTERS = ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
           "scipy_openblas_set_num_threads", "openblas_set_num_threads64_")


def one_blas_thread() -> int:
    """Set every loaded OpenBLAS to one thread; returns how many libraries were set."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return 0
    done = 0
    for lib in sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", maps))):
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        for name in SETTERS:
            fn = getattr(handle, name, None)
            if fn is not None:
                fn(1)
                done += 1
                break
    return done

"""Host (CPU-side) process settings that must be made before anything else runs.

Kept free of heavy imports (no numpy, no jax): :func:`keep_host_memory` only works while
the process has a single thread, i.e. before numpy starts its BLAS threads and jax its
XLA threads, so entry points call it first thing (jaxformer/cli.py, tools/benchmark.py).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
ENV_SETTINGS = "MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736"


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def keep_host_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS.

    XLA:CPU allocates each step's buffers (hundreds of MiB to GiB) afresh. By default glibc
    serves blocks over 32 MiB with ``mmap`` and unmaps them on free, and trims its heaps,
    so the kernel zero-fills every page of them again in the next step: a 100M-parameter
    model spent ~2.4 million page faults and ~4 s of system time per step on the 2-core
    development machine (docs/performance.md). One arena, no ``mmap`` and no trimming make
    each step reuse the last one's pages; the process keeps its peak heap, which the next
    step needs anyway.

    Only safe in a single-threaded process: threads that already have arenas of their own
    would keep them (a measured run then grew to an out-of-memory kill), so with more than
    one thread this does nothing and says which environment variables to set instead.
    ``JAXFORMER_KEEP_HOST_MEMORY=0`` turns it off. Returns whether it was applied (glibc
    on Linux only).
    """
    if os.environ.get("JAXFORMER_KEEP_HOST_MEMORY", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if _threads() != 1:
        logging.getLogger("jaxformer").warning(
            "keep_host_memory: the process already runs threads; not changing malloc. "
            "For the same effect start the process with %s",
            ENV_SETTINGS,
        )
        return False
    libc = ctypes.CDLL(None)
    # mallopt takes an int; glibc stores the trim threshold as size_t, so -1 is "never".
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)

"""Host (CPU-side) process settings that only take effect when the process starts.

XLA:CPU allocates each step's buffers (hundreds of MiB to GiB) afresh through glibc's
malloc, which maps blocks over 32 MiB with ``mmap`` and unmaps them on free: the kernel
then faults in and zero-fills every 4 KiB page of them again in the next step. On the
2-core development machine that was 230,000 page faults and 0.2 s of a 0.8 s step for a
21M-parameter decoder, and ~2 million faults and ~4 s of system time per step for a
100M one (docs/performance.md). With glibc's ``glibc.malloc.hugetlb=1`` tunable malloc
asks for transparent huge pages (``madvise``), so the same memory comes in 2 MiB pages:
~500 times fewer faults, the steps 25% faster. Memory is still returned to the system.

glibc reads tunables once, at start-up, so :func:`use_huge_pages` re-executes the
process with the tunable added; the command-line entry points call it first thing.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from pathlib import Path

HUGETLB = "glibc.malloc.hugetlb=1"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_supported() -> bool:
    """glibc >= 2.35 on Linux, with transparent huge pages available on request
    (``[madvise]``; under ``[always]`` every process gets them already)."""
    if platform.system() != "Linux":
        return False
    libc, version = platform.libc_ver()
    if libc != "glibc" or tuple(int(p) for p in version.split(".")[:2]) < (2, 35):
        return False
    try:
        return "[madvise]" in THP_SETTING.read_text()
    except OSError:
        return False


def use_huge_pages() -> None:
    """Re-execute this process (same pid, arguments and environment) with glibc's malloc
    asking for transparent huge pages, unless it already does, the machine cannot, or
    ``JAXFORMER_HUGE_PAGES=0``. Returns only when nothing is to be done."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (
        os.environ.get("JAXFORMER_HUGE_PAGES", "1") == "0"
        or "glibc.malloc.hugetlb" in tunables
        or not huge_pages_supported()
    ):
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, HUGETLB])))
    logging.getLogger("jaxformer").debug("re-executing with GLIBC_TUNABLES=%s", HUGETLB)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)

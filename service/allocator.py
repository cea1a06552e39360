"""glibc's allocator tuned for a server whose every study allocates and frees the same large arrays.

Why: a 1024 x 1024 radiograph goes through several 4 MiB float32 arrays (decoded pixels, modality values,
the VOI output). glibc serves any allocation above ``M_MMAP_THRESHOLD`` (128 KiB at start, raised only
for the thread that frees one) with a fresh ``mmap`` and gives it back with ``munmap`` on free, and trims
the top of a heap above ``M_TRIM_THRESHOLD``; either way the next study touches new pages. Measured with
``bench/bench_rest.py`` on the 1024 x 1024 CR: ~3,000 minor page faults per study (about 12 MiB of
zero-filled pages) and a third of the server's CPU time in the kernel; with the thresholds raised here,
a few per study. The cost is memory kept for reuse instead of returned: at most the trim threshold per
arena beyond what the peak needed.

``mallopt`` (glibc, ``malloc.h``): ``M_TRIM_THRESHOLD`` is -1, ``M_MMAP_THRESHOLD`` is -3; setting either
turns glibc's dynamic threshold off. An operator's own ``MALLOC_*_`` environment variables win; on another
C library (musl in Alpine) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_allocator"]

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024
"""glibc's own ceiling for the dynamic threshold (``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit)."""
TRIM_THRESHOLD = 64 * 1024 * 1024


def tune_allocator() -> bool:
    """Raise the mmap and trim thresholds (see the module docstring); True when glibc took them."""
    if any(os.environ.get(name) for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (or no mallopt): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    logger.debug("allocator thresholds %s", "raised" if done else "left as they were")
    return done

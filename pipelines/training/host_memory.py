"""Host memory that training frees goes back to the operating system.

glibc serves an allocation above its mmap threshold (128 KiB at start) with its own ``mmap`` and
unmaps it on free.  But the first time such a block is freed, glibc raises the threshold to that
block's size (up to 32 MiB), so from then on every transient tensor of that size — gathered ZeRO-3
layers, gradient buckets, activations — comes from the heap, and freeing it leaves the pages
resident: a worker's RSS becomes the high-water mark of all its transient buffers, not what is live.
Fixing the threshold (``mallopt(M_MMAP_THRESHOLD)``, what the ``MALLOC_MMAP_THRESHOLD_`` environment
variable does at process start) turns the adjustment off.  Measured by ``benchmarks/zero_memory.py``
(``docs/zero3-memory.md``).  No Ray here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: mallopt refuses more


def return_freed_memory(threshold_bytes: int) -> bool:
    """Fix glibc's mmap threshold at ``threshold_bytes`` in this process, so freed blocks of that size
    or larger are unmapped at once.  Returns whether it took effect: not for ``threshold_bytes`` 0
    (glibc's default kept), nor off glibc (macOS, musl), where nothing is changed."""
    if threshold_bytes <= 0 or not sys.platform.startswith("linux"):
        return False
    if not 0 < threshold_bytes <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"an mmap threshold must lie in (0, {MAX_MMAP_THRESHOLD}] bytes, got {threshold_bytes}")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # no glibc: its allocator is not the one in use
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold_bytes))

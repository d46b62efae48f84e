"""Keep freed tensor memory in the process instead of handing it back to the kernel.

A merge allocates and frees tensors of the same few shapes once per tensor of the model. With
glibc's defaults each block above its (adaptive) mmap threshold is a fresh mapping, and every
first touch of a 4 KiB page is a page fault: on a 100M-parameter merge that was about a quarter
of the CPU time. Raising the mmap threshold to glibc's maximum (32 MiB) and never trimming the
heap lets every tensor below 32 MiB reuse memory that is already mapped. Larger tensors (the
embeddings) are still mapped per use. The price is that the process keeps its peak heap until it
exits, which for a merge or a search worker it would have reached again anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses larger values on 64-bit
_done = False


def keep_freed_memory() -> bool:
    """Tune glibc malloc as above (once per process); False where this is not glibc."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # musl and other C libraries have no mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    _done = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _done

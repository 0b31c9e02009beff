"""The C allocator's settings for a process that receives pieces in 8 MiB frames.

ZeroMQ receives each frame into a buffer it ``malloc``s on its I/O thread; the daemon
frees it on another thread once the frame is encoded, stored or decoded. With glibc's
defaults such a buffer comes from a fresh ``mmap`` (or from an arena heap the allocator
shrinks again once its free top passes a few MiB), so every received byte is first a
page fault and a cleared page, and every freed one an unmap: on 4 local nodes, 2 cores,
a step of 1 GiB per node (bench/bench_cluster.py, ``perf record -a``, 2026-12-05), the
faults, page clearing and unmaps were ~10 % of all CPU, ~0.1 CPU-s per daemon per step.

:func:`keep_frame_memory` makes such buffers come from the arenas and stay there once
freed (``M_MMAP_THRESHOLD`` above a frame, ``M_TRIM_THRESHOLD`` large), so the next frame
reuses pages already faulted in. What the process keeps is what it once held at most:
the frames in flight, bounded by the data plane's windows. ``bench/bench_cluster.py``
measures its ZeroMQ floor with the same settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Requests at least this large are still mapped on their own (glibc's largest allowed
#: threshold on 64-bit): a frame (8 MiB) is well below it.
MMAP_THRESHOLD_BYTES = 32 << 20
#: Free memory at an arena's top is given back to the kernel only beyond this.
TRIM_THRESHOLD_BYTES = 1 << 30

_done: bool | None = None


def keep_frame_memory() -> bool:
    """Set the allocator so that freed frame buffers are reused, once per process; False
    where the C library has no ``mallopt`` (not glibc) or refuses: frames are then
    allocated as before."""
    global _done
    if _done is not None:
        return _done
    _done = False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.info("no mallopt in this C library: received frames are allocated per frame")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if not _done:
        logger.info("mallopt refused: received frames are allocated per frame")
    return _done

"""Copying a large block of host memory on several threads, checksummed as it goes: a
restore's copy out of a slot (proto/state_layout.py), and, one block at a time on the
copy thread alone, a snapshot's copy of a large host tensor into one
(client/seal_sums.py: the seal's block CRCs made as it copies).

One core copies at ~11 GB/s here, two at ~15; a restore runs before the trainer's
loop, so its cores are free. The block is split into parts of whole chunks, one per
thread (the caller's among them); the parts' CRC32Cs are combined in address order, so
the result is the CRC32C of the whole block, as one thread would have made it. ctypes
drops the GIL in the C calls.

Each part is copied chunk by chunk by ``sg_copy_checked`` (proto/_fastcopy.c, built by
the install): each chunk checksummed from the source just before it is copied out of
cache with streaming stores, one pass over memory. Where that module was not built
(or without ISA-L) the part is copied with memmove and each chunk checksummed from its
destination right after its copy, while it is in cache: the same checks, slower.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import importlib.util
import logging
import os
import threading
from collections.abc import Callable

from shardguard.proto import hostmem
from shardguard.proto.crc32c import MASK, crc32c_at, crc32c_combine, update_address

logger = logging.getLogger(__name__)

#: Threads that copy one large block (the caller's and a pool's).
COPY_THREADS = max(1, min(4, os.cpu_count() or 1))
#: Blocks below this are copied by the caller alone (a part is at least half of this).
PARALLEL_MIN_BYTES = 8 << 20
_copy_pool: concurrent.futures.ThreadPoolExecutor | None = None
_copy_pool_lock = threading.Lock()


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _copy_pool
    with _copy_pool_lock:
        if _copy_pool is None:
            _copy_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=COPY_THREADS - 1, thread_name_prefix="sg-restore-copy")
        return _copy_pool


def _parts(n: int, chunk: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges, whole chunks but the last, splitting ``n`` bytes among the threads."""
    ways = min(COPY_THREADS, n // (PARALLEL_MIN_BYTES // 2)) if n >= PARALLEL_MIN_BYTES else 1
    if ways <= 1:
        return [(0, n)]
    step = -(-n // ways // chunk) * chunk
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


#: ``sg_copy_checked(dst, src, n, chunk, state, update, fresh) -> state``
#: (proto/_fastcopy.c).
_Native = Callable[[int, int, int, int, int, int | None, int], int]


@functools.cache
def native() -> _Native | None:
    """The C copy, or None where the install could not build it."""
    spec = importlib.util.find_spec("shardguard.proto._fastcopy")
    if spec is None or not spec.origin:
        logger.info("proto/_fastcopy.c is not built: restores copy with memmove (slower)")
        return None
    try:
        fn = ctypes.CDLL(spec.origin).sg_copy_checked
    except (OSError, AttributeError) as exc:
        logger.warning("cannot load %s (%s): restores copy with memmove (slower)",
                       spec.origin, exc)
        return None
    fn.restype = ctypes.c_uint
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                   ctypes.c_uint, ctypes.c_void_p, ctypes.c_int]
    copy_checked: _Native = fn
    return copy_checked


#: Whether parts are copied by the C copy when it is there (the benchmark and the tests
#: turn it off to measure and check the fallback).
USE_NATIVE = True


def _copy_part(dst: int, src: int, lo: int, hi: int, chunk: int, check: bool,
               fresh: bool) -> int:
    """Copy bytes [lo, hi) from ``src`` to ``dst``, chunk by chunk; the CRC32C of the
    copied bytes when ``check``, else 0."""
    if fresh and hostmem.populate(dst + lo, hi - lo):
        # Faulted in by one call (each thread its own part), then written as memory that
        # is there: 0.70x the time of faulting page by page under the copy.
        fresh = False
    fast = native() if USE_NATIVE else None
    update = update_address() if check else None
    if fast is not None and (update is not None or not check):
        state = fast(dst + lo, src + lo, hi - lo, chunk, MASK, update, int(fresh))
        return state ^ MASK if check else 0
    crc = 0
    for o in range(lo, hi, chunk):
        c = min(chunk, hi - o)
        ctypes.memmove(dst + o, src + o, c)
        if check:
            crc = crc32c_at(dst + o, c, crc)
    return crc


def copy(dst: int, src: int, n: int, chunk: int, check: bool, fresh: bool = False) -> int:
    """Copy ``n`` bytes from address ``src`` to ``dst`` in ``chunk``-byte steps; the
    CRC32C of the bytes copied when ``check`` (else 0). ``fresh``: ``dst`` is new memory,
    not yet faulted in: each thread faults its part in first (``MADV_POPULATE_WRITE``),
    or, where the kernel cannot, writes it as proto/_fastcopy.c writes fresh memory."""
    parts = _parts(n, chunk)
    if len(parts) == 1:
        return _copy_part(dst, src, 0, n, chunk, check, fresh)
    futs = [_pool().submit(_copy_part, dst, src, lo, hi, chunk, check, fresh)
            for lo, hi in parts[1:]]
    crc = _copy_part(dst, src, *parts[0], chunk, check, fresh)
    for (lo, hi), fut in zip(parts[1:], futs):
        c = fut.result()
        if check:
            crc = crc32c_combine(crc, c, hi - lo)
    return crc

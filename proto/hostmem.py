"""Host memory for restored state: fresh buffers faulted in ahead of the copy, and a
sealed slot mapped copy-on-write into the trainer.

Fresh memory costs more than the copy into it. The first restore of 1 GiB into new
tensors in a new process (the restart after a crash), 2 cores, KVM, 2026-12-05: 424-457
ms when each 4 KiB page was faulted in as the copy reached it, 302-324 ms when each copy
thread first faulted its part in with one call (:func:`populate`, ``MADV_POPULATE_WRITE``)
and then copied with streaming stores; against 45 ms for the memcpy into memory already
there. Asking for transparent huge pages (``MADV_HUGEPAGE``, :func:`advise_huge_pages`)
made it worse, 876-1410 ms: with the kernel's default ``defrag=madvise`` such a region
stalls in direct compaction when memory is fragmented, as on a node that has run for
hours; it was faster only in a process reusing memory it had freed. Fresh tensors are
therefore not advised. A private mapping of a slot copies nothing until a page is
written (``MAP_PRIVATE``).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os

logger = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
HUGE_PAGE = 2 << 20

_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
# Linux 5.14; Python does not name them.
_MADV_POPULATE_READ = 22
_MADV_POPULATE_WRITE = 23

_libc = ctypes.CDLL(None, use_errno=True)
_madvise = _libc.madvise
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_madvise.restype = ctypes.c_int


def advise_huge_pages(addr: int, nbytes: int) -> bool:
    """Ask for huge pages under the whole 2 MiB pages of ``[addr, addr + nbytes)`` (memory
    of the caller's not yet written, e.g. a fresh tensor's); False when the kernel would
    not (transparent huge pages off, an old kernel): the memory works as before either way.
    """
    lo = -(-addr // HUGE_PAGE) * HUGE_PAGE
    hi = (addr + nbytes) // HUGE_PAGE * HUGE_PAGE
    return hi > lo and _madvise(lo, hi - lo, _MADV_HUGEPAGE) == 0


def populate(addr: int, nbytes: int) -> bool:
    """Fault in the pages under ``[addr, addr + nbytes)`` writable, in one call, without
    writing them (their contents, and those of the bytes around in the same pages, stay as
    they are); False where the kernel cannot (before Linux 5.14): they are then faulted
    in when first written, as before."""
    return _populate(addr, nbytes, _MADV_POPULATE_WRITE)


def populate_read(addr: int, nbytes: int) -> bool:
    """Map the pages under ``[addr, addr + nbytes)`` now, as a read would (what
    ``MAP_POPULATE`` does for a whole mapping: a shared file mapping's pages come in
    writable); False where the kernel cannot (before Linux 5.14): they are then mapped
    when first used."""
    return _populate(addr, nbytes, _MADV_POPULATE_READ)


def _populate(addr: int, nbytes: int, advice: int) -> bool:
    lo = addr // PAGE * PAGE
    return nbytes > 0 and _madvise(lo, addr + nbytes - lo, advice) == 0


def map_private(path: str, offset: int, length: int) -> mmap.mmap:
    """``length`` bytes of the file at ``path`` from ``offset`` (page-aligned), mapped
    private and writable: reads see the file's pages, a write copies the page it lands on
    into this process and never reaches the file.

    A page not yet written shows what the file holds, so the file must not change under
    it (:func:`make_private` ends that). Nothing is touched here: filling the page tables
    of 512 MiB of 4 KiB pages took 130-160 ms, twice the CRC32C of the same bytes through
    a mapping already filled (``MAP_POPULATE`` would even copy every page of a writable
    private mapping); each page is mapped when it is first used.
    """
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        return mmap.mmap(fd, length, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE,
                         offset=offset)
    finally:
        os.close(fd)


def make_private(mm: mmap.mmap) -> None:
    """Copy every page of the private mapping ``mm`` not yet written into this process
    (``MADV_POPULATE_WRITE``, or a write per page before Linux 5.14): after it nothing
    the file holds shows through, whatever is written to the file."""
    if not len(mm):
        return
    try:
        mm.madvise(_MADV_POPULATE_WRITE)
        return
    except OSError as exc:
        logger.debug("MADV_POPULATE_WRITE refused (%s); writing a byte per page", exc)
    buf = (ctypes.c_ubyte * len(mm)).from_buffer(mm)
    try:
        for off in range(0, len(mm), PAGE):
            buf[off] = buf[off]  # the write, not the value, copies the page
    finally:
        del buf

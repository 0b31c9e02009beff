"""Where a rebuild's bytes land: memory mapped in this process, or a file written with
``pwrite`` without mapping it; and the CRCs of what was written.

A rebuilt slot or parity piece is new memory. Written through a shared mapping of its
tmpfs file, every 4 KiB page is cleared and mapped at its first write, a page fault
each: 1.37 GiB of a fresh memfd took ~720 ms of CPU (``posix_fallocate`` 300 ms, the
faults of the writes 420 ms; the copy itself 74 ms), against ~490 ms written with
``pwrite``, which allocates a page it fills whole without clearing it and maps nothing
(2 cores, KVM, Linux 6.18, 2026-12-05). A rebuild is CPU-bound on a small node, so the
replacement daemon writes its slots and parity that way (:class:`FileDest`), each
decoded range from the decoder's buffer while it is in cache; the writes' CRCs
(:class:`WrittenCrcs`) then check the slot against its seal without reading it back.
Tests and callers with memory at hand use :class:`MemoryDest`.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

from shardguard.daemon.coding.checksum import crc32c, crc32c_combine
from shardguard.daemon.errors import NoSpaceError


class Dest:
    """``size`` bytes that a rebuild fills, each range written once."""

    size: int

    def __len__(self) -> int:
        return self.size

    def write(self, off: int, data: Any, crc: int | None = None) -> None:
        """Bytes ``[off, off + len(data))`` are ``data`` (a contiguous buffer); ``crc``:
        its CRC32C, when the caller made it anyway (a destination that records what it
        was written with then need not read it again)."""
        raise NotImplementedError

    def direct(self, lo: int, hi: int) -> np.ndarray | None:
        """Memory that *is* bytes ``[lo, hi)``, to decode straight into; None: decode
        elsewhere and :meth:`write`."""
        raise NotImplementedError

    def part(self, lo: int, hi: int) -> "Dest":
        """Bytes ``[lo, hi)`` of this destination, as a destination of their own."""
        raise NotImplementedError

    def _check(self, off: int, n: int) -> None:
        if off < 0 or off + n > self.size:
            raise ValueError(f"bytes [{off}, {off + n}) are outside a {self.size}-byte destination")


class MemoryDest(Dest):
    """A writable uint8 array of this process."""

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr
        self.size = arr.size

    def write(self, off: int, data: Any, crc: int | None = None) -> None:
        src = np.frombuffer(data, dtype=np.uint8)
        self._check(off, src.size)
        self.arr[off:off + src.size] = src

    def direct(self, lo: int, hi: int) -> np.ndarray | None:
        self._check(lo, hi - lo)
        return self.arr[lo:hi]

    def part(self, lo: int, hi: int) -> "MemoryDest":
        self._check(lo, hi - lo)
        return MemoryDest(self.arr[lo:hi])


class WrittenCrcs:
    """The CRC32C of every range written to a file, as it was written, so that what a
    rebuild put into a slot is checked against the slot's seal without reading 1 GiB
    back (which took ~0.1 s at the very end of a rebuild, on one core).

    The CRCs are of the bytes handed to ``pwrite``, in cache as they were made (the
    decoder's or the receiver's own, or made here); the copy into the file is the
    kernel's. ``marks`` are file offsets no recorded range crosses (a write across one
    is recorded as two ranges): where the caller will ask for the CRC of a range that
    starts or ends there. Thread-safe.
    """

    def __init__(self, marks: Iterable[int] = ()) -> None:
        self.marks = sorted(set(marks))
        self._lock = threading.Lock()
        self._spans: dict[int, tuple[int, int]] = {}  # file offset -> (bytes, CRC32C)

    def record(self, at: int, view: memoryview, crc: int | None) -> None:
        """Bytes ``view`` were written at file offset ``at``."""
        cuts = [m - at for m in self.marks if at < m < at + len(view)]
        if cuts:
            crc = None  # made again for each part
        spans = []
        for lo, hi in zip([0, *cuts], [*cuts, len(view)]):
            spans.append((at + lo, hi - lo, crc32c(view[lo:hi]) if crc is None else crc))
        with self._lock:
            for off, n, c in spans:
                self._spans[off] = (n, c)  # a range written again replaces it

    def crc(self, lo: int, hi: int) -> int | None:
        """The CRC32C of file bytes ``[lo, hi)`` as written, or None when what was recorded
        does not tile that range exactly once (a gap, or ranges written again that overlap
        differently): then only a read of the bytes can tell."""
        with self._lock:
            spans = sorted((off, n, c) for off, (n, c) in self._spans.items()
                           if off < hi and off + n > lo)
        crc, pos = 0, lo
        for off, n, c in spans:
            if off != pos or off + n > hi:
                return None
            crc, pos = crc32c_combine(crc, c, n), off + n
        return crc if pos == hi else None


class FileDest(Dest):
    """``size`` bytes of a file from byte ``base``, written with ``pwrite``.

    It holds a descriptor of its own (a duplicate, closed by :meth:`close`), so a file
    closed by its owner meanwhile is written, never another file that took its number.
    The file's pages need not be allocated: a write that finds no room (a full tmpfs,
    the memory cgroup's limit) raises NoSpaceError, where a store through a mapping
    would have been a SIGBUS. ``crcs``: where each write's CRC32C is recorded.
    """

    def __init__(self, fd: int, base: int, size: int, crcs: WrittenCrcs | None = None, *,
                 _own: int | None = None) -> None:
        self._fd = os.dup(fd) if _own is None else _own
        self._parent = _own is not None
        self.base, self.size, self.crcs = base, size, crcs

    def write(self, off: int, data: Any, crc: int | None = None) -> None:
        view = memoryview(data).cast("B")
        self._check(off, len(view))
        at = self.base + off
        if self.crcs is not None:
            self.crcs.record(at, view, crc)
        while len(view):
            try:
                n = os.pwrite(self._fd, view, at)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                    raise NoSpaceError(f"no room to write bytes [{at}, {at + len(view)}) of "
                                       f"a rebuilt file: {exc.strerror}") from None
                raise
            if n <= 0:
                raise OSError(f"pwrite wrote {n} bytes")
            view, at = view[n:], at + n

    def direct(self, lo: int, hi: int) -> np.ndarray | None:
        self._check(lo, hi - lo)
        return None

    def part(self, lo: int, hi: int) -> "FileDest":
        self._check(lo, hi - lo)
        return FileDest(-1, self.base + lo, hi - lo, self.crcs, _own=self._fd)

    def close(self) -> None:
        """Let the descriptor go (a part shares its whole's: closing a part does nothing)."""
        if not self._parent and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "FileDest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def as_dest(dest: "Dest | np.ndarray") -> Dest:
    """``dest``, an array wrapped as a :class:`MemoryDest`."""
    return dest if isinstance(dest, Dest) else MemoryDest(dest)

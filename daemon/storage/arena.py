"""A rank's shared-memory arena as the daemon owns it: create, pre-fault, adopt, header I/O."""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from collections.abc import Callable, Iterable

import numpy as np

from shardguard.daemon.coding.dest import FileDest, WrittenCrcs
from shardguard.daemon.errors import ArenaFormatError, BudgetExceededError, NoSpaceError
from shardguard.proto import arena as fmt
from shardguard.proto import hostmem
from shardguard.proto import safefile

#: Bytes :meth:`Arena.prefault` faults in per call (the memory-map lock is let go between).
PREFAULT_STEP_BYTES = 8 << 20

logger = logging.getLogger(__name__)


class Arena:
    """One /dev/shm file mapped read-write; the daemon writes its header, clients its slots."""

    def __init__(self, path: str, fd: int, size: int, allocated: bool = True) -> None:
        self.path = path
        self.size = size
        self._fd = fd
        # False while slots past the first ones are holes (a rebuild's arena): nothing
        # may write there before :meth:`ensure_allocated` (a write into a hole of a full
        # tmpfs is a SIGBUS, not an error).
        self.allocated = allocated
        # Held while the file is being allocated, and while a thread faults pages of the
        # mapping in: two locks, so that a Begin waiting for the allocation is not also
        # kept waiting behind the faulting that follows it (which it does not need).
        # close() takes both.
        self._allocating = threading.Lock()
        self._faulting = threading.Lock()
        #: Slots a thread of :meth:`prepare` is still allocating and faulting in.
        self._preparing: set[int] = set()
        self._deferred: tuple[int, Callable[[Exception], None]] | None = None
        self._prepared = threading.Condition()
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self._map)

    @classmethod
    def create(cls, path: str, header: fmt.Header, slots_now: int | None = None) -> "Arena":
        """Create the file 0600 (it must not exist, and nothing planted at its name is
        followed) and allocate every page now, or only the header and the first
        ``slots_now`` slots (the rest by :meth:`ensure_allocated`).

        Pages are allocated up front because writing into fresh tmpfs pages runs at
        a tenth of the speed of writing into allocated ones: the cost belongs at
        register, not inside a snapshot. A rebuild needs one slot at once and the
        other only at the trainer's next snapshot: it allocates the second later.
        """
        size = fmt.arena_bytes(header.slot_bytes, header.nslots)
        now = size if slots_now is None else fmt.arena_bytes(header.slot_bytes, slots_now)
        fd = safefile.open_new(path, os.O_RDWR, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, now)
                if now < size:
                    os.ftruncate(fd, size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                    raise BudgetExceededError(
                        f"cannot allocate {now} bytes for arena {path}: {exc.strerror}") from None
                raise
            arena = cls(path, fd, size, allocated=now >= size)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            raise
        arena.write_header(header)
        return arena

    @classmethod
    def adopt(cls, path: str) -> tuple["Arena", fmt.Header]:
        """Map an existing arena (after a daemon restart) and parse its header.

        Raises:
            UnsafePathError: a symlink or another user's file is at ``path``.
        """
        fd = safefile.open_owned(path, os.O_RDWR)
        try:
            st = os.fstat(fd)
            size = st.st_size
            if size < fmt.HEADER_BYTES:
                raise ArenaFormatError(f"arena {path} is truncated ({size} bytes)")
            # Holes left by a rebuild whose daemon stopped before filling them.
            arena = cls(path, fd, size, allocated=st.st_blocks * 512 >= size)
        except BaseException:
            os.close(fd)
            raise
        try:
            header = fmt.unpack_header(arena.view)
            if fmt.arena_bytes(header.slot_bytes, header.nslots) != size:
                raise ArenaFormatError(f"arena {path} size {size} does not match its header")
        except ArenaFormatError:
            arena.close()
            raise
        return arena, header

    def ensure_allocated(self) -> None:
        """Allocate every page of the file (at once if already done).

        Raises:
            NoSpaceError: the shm directory's filesystem has no room for them.
        """
        if self.allocated:
            return
        with self._allocating:
            if self.allocated or self._fd < 0:
                return
            self._fallocate(0, self.size)
            self.allocated = True

    def prefault(self, index: int, slot_bytes: int) -> None:
        """Fault slot ``index`` in, writable, in this mapping, without writing it. tmpfs
        clears an allocated page at its first fault in any process; done here, a
        trainer that maps the arena next finds every page there (mapping a just
        allocated 2 GiB arena took it 0.71 s, one whose pages had been faulted 0.22 s)."""
        with self._faulting:
            if self._fd < 0:
                return
            part = np.frombuffer(self.slot(index, slot_bytes), dtype=np.uint8)
            # In steps: one call holds the process's memory-map lock until every page is
            # in, and the rebuild's fetches, whose frames need memory mapped meanwhile,
            # stood still behind it (1 GiB: ~1.8 s of a 4.8 s rebuild with the peers
            # idle, perf, 2026-12-05).
            for off in range(0, part.size, PREFAULT_STEP_BYTES):
                hostmem.populate(part.ctypes.data + off, min(PREFAULT_STEP_BYTES, part.size - off))
            del part

    def prepare(self, indices: Iterable[int], slot_bytes: int,
                on_error: Callable[[Exception], None]) -> None:
        """Slots ``indices`` are to be allocated and faulted in (a rebuilt arena's other
        slot), later: by a thread of their own that :meth:`start_preparing` starts once
        the trainer is done with its restore. :meth:`preparing` names them until that
        thread is done. A failure goes to ``on_error`` (the slot stays a hole: the next
        Begin meets the NoSpaceError)."""
        with self._prepared:
            self._preparing |= set(indices)
            if self._preparing:
                self._deferred = (slot_bytes, on_error)

    def start_preparing(self) -> None:
        """Start what :meth:`prepare` deferred, if anything (once)."""
        with self._prepared:
            if self._deferred is None:
                return
            (slot_bytes, on_error), self._deferred = self._deferred, None
            todo = set(self._preparing)

        def run() -> None:
            try:
                self.ensure_allocated()
                for i in sorted(todo):
                    self.prefault(i, slot_bytes)
            except Exception as exc:  # noqa: BLE001 - reported, and met again at Begin
                on_error(exc)
            finally:
                with self._prepared:
                    self._preparing -= todo
                    self._prepared.notify_all()

        threading.Thread(target=run, daemon=True, name="sg-arena-prepare").start()

    def preparing(self) -> tuple[int, ...]:
        """The slots :meth:`prepare` has not finished yet."""
        with self._prepared:
            return tuple(sorted(self._preparing))

    def wait_prepared(self, timeout_s: float | None = None) -> bool:
        """Wait until the preparation started is done with every slot; False on the
        timeout (or while it has not been started)."""
        with self._prepared:
            return self._prepared.wait_for(lambda: not self._preparing, timeout_s)

    def write_header(self, header: fmt.Header) -> None:
        self.view[: fmt.HEADER_BYTES] = fmt.pack_header(header)

    def read_header(self) -> fmt.Header:
        return fmt.unpack_header(self.view)

    def slot(self, index: int, slot_bytes: int) -> memoryview:
        start = fmt.slot_offset(index, slot_bytes)
        return self.view[start:start + slot_bytes]

    def allocate(self, offset: int, nbytes: int) -> None:
        """Allocate the pages under bytes ``[offset, offset + nbytes)`` now.

        Raises:
            NoSpaceError: the shm directory's filesystem has no room for them.
        """
        if nbytes <= 0:
            return
        with self._allocating:
            if self._fd < 0:
                raise ArenaFormatError(f"arena {self.path} is closed")
            self._fallocate(offset, nbytes)

    def _fallocate(self, offset: int, nbytes: int) -> None:
        """``posix_fallocate`` of bytes ``[offset, offset + nbytes)``, no room a NoSpaceError
        (the caller holds ``_allocating``)."""
        try:
            os.posix_fallocate(self._fd, offset, nbytes)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                raise NoSpaceError(f"cannot allocate bytes [{offset}, {offset + nbytes}) of "
                                   f"arena {self.path}: {exc.strerror}") from None
            raise

    def slot_dest(self, index: int, slot_bytes: int, crcs: WrittenCrcs | None = None
                  ) -> FileDest:
        """Slot ``index`` as a destination written with ``pwrite`` (a rebuild's: its fresh
        pages are then neither cleared nor mapped here first, coding/dest.py), each write's
        CRC recorded in ``crcs`` (file offsets); its own descriptor, closed by the caller."""
        with self._allocating:  # close() waits: the descriptor duplicated is this file's
            if self._fd < 0:
                raise ArenaFormatError(f"arena {self.path} is closed")
            return FileDest(self._fd, fmt.slot_offset(index, slot_bytes), slot_bytes, crcs)

    def close(self) -> None:
        # Never closes the fd under a running fallocate, nor unmaps under a faulting.
        with self._allocating, self._faulting:
            self._close()

    def _close(self) -> None:
        if self._fd < 0:
            return
        try:
            self.view.release()
            self._map.close()
        except BufferError:
            # A slice handed out is still alive somewhere; the mapping goes with the process.
            logger.debug("arena %s still has views; leaving the mapping", self.path)
        os.close(self._fd)
        self._fd = -1

    def unlink(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

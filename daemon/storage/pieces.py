"""Parity pieces in shared memory: their files, the pool that reuses them, scratch buffers.

A parity piece of step ``s`` is the file ``<prefix>.<job>.p<s>.g<group>.s<stripe>.i<index>``
beside the arenas, so that it survives a daemon restart like the arenas do. When a newer
step is restorable the older step's files are released into a pool
(``<prefix>.<job>.q.g<group>.s<stripe>.i<index>``, one per piece position) and the next
step's same piece reuses the file: clearing allocated pages runs at memset speed,
allocating fresh tmpfs pages ten times slower, and this sits between the last offer and
the first byte sent. A reused file's mapping is kept with it: allocating, mapping
(``MAP_POPULATE``) and unmapping 341 MiB again every step cost 50 ms of CPU (11 + 25 +
14 ms), against none. Files are opened through proto/safefile.py: this daemon's own
regular files only, never through a planted link.
"""

from __future__ import annotations

import glob
import mmap
import os
import threading

import numpy as np

from shardguard.daemon.coding.dest import FileDest
from shardguard.daemon.errors import UnsafePathError
from shardguard.proto import safefile

_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class PieceFiles:
    """This node's parity piece files and scratch buffers, for every job."""

    def __init__(self, shm_dir: str, prefix: str) -> None:
        self.shm_dir, self.prefix = shm_dir, prefix
        self._lock = threading.Lock()
        self._scratches: dict[tuple[str, int, int, int], np.ndarray] = {}
        #: (job, "g.s.i" position) -> {file (st_dev, st_ino): its mapping}: the piece files
        #: of that position kept mapped while they are reused. Two per position: a step's
        #: parity and the previous step's (released into the pool only once the step is
        #: restorable) take turns.
        self._mapped: dict[tuple[str, str], dict[tuple[int, int], np.ndarray]] = {}

    @staticmethod
    def _where(group: int, stripe: int, index: int) -> str:
        return f"g{group}.s{stripe}.i{index}"

    def path(self, job: str, step: int, group: int, stripe: int, index: int) -> str:
        return os.path.join(self.shm_dir,
                            f"{self.prefix}.{job}.p{step}.{self._where(group, stripe, index)}")

    def _pool_path(self, job: str, group: int, stripe: int, index: int) -> str:
        return os.path.join(self.shm_dir,
                            f"{self.prefix}.{job}.q.{self._where(group, stripe, index)}")

    def create(self, job: str, step: int, group: int, stripe: int, index: int,
               nbytes: int, clear: bool = True) -> np.ndarray:
        """An allocated file for a parity piece, mapped as a uint8 array: zeroed, or with
        ``clear=False`` holding whatever a reused file held (for a caller that writes
        every byte: the encoder, coding/coverage.py)."""
        path = self.path(job, step, group, stripe, index)
        pool = self._pool_path(job, group, stripe, index)
        fd, reused = _reopen(pool), True
        if fd is not None:
            try:
                safefile.replace(pool, path)  # the descriptor follows the file
            except BaseException:
                os.close(fd)
                raise
        else:
            reused = False
            fd = _reopen(path)  # this step's own file, offered again
            if fd is not None:
                os.ftruncate(fd, 0)
            else:
                fd = safefile.open_new(path, os.O_RDWR, 0o600)
        key = (job, self._where(group, stripe, index))
        try:
            st = os.fstat(fd)
            ident = (st.st_dev, st.st_ino)
            with self._lock:
                kept = self._mapped.setdefault(key, {}).pop(ident, None)
            if reused and kept is not None and len(kept) == st.st_size == nbytes:
                piece = kept  # the same file, allocated and mapped steps ago
            else:
                if not nbytes:
                    os.ftruncate(fd, 0)
                    return np.zeros(0, dtype=np.uint8)
                if st.st_size != nbytes:
                    os.ftruncate(fd, nbytes)
                os.posix_fallocate(fd, 0, nbytes)
                # MAP_POPULATE maps every page in one call: clearing a reused file then runs
                # at memset speed instead of a page fault per 4 KiB (133 -> 40 ms, 341 MiB).
                piece = np.frombuffer(mmap.mmap(fd, nbytes, mmap.MAP_SHARED | _POPULATE),
                                      dtype=np.uint8)
            with self._lock:
                files = self._mapped.setdefault(key, {})
                files[ident] = piece
                while len(files) > 2:  # the oldest goes (a file replaced meanwhile)
                    del files[next(iter(files))]
            if reused and clear:
                piece[:] = 0
            return piece
        finally:
            os.close(fd)

    def create_dest(self, job: str, step: int, group: int, stripe: int, index: int,
                    nbytes: int) -> FileDest:
        """A zeroed file for a parity piece of ``step``, not mapped here and not allocated:
        written with ``pwrite`` (a rebuild's decoded parity), its pages are allocated as
        they are filled, neither cleared first nor mapped (coding/dest.py); no room is a
        NoSpaceError from the write. Never a pooled file (its old bytes would have to be
        cleared); the caller closes the destination."""
        path = self.path(job, step, group, stripe, index)
        fd = _reopen(path)  # this step's own file, offered again
        if fd is None:
            fd = safefile.open_new(path, os.O_RDWR, 0o600)
        try:
            st = os.fstat(fd)
            with self._lock:  # a mapping of the file's old bytes is not reused
                self._mapped.get((job, self._where(group, stripe, index)), {}).pop(
                    (st.st_dev, st.st_ino), None)
            os.ftruncate(fd, 0)
            os.ftruncate(fd, nbytes)  # pages are allocated as they are written
            return FileDest(fd, 0, nbytes)
        finally:
            os.close(fd)

    def read(self, job: str, step: int, group: int, stripe: int, index: int) -> memoryview:
        """A stored parity piece, mapped read-only (FileNotFoundError when not held)."""
        fd = safefile.open_owned(self.path(job, step, group, stripe, index))
        try:
            if not os.fstat(fd).st_size:
                return memoryview(b"")
            return memoryview(mmap.mmap(fd, 0, prot=mmap.PROT_READ))
        finally:
            os.close(fd)

    def scratch(self, job: str, group: int, stripe: int, j: int, nbytes: int,
                clear: bool = True) -> np.ndarray:
        """A buffer for parity ``j >= 1`` of a stripe, reused step after step: zeroed, or
        with ``clear=False`` holding what it held (as :meth:`create`).

        Reuse is safe: the next step of the job is offered only once this one is
        restorable, which needs the holder to have stored what was sent from here.
        """
        key = (job, group, stripe, j)
        with self._lock:
            buf = self._scratches.get(key)
            if buf is None or len(buf) < nbytes:
                buf = self._scratches[key] = np.zeros(nbytes, dtype=np.uint8)
                return buf
        view = buf[:nbytes]
        if clear:
            view[:] = 0
        return view

    def release_before(self, job: str, step: int) -> None:
        """Release the parity of steps before ``step`` into the pool (or delete it)."""
        base = os.path.join(self.shm_dir, glob.escape(f"{self.prefix}.{job}.") + "p*")
        head = f"{self.prefix}.{job}.p"
        for path in glob.glob(base):
            name = os.path.basename(path)
            s, dot, where = name[len(head):].partition(".")
            if not s.isdigit() or int(s) >= step or safefile.is_temp(name):
                continue
            pool = os.path.join(self.shm_dir, f"{self.prefix}.{job}.q.{where}") if dot else ""
            if not pool or os.path.exists(pool):
                self._unmap(job, where, path)
                _unlink(path)
            else:
                os.rename(path, pool)

    def _unmap(self, job: str, where: str, path: str) -> None:
        """Stop keeping the mapping of the file at ``path`` (about to be deleted), so that
        its memory goes with it."""
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return
        with self._lock:
            self._mapped.get((job, where), {}).pop((st.st_dev, st.st_ino), None)

    def drop(self, job: str) -> None:
        """Delete every piece file of ``job`` and its scratch buffers."""
        for path in glob.glob(os.path.join(self.shm_dir, glob.escape(f"{self.prefix}.{job}.")
                                           + "[pq]*")):
            _unlink(path)
        with self._lock:
            for key in [k for k in self._scratches if k[0] == job]:
                del self._scratches[key]
            for mkey in [k for k in self._mapped if k[0] == job]:
                del self._mapped[mkey]


def _reopen(path: str) -> int | None:
    """A read-write descriptor of this daemon's own file at ``path``; None when there is
    none. Anything else there (a symlink, another user's file) is removed, never opened."""
    try:
        return safefile.open_owned(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    except UnsafePathError:
        safefile.remove(path)  # UnsafePathError again when this user may not remove it
        return None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

"""One daemon per socket and per shared-memory prefix: an exclusive lock held for its life.

A second daemon on the same socket or prefix would adopt the live daemon's arenas and
unlink its socket; so the daemon takes both locks before it touches anything, and a
second start is refused naming the pid that holds them. The lock is ``flock`` on a small
file (``<socket>.lock``, ``<shm_dir>/<prefix>.lock``) that holds the holder's pid: the
kernel releases it when the process dies, however it dies, so a crashed daemon never
blocks its replacement.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time

from shardguard.daemon.base import procs
from shardguard.daemon.errors import ConfigError, UnsafePathError
from shardguard.proto import safefile

#: Attempts when the file is replaced under us (its previous holder removed it at exit).
_ATTEMPTS = 5
#: How long a start waits for a killed holder to finish exiting (tearing down gigabytes of
#: mappings under load takes seconds); a live holder is refused at once.
DYING_WAIT_S = 30.0


class PidLock:
    """An exclusive lock on ``path`` for ``what`` (named in errors: "socket /run/x.sock").

    Raises (from :meth:`acquire`):
        ConfigError: another process holds it; the message names its pid.
        UnsafePathError: another user's file (or a symlink) is at ``path`` and this user
            cannot remove it.
    """

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        self.what = what
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def acquire(self) -> None:
        for _ in range(_ATTEMPTS):
            fd = self._open()
            if fd < 0:
                continue  # a stale file of another user was removed: create ours
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                if not _wait_for_dying(fd, holder):
                    os.close(fd)
                    raise ConfigError(
                        f"{self.what} is in use by another daemon (pid {holder}, lock "
                        f"{self.path}): stop it first, or give this daemon its own socket "
                        "and shm_prefix") from None
            if not _same_file(fd, self.path):
                os.close(fd)  # its holder removed it as we opened it: lock the new one
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._fd = fd
            return
        raise ConfigError(f"cannot lock {self.path} for {self.what}: it keeps changing")

    def release(self) -> None:
        """Remove the file, then unlock: whoever opens the path next makes a new one."""
        if self._fd < 0:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = -1

    def _open(self) -> int:
        """A descriptor of our lock file; -1 when another user's stale file was removed."""
        try:
            return safefile.open_owned(self.path, os.O_RDWR, create=True)
        except UnsafePathError as exc:
            refused = exc
        # Another user's file (or a symlink). A process holding it is a daemon of theirs
        # on this prefix: never take it from them. A file nobody holds was left or planted.
        foreign = _peek(self.path)
        if foreign is not None:
            try:
                fcntl.flock(foreign, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(foreign)
                os.close(foreign)
                raise ConfigError(
                    f"{self.what} is in use by another user's daemon (pid {holder}, lock "
                    f"{self.path}: {refused}); choose another shm_prefix or socket") from None
            os.close(foreign)
        try:
            safefile.remove(self.path)
        except UnsafePathError:
            raise UnsafePathError(
                f"{self.what} cannot be locked: {refused}. Another user's daemon may use it, "
                "or the file was planted: choose another shm_prefix or socket, or have root "
                f"remove {self.path}") from None
        return -1


def _wait_for_dying(fd: int, holder: str) -> bool:
    """Take the lock on ``fd`` once ``holder`` lets go, if it is dying: killed, its main
    thread a zombie while the rest of it still unmaps its memory (base/procs.py). A
    replacement started at once (systemd, ``shardguard cluster start``) waits for that,
    up to :data:`DYING_WAIT_S`, instead of being refused. False: a live holder (or an
    unknown one, or one still dying after the wait)."""
    if not holder.isdigit() or procs.running(int(holder)):
        return False
    deadline = time.monotonic() + DYING_WAIT_S
    while time.monotonic() < deadline:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if procs.running(int(holder)):
                return False  # the pid was reused, or the file names another holder
            time.sleep(0.02)
    return False


def _peek(path: str) -> int | None:
    """A read-only descriptor of the regular file at ``path`` if this user may open one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def _read_pid(fd: int) -> str:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return text if text.isdigit() else "unknown"


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

"""One daemon per socket and per prefix (daemon/storage/lock.py): the lock, its pid, its file.

Issue 15, item 1; the real second daemon is in tests/integration/test_hostile_local.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardguard.daemon.errors import ConfigError
from shardguard.daemon.storage.lock import PidLock


def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock.lock")
    first = PidLock(path, "socket /x")
    first.acquire()
    assert Path(path).read_text() == f"{os.getpid()}\n"
    with pytest.raises(ConfigError, match=rf"socket /x is in use by another daemon \(pid "
                                          rf"{os.getpid()}, lock {path}\)"):
        PidLock(path, "socket /x").acquire()
    first.release()
    assert not Path(path).exists()
    again = PidLock(path, "socket /x")
    again.acquire()  # free once released
    again.release()


def test_a_dead_holders_lock_is_taken_over(tmp_path: Path) -> None:
    """The kernel drops the lock when its holder dies, however it dies (SIGKILL here)."""
    path = tmp_path / "p.lock"
    code = ("import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d' % os.getpid())\n"
            "print('locked', flush=True); time.sleep(60)\n")
    with subprocess.Popen([sys.executable, "-c", code, str(path)],
                          stdout=subprocess.PIPE) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
            with pytest.raises(ConfigError, match=rf"\(pid {holder.pid}, lock {path}\)"):
                PidLock(str(path), "shm prefix 'p'").acquire()
        finally:
            holder.kill()
    lock = PidLock(str(path), "shm prefix 'p'")
    lock.acquire()
    assert path.read_text() == f"{os.getpid()}\n"
    lock.release()


def test_a_symlink_at_the_lock_is_replaced_not_followed(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.write_text("root's file\n")
    path = tmp_path / "p.lock"
    path.symlink_to(precious)
    lock = PidLock(str(path), "shm prefix 'p'")
    lock.acquire()
    assert precious.read_text() == "root's file\n" and not path.is_symlink()
    lock.release()

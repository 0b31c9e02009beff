"""One daemon per socket and per prefix (daemon/storage/lock.py): the lock, its pid, its file.

Issue 15, item 1; the real second daemon is in tests/integration/test_hostile_local.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardguard.daemon.errors import ConfigError
from shardguard.daemon.base import procs
from shardguard.daemon.storage import lock as lock_mod
from shardguard.daemon.storage.lock import PidLock
from shardguard.daemon.service import cluster


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


#: A holder whose main thread exits (a zombie, as a SIGKILLed daemon's is while its other
#: threads unmap its memory) while another thread keeps the process, and its lock, alive
#: until told to go (a line on stdin) or for 20 s.
_DYING_HOLDER = (
    "import ctypes, fcntl, os, sys, threading, time\n"
    "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d' % os.getpid())\n"
    "def tail():\n"
    "    sys.stdin.readline() if sys.argv[2] == 'wait' else time.sleep(float(sys.argv[2]))\n"
    "    os._exit(0)\n"
    "threading.Thread(target=tail).start()\n"
    "print('locked', flush=True)\n"
    "ctypes.CDLL(None, use_errno=True).syscall(60, 0)\n"  # SYS_exit: this thread only
)


def _dying_holder(path: Path, tail: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", _DYING_HOLDER, str(path), tail],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"locked\n"
    deadline = time.monotonic() + 10
    while not procs.exiting(proc.pid):  # the main thread's exit lands
        assert time.monotonic() < deadline, "the holder's main thread never exited"
        time.sleep(0.01)
    return proc


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="SYS_exit is 60 on x86_64 only")
def test_a_dying_holder_is_waited_for_not_refused(tmp_path: Path) -> None:
    """A replacement started while the killed daemon is still exiting (its main thread a
    zombie, its arenas being unmapped) takes the lock once it is released, instead of
    failing with "in use" (bench_cluster's second rebuild did, ~1 run in 2)."""
    path = tmp_path / "p.lock"
    with _dying_holder(path, "1.0") as holder:
        assert not procs.running(holder.pid) and procs.holds_resources(holder.pid)
        lock = PidLock(str(path), "shm prefix 'p'")
        lock.acquire()  # blocks until the holder's last thread is gone
        assert holder.wait(timeout=10) == 0
        assert path.read_text() == f"{os.getpid()}\n"
        lock.release()


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="SYS_exit is 60 on x86_64 only")
def test_a_holder_dying_for_too_long_is_refused(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lock_mod, "DYING_WAIT_S", 0.3)
    path = tmp_path / "p.lock"
    with _dying_holder(path, "wait") as holder:
        try:
            with pytest.raises(ConfigError, match=rf"\(pid {holder.pid}, lock {path}\)"):
                PidLock(str(path), "shm prefix 'p'").acquire()
        finally:
            assert holder.stdin is not None
            holder.stdin.write(b"go\n")
            holder.stdin.close()
            holder.wait(timeout=10)


def test_process_states_of_a_running_and_a_gone_process() -> None:
    assert procs.running(os.getpid()) and not procs.exiting(os.getpid())
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    gone = int(done.stdout)
    assert not procs.running(gone) and not procs.holds_resources(gone)
    assert not procs.running(0) and not procs.running(-1)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="SYS_exit is 60 on x86_64 only")
def test_cluster_start_waits_for_a_daemon_still_exiting(tmp_path: Path) -> None:
    """``cluster.start`` right after a kill (systemd's restart; test_daemon_faults' in-run
    kill saw the zombie and restarted at once) waits for the dying daemon, as the
    daemon's own lock does, instead of "node 2 is already running" (CI, stop 17)."""
    with _dying_holder(tmp_path / "p.lock", "1.0") as holder:
        cluster._check_slot_free(2, holder.pid)  # returns once the holder is gone
        assert not procs.holds_resources(holder.pid)
        assert holder.wait(timeout=10) == 0


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="SYS_exit is 60 on x86_64 only")
def test_cluster_start_refuses_a_running_daemon_and_one_dying_too_long(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=rf"node 2 is already running \(pid {os.getpid()}\)"):
        cluster._check_slot_free(2, os.getpid())
    monkeypatch.setattr(cluster, "DYING_WAIT_S", 0.3)
    with _dying_holder(tmp_path / "p.lock", "wait") as holder:
        try:
            with pytest.raises(ConfigError, match=rf"pid {holder.pid}\) was killed but is "
                                                  r"still exiting"):
                cluster._check_slot_free(2, holder.pid)
        finally:
            assert holder.stdin is not None
            holder.stdin.write(b"go\n")
            holder.stdin.close()
            holder.wait(timeout=10)

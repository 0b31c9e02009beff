"""Whether a process is still running, or dying and about to let go of what it holds.

A process killed with SIGKILL is not gone at once: its main thread can be a zombie while
other threads still unmap its memory (gigabytes of arenas take a while), and the kernel
closes its files, which releases its ``flock`` locks, only after the last thread's memory
is torn down. ``/proc/<pid>/stat`` of the main thread then says "Z" although the process
still holds every lock. A zombie whose task list still has other threads is dying, not
dead: whoever waits for it to let go (a replacement daemon taking its lock, ``shardguard
cluster kill`` before a restart) must wait for those threads too.

Linux only (``/proc``), as the daemon is.
"""

from __future__ import annotations

import os


def _state(pid: int) -> str | None:
    """The main thread's state letter, or None when no such process exists."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # "pid (comm) S ...": comm may hold spaces and parentheses; the state follows the last ')'.
    return stat[stat.rindex(b")") + 2:][:1].decode()


def threads_left(pid: int) -> int:
    """Threads of ``pid`` still listed by the kernel (0 when the process is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except (FileNotFoundError, ProcessLookupError):
        return 0


def running(pid: int) -> bool:
    """``pid`` exists and its main thread is not a zombie (it runs, sleeps or stops)."""
    if pid <= 0:
        return False
    state = _state(pid)
    return state is not None and state not in ("Z", "X")


def exiting(pid: int) -> bool:
    """``pid`` is dying: its main thread exited (a zombie) while other threads still run
    their exit (and hold its files and locks)."""
    if pid <= 0:
        return False
    return _state(pid) in ("Z", "X") and threads_left(pid) > 1


def holds_resources(pid: int) -> bool:
    """Running, or dying but not yet done: its files (and locks) may still be open."""
    return running(pid) or exiting(pid)

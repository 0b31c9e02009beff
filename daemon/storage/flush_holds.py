"""Slots held for the persistent tier while it copies them out: not handed out for a new
step meanwhile, and a ``begin`` that needs one waits for the copy (the store:
storage/store.py; the tier: roles/tier.py)."""

from __future__ import annotations

import threading

from shardguard.daemon.errors import NotRestorableError
from shardguard.daemon.storage.jobs import Jobs
from shardguard.daemon.storage.records import FlushHold
from shardguard.proto.arena import SlotState

#: Longest a ``begin`` waits for the persistent tier to finish copying out the slot it
#: needs (a memcpy of the slot: far less, unless the node is starved).
FLUSH_HOLD_WAIT_S = 60.0


class FlushHolds:
    """The holds of the persistent tier, each marked in its rank's ``flushing``.

    Args:
        jobs: the jobs held here.
        lock: the store's lock.
    """

    def __init__(self, jobs: Jobs, lock: threading.RLock) -> None:
        self._jobs = jobs
        self._lock = lock
        self._released = threading.Condition(lock)  # a hold was let go

    def hold(self, job: str, step: int) -> list[FlushHold]:
        """Hold every local rank's slot of ``step`` against reuse while the tier copies it.

        The slot may already be free (a newer step is restorable) as long as nothing
        was written over it. Release with :meth:`release`.

        Raises:
            NotRestorableError: some local rank no longer holds ``step``.
        """
        with self._lock:
            rec = self._jobs.get(job)
            holds = []
            for rank in sorted(rec.local_ranks):
                rr = rec.ranks.get(rank)
                index = next((i for i, s in enumerate(rr.slots) if s.step == step
                              and s.state != SlotState.WRITING and i not in rr.corrupt),
                             None) if rr is not None else None
                if index is None:
                    self._let_go(holds)
                    raise NotRestorableError(
                        f"job {job} rank {rank}: step {step} is no longer held on this node")
                rr.flushing.add(index)
                holds.append(FlushHold(rank, index, rr.arena.slot(index, rr.slot_bytes),
                                       rr.slots[index], rr))
            return holds

    def release(self, holds: list[FlushHold]) -> None:
        with self._lock:
            self._let_go(holds)

    def wait_released(self, timeout_s: float) -> None:
        """Wait (the caller holding the lock) until some hold is let go, or ``timeout_s``."""
        self._released.wait(timeout_s)

    def _let_go(self, holds: list[FlushHold]) -> None:
        for h in holds:
            h.rr.flushing.discard(h.slot)
        self._released.notify_all()

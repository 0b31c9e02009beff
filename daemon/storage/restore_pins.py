"""Slots pinned for a restore: opened (the step checked as it is read), then released
with the verdict; a failed check marks the slot corrupt (the store: storage/store.py)."""

from __future__ import annotations

import concurrent.futures
import logging
import threading

from shardguard.daemon.errors import CorruptionError, NotRestorableError
from shardguard.daemon.storage.jobs import Jobs
from shardguard.daemon.storage.records import OpenSlot
from shardguard.daemon.storage.slot_checks import SlotChecks
from shardguard.daemon.storage.slots import Slots
from shardguard.proto.arena import SlotState

logger = logging.getLogger(__name__)


class RestorePins:
    """Each rank's restores in progress, marked in its ``pinned`` (and ``verifying``).

    Args:
        jobs: the jobs held here.
        slots: the state machine (opening the previous step rolls back to it).
        checks: where the daemon's own checks run.
        verify_on_restore: check a slot's checksums when it is read for a restore.
        lock: the store's lock.
    """

    def __init__(self, jobs: Jobs, slots: Slots, checks: SlotChecks, verify_on_restore: bool,
                 lock: threading.RLock) -> None:
        self._jobs = jobs
        self._slots = slots
        self._checks = checks
        self.verify_on_restore = verify_on_restore
        self._lock = lock

    def open(self, job: str, rank: int, lease: str, step: int | None,
             client_checks: bool = False) -> OpenSlot:
        """Pin the slot of the restorable step (or of the previous one) for a restore.

        With ``verify_on_restore`` its bytes are checked as they are read: by a client
        that says it checks them as it copies them (``client_checks``: it is handed the
        seal's checksums, and the slot is read once), else on a daemon thread while the
        client copies. :meth:`release` reports the verdict either way. Opening the
        previous restorable step rolls the job on this node back to it: the ranks
        agreed on it.
        """
        with self._lock:
            rec = self._jobs.get(job)
            rr = self._jobs.claimed(job, rank, lease)
            if rec.restorable_step is None:
                raise NotRestorableError(f"job {job} has no restorable step")
            if step is not None and step != rec.restorable_step:
                self._slots.roll_back(rec, step)
            index = next((i for i, s in enumerate(rr.slots)
                          if s.state == SlotState.RESTORABLE and s.step == rec.restorable_step),
                         None)
            if index is None:
                raise NotRestorableError(
                    f"job {job} rank {rank}: no slot holds restorable step {rec.restorable_step}")
            if index in rr.corrupt:
                raise CorruptionError(f"job {job} rank {rank} step {rec.restorable_step}: "
                                      "the stored bytes failed their checksum")
            s = rr.slots[index]
            rr.pinned[index] = s.step
            if self.verify_on_restore and not client_checks:
                view = rr.arena.slot(index, rr.slot_bytes)
                rr.verifying[index] = self._checks.submit(job, rank, view, s)
        return OpenSlot(index, s, self.verify_on_restore)

    def release(self, job: str, rank: int, lease: str, step: int,
                corrupt: bool = False) -> None:
        """Unpin a slot opened for restore.

        ``corrupt``: the client's check of what it read failed. The slot is checked
        here again (only then: a sound restore reads it once): bytes that fail are
        marked corrupt, never served again (a job with parity repairs them at the next
        open); bytes that pass mean the client's copy went bad, and it reads again.

        Raises:
            CorruptionError: the slot's bytes failed their checksum; what the client
                read must be thrown away.
        """
        with self._lock:
            rr = self._jobs.claimed(job, rank, lease)
            slots = [i for i, pinned_step in rr.pinned.items() if pinned_step == step]
            checks: list[tuple[int, concurrent.futures.Future[None] | None]] = [
                (i, rr.verifying.pop(i, None)) for i in slots]
            if corrupt:
                checks = [(i, check or self._checks.submit(
                    job, rank, rr.arena.slot(i, rr.slot_bytes),
                    rr.slots[i])) for i, check in checks]
        failure = None
        for i, check in checks:
            try:
                if check is not None:
                    check.result()
            except CorruptionError as exc:
                failure = exc
                with self._lock:
                    rr.corrupt.add(i)
        with self._lock:
            for i in slots:
                rr.pinned.pop(i, None)
        rr.arena.start_preparing()  # a rebuilt arena's other slot, now the restore is done
        if failure is not None:
            raise failure
        if corrupt:
            logger.warning("the client's check of a restore failed, the stored bytes pass "
                           "theirs: the client reads them again",
                           extra={"job": job, "rank": rank, "step": step})

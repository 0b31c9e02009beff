"""What the protection layer reads of sealed slots without pinning them (training goes
on meanwhile): their bytes, their generation, their block CRCs, a re-check of their
checksums (the store: storage/store.py)."""

from __future__ import annotations

import threading

from shardguard.daemon.errors import CorruptionError, NotRestorableError, UnknownJobError
from shardguard.daemon.storage.jobs import Jobs
from shardguard.daemon.storage.records import RankRecord
from shardguard.daemon.storage.slot_checks import SlotChecks, verify
from shardguard.proto.arena import SlotDesc, SlotState

#: What a check reports when the bytes it read were rewritten meanwhile.
SUPERSEDED = "superseded"


class SealedReads:
    """Reads of sealed (or restorable) slots; each takes the store's lock, checks run
    outside it.

    Args:
        jobs: the jobs held here.
        checks: the block CRCs of the seals made here.
        lock: the store's lock.
    """

    def __init__(self, jobs: Jobs, checks: SlotChecks, lock: threading.RLock) -> None:
        self._jobs = jobs
        self._checks = checks
        self._lock = lock

    def block_crcs(self, job: str, rank: int, step: int, generation: int) -> list[int] | None:
        """The CRC32C of each ``CRC_BLOCK_BYTES`` block of the slot's data, computed at its
        seal (None: not known here, e.g. a slot adopted after a restart)."""
        with self._lock:
            return self._checks.blocks(job, rank, step, generation)

    def sealed_slot(self, job: str, rank: int, step: int) -> tuple[memoryview, SlotDesc, int]:
        """The bytes and record of ``rank``'s sealed or restorable slot of ``step``, and
        slot_bytes."""
        with self._lock:
            rr = self._jobs.get(job).ranks.get(rank)
            if rr is None:
                raise UnknownJobError(f"job {job} has no rank {rank} on this daemon")
            index = _sealed_index(rr, step)
            if index is None:
                raise NotRestorableError(f"job {job} rank {rank} holds no sealed step {step}")
            return (rr.arena.slot(index, rr.slot_bytes), rr.slots[index],
                    rr.slot_bytes)

    def check_slot(self, job: str, rank: int, step: int) -> tuple[str | None, int]:
        """Re-check the checksums of ``rank``'s slot of ``step`` without pinning it.

        Returns ``(problem, bytes_checked)``; problem is None when the bytes are
        sound, ``SUPERSEDED`` when the slot was rewritten while it was read
        (training went on: not a fault), else what is wrong. Nothing is
        marked corrupt and no slot is held, so training is not disturbed.
        """
        with self._lock:
            rr = self._jobs.get(job).ranks.get(rank)
            if rr is None:
                return f"rank {rank} holds nothing on this node", 0
            index = _sealed_index(rr, step)
            if index is None:
                return f"rank {rank} holds no sealed step {step}", 0
            rec = rr.slots[index]
            view = rr.arena.slot(index, rr.slot_bytes)
        try:
            verify(job, rank, view, rec)
            problem = None
        except CorruptionError as exc:
            problem = str(exc)
        with self._lock:
            cur = rr.slots[index]
            if cur.generation != rec.generation or cur.step != step:
                return SUPERSEDED, 0
        return problem, rec.data_bytes + rec.manifest_bytes

    def slot_generation(self, job: str, rank: int, step: int) -> int | None:
        """The generation of ``rank``'s slot holding ``step`` (None: not held)."""
        with self._lock:
            rr = self._jobs.get(job).ranks.get(rank)
            if rr is None or (index := _sealed_index(rr, step)) is None:
                return None
            return rr.slots[index].generation


def _sealed_index(rr: RankRecord, step: int) -> int | None:
    """The first slot of ``rr`` holding ``step`` sealed or restorable."""
    return next((i for i, s in enumerate(rr.slots)
                 if s.step == step and s.state in (SlotState.SEALED, SlotState.RESTORABLE)),
                None)

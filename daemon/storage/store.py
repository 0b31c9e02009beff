"""The node's snapshot store: the one object the layers above hold, over the parts that
each keep one concept, all under one lock.

- ``jobs.py``: jobs and ranks, registration and leases, the budget, drop, adoption;
- ``slots.py``: the slot state machine (free -> writing -> sealed -> restorable -> free)
  and the job's restorable step;
- ``restore_pins.py``: slots pinned for a restore, checked as they are read;
- ``flush_holds.py``: slots the persistent tier holds while it copies them out;
- ``sealed_reads.py``: the protection layer's reads of sealed slots, unpinned;
- ``slot_checks.py``: a slot's checksums, at its seal and when read back;
- ``shm_files.py``: the meta file per job and the arena per rank, and adoption of them
  by a restarted daemon;
- ``records.py``: the records and typed values they pass around.

This module holds no transport: the agent (gRPC) and the protection layer call it.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable

from shardguard.daemon.base.metrics import Metrics
from shardguard.daemon.coding.dest import FileDest
from shardguard.daemon.storage.flush_holds import FLUSH_HOLD_WAIT_S, FlushHolds
from shardguard.daemon.storage.jobs import Jobs
from shardguard.daemon.storage.records import (
    JOB_RE,
    MAX_WORLD,
    FlushHold,
    Hooks,
    JobRecord,
    OpenSlot,
    RankRecord,
    Registration,
)
from shardguard.daemon.storage.restore_pins import RestorePins
from shardguard.daemon.storage.sealed_reads import SUPERSEDED, SealedReads
from shardguard.daemon.storage.shm_files import META_VERSION, ShmFiles
from shardguard.daemon.storage.slot_checks import ClientBlocks, SlotChecks
from shardguard.daemon.storage.slots import MAX_MANIFEST_BYTES, Slots
from shardguard.proto.arena import SlotDesc
from shardguard.proto.meta import Topology

__all__ = [
    "FLUSH_HOLD_WAIT_S", "JOB_RE", "MAX_MANIFEST_BYTES", "MAX_WORLD", "META_VERSION",
    "SUPERSEDED", "FlushHold", "JobRecord", "OpenSlot", "RankRecord", "Registration",
    "Store",
]

OnStep = Callable[[str, int], None]


class Store:
    """All jobs held by this daemon. Thread-safe; checksums run outside the lock.

    Args:
        shm_dir: where arenas and meta files live (/dev/shm).
        prefix: per-daemon name prefix, so several daemons can share one shm dir.
        budget_bytes: most arena bytes this daemon may hold.
        verify_on_restore: check a slot's checksums when it is read for a restore (by a
            client that checks as it copies, else by the daemon in parallel).
        on_node_sealed: called (job, step) outside the lock when every local rank
            sealed ``step``; the protection layer then makes it restorable. None
            means this node is the whole job: the step is restorable at once.
        metrics: the daemon's metrics (default: a registry of the store's own).
    """

    def __init__(self, shm_dir: str, prefix: str, budget_bytes: int, *,
                 verify_on_restore: bool = True,
                 on_node_sealed: OnStep | None = None,
                 metrics: Metrics | None = None) -> None:
        self.metrics = metrics or Metrics()
        lock = threading.RLock()
        self._hooks = Hooks(on_node_sealed=on_node_sealed)
        self._checks = SlotChecks()
        self._jobs = Jobs(ShmFiles(shm_dir, prefix), budget_bytes, self._checks, self.metrics,
                          lock)
        self._holds = FlushHolds(self._jobs, lock)
        self._slots = Slots(self._jobs, self._holds, self._checks, self._hooks, self.metrics,
                            lock)
        self._pins = RestorePins(self._jobs, self._slots, self._checks, verify_on_restore, lock)
        self._reads = SealedReads(self._jobs, self._checks, lock)

    # ------------------------------------------------------- configuration

    @property
    def shm_dir(self) -> str:
        return self._jobs.files.shm_dir

    @property
    def prefix(self) -> str:
        return self._jobs.files.prefix

    @property
    def budget_bytes(self) -> int:
        return self._jobs.budget_bytes

    @property
    def verify_on_restore(self) -> bool:
        return self._pins.verify_on_restore

    @property
    def on_node_sealed(self) -> OnStep | None:
        return self._hooks.on_node_sealed

    @on_node_sealed.setter
    def on_node_sealed(self, hook: OnStep | None) -> None:
        self._hooks.on_node_sealed = hook

    @property
    def on_roll_back(self) -> OnStep | None:
        """Called (job, step) under the lock when a restore rolled the job back to ``step``."""
        return self._hooks.on_roll_back

    @on_roll_back.setter
    def on_roll_back(self, hook: OnStep | None) -> None:
        self._hooks.on_roll_back = hook

    @property
    def on_restorable(self) -> OnStep | None:
        """Called (job, step) outside the lock when a seal made ``step`` restorable (jobs
        whose every rank is on this node; the protection layer reports the others)."""
        return self._hooks.on_restorable

    @on_restorable.setter
    def on_restorable(self, hook: OnStep | None) -> None:
        self._hooks.on_restorable = hook

    # ------------------------------------------------------------- queries

    def used_bytes(self) -> int:
        return self._jobs.used_bytes()

    def jobs(self) -> list[JobRecord]:
        return self._jobs.all()

    def job(self, job: str) -> JobRecord:
        return self._jobs.get(job)

    def latest(self, job: str) -> int | None:
        return self._jobs.get(job).restorable_step

    # ---------------------------------------------------------- life cycle

    def check_register(self, job: str, rank: int, world_size: int, slot_bytes: int, pid: int,
                       local_ranks: Iterable[int], force: bool = False) -> None:
        """Every check :meth:`register` makes, changing nothing (run before a rebuild)."""
        self._jobs.check_register(job, rank, world_size, slot_bytes, pid, local_ranks, force)

    def register(self, job: str, rank: int, world_size: int, slot_bytes: int, pid: int,
                 local_ranks: Iterable[int], force: bool = False,
                 topology: Topology | None = None, epoch: int = 0) -> Registration:
        """Claim (job, rank) for process ``pid``; create or grow its arena."""
        return self._jobs.register(job, rank, world_size, slot_bytes, pid, local_ranks, force,
                                   topology, epoch)

    def unregister(self, job: str, rank: int, lease: str) -> None:
        self._jobs.unregister(job, rank, lease)

    def drop(self, job: str) -> tuple[int, int]:
        """Free every arena of ``job``; returns (arenas, bytes) freed."""
        return self._jobs.drop(job)

    def adopt(self) -> int:
        """Re-adopt the jobs a previous daemon left in shm; returns how many."""
        return self._jobs.adopt()

    def close(self) -> None:
        """Unmap everything; the files stay for the next daemon to adopt."""
        self._checks.shutdown()
        self._jobs.close()

    # ------------------------------------------------------- the snapshot

    def begin(self, job: str, rank: int, lease: str, step: int) -> int:
        """Hand out the slot for ``step`` (free -> writing)."""
        return self._slots.begin(job, rank, lease, step)

    def seal(self, job: str, rank: int, lease: str, step: int, slot: int, data_bytes: int,
             manifest_offset: int, manifest_bytes: int,
             given: ClientBlocks | None = None) -> int | None:
        """Checksum a written slot (``given``: the client's block CRCs of its data) and
        seal it; returns the job's restorable step after."""
        return self._slots.seal(job, rank, lease, step, slot, data_bytes, manifest_offset,
                                manifest_bytes, given)

    def check_sealed(self, job: str, step: int) -> None:
        """Every local rank of ``job`` has sealed ``step`` (else SlotStateError)."""
        self._slots.check_sealed(job, step)

    def mark_restorable(self, job: str, step: int) -> None:
        """The protection layer's verdict: ``step`` is protected on every node."""
        self._slots.mark_restorable(job, step)

    def install(self, job: str, world_size: int, local_ranks: Iterable[int], rank: int,
                slot_bytes: int, record: SlotDesc, fill: Callable[[FileDest], None]) -> None:
        """Put a rebuilt snapshot of ``rank`` in place as its restorable step."""
        self._slots.install(job, world_size, local_ranks, rank, slot_bytes, record, fill)

    def set_restorable(self, job: str, step: int) -> None:
        """Mark ``step`` restorable for the ranks of this node that hold it (after a rebuild)."""
        self._slots.set_restorable(job, step)

    # ----------------------------------------------------------- restores

    def open_for_restore(self, job: str, rank: int, lease: str, step: int | None,
                         client_checks: bool = False) -> OpenSlot:
        """Pin the slot of the restorable step (or of the previous one) for a restore
        (restore_pins.py says how it is checked)."""
        return self._pins.open(job, rank, lease, step, client_checks)

    def release(self, job: str, rank: int, lease: str, step: int,
                corrupt: bool = False) -> None:
        """Unpin a slot opened for restore (CorruptionError: its bytes failed their check)."""
        self._pins.release(job, rank, lease, step, corrupt)

    # ------------------------------------------- the persistent tier's holds

    def hold_for_flush(self, job: str, step: int) -> list[FlushHold]:
        """Hold every local rank's slot of ``step`` against reuse while the tier copies it;
        release with :meth:`release_flush`."""
        return self._holds.hold(job, step)

    def release_flush(self, holds: list[FlushHold]) -> None:
        self._holds.release(holds)

    # ------------------------------------------ the protection layer's reads

    def block_crcs(self, job: str, rank: int, step: int, generation: int) -> list[int] | None:
        """The CRC32C of each ``CRC_BLOCK_BYTES`` block of the slot's data, computed at its
        seal (None: not known here, e.g. a slot adopted after a restart)."""
        return self._reads.block_crcs(job, rank, step, generation)

    def sealed_slot(self, job: str, rank: int, step: int) -> tuple[memoryview, SlotDesc, int]:
        """The bytes and record of ``rank``'s sealed or restorable slot of ``step``, and
        slot_bytes."""
        return self._reads.sealed_slot(job, rank, step)

    def check_slot(self, job: str, rank: int, step: int) -> tuple[str | None, int]:
        """Re-check ``rank``'s slot of ``step`` unpinned: ``(problem, bytes_checked)``, problem
        None when sound, ``SUPERSEDED`` when rewritten meanwhile."""
        return self._reads.check_slot(job, rank, step)

    def slot_generation(self, job: str, rank: int, step: int) -> int | None:
        """The generation of ``rank``'s slot holding ``step`` (None: not held)."""
        return self._reads.slot_generation(job, rank, step)

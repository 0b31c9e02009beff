"""The node's snapshot store: jobs, ranks, arenas and the slot state machine.

Slot states run free -> writing -> sealed -> restorable -> free. A slot is
handed out (``begin``) only if it does not hold the job's restorable step and
is not pinned by a restore in progress, so a sealed snapshot is never written
again until a newer step is restorable. The persistent tier holds a step's
slots too while it copies them out (``hold_for_flush``): a ``begin`` that needs
one of them waits for that copy instead of failing. Every change that must
survive a daemon crash (arenas, seals, the restorable step) is written to a
small meta file per job beside the arenas, replaced atomically; a restarted
daemon re-adopts the arenas from it. This module holds no transport: the agent
(gRPC) and the protection layer call it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import psutil

from shardguard.daemon.base import faults
from shardguard.daemon.storage.arena import Arena
from shardguard.daemon.coding.checksum import CRC_BLOCK_BYTES, crc32c, crc32c_blocks
from shardguard.daemon.base.metrics import Metrics
from shardguard.daemon.errors import (
    ArenaFormatError,
    BudgetExceededError,
    CorruptionError,
    InvalidRequestError,
    LeaseError,
    NotRestorableError,
    RankClaimedError,
    SlotStateError,
    StepOrderError,
    UnknownJobError,
    UnsafePathError,
)
from shardguard.proto import arena as fmt
from shardguard.proto import manifest as mf
from shardguard.proto import safefile
from shardguard.proto.arena import ChecksumAlgo, SlotState
from shardguard.proto.meta import Topology

logger = logging.getLogger(__name__)

JOB_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")
MAX_WORLD = 1 << 20
MAX_MANIFEST_BYTES = 256 << 20
META_VERSION = 1
#: A meta file's temporary as versions before issue 15 named it (after the writing thread).
_LEGACY_TMP = re.compile(r"\.meta\.tmp\d+$")


@dataclass
class SlotRecord:
    state: SlotState = SlotState.FREE
    step: int = -1
    data_bytes: int = 0
    manifest_offset: int = 0
    manifest_bytes: int = 0
    data_crc: int = 0
    manifest_crc: int = 0
    generation: int = 0

    def to_desc(self) -> fmt.SlotDesc:
        algo = ChecksumAlgo.CRC32C if self.state >= SlotState.SEALED else ChecksumAlgo.NONE
        return fmt.SlotDesc(self.state, algo, self.step, self.data_bytes, self.manifest_offset,
                            self.manifest_bytes, self.data_crc, self.manifest_crc,
                            self.generation)


@dataclass
class RankRecord:
    rank: int
    arena: Arena
    slot_bytes: int
    slots: list[SlotRecord]
    lease: str | None = None
    pid: int = 0
    pid_started: float = 0.0
    # Slots opened for restore, and the step each was opened for.
    pinned: dict[int, int] = field(default_factory=dict)
    # Checksums of slots opened for restore, running while the client copies.
    verifying: dict[int, "concurrent.futures.Future[None]"] = field(default_factory=dict)
    # Slots whose bytes failed their checksum: never served again.
    corrupt: set[int] = field(default_factory=set)
    # Slots the persistent tier is copying out (not handed out meanwhile).
    flushing: set[int] = field(default_factory=set)

    def claimed_by_live_process(self) -> bool:
        if self.lease is None or not self.pid:
            return False
        try:
            proc = psutil.Process(self.pid)
            return (abs(proc.create_time() - self.pid_started) < 1e-3
                    and proc.status() != psutil.STATUS_ZOMBIE)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False


@dataclass
class JobRecord:
    job: str
    world_size: int
    local_ranks: tuple[int, ...]
    ranks: dict[int, RankRecord] = field(default_factory=dict)
    restorable_step: int | None = None
    # The restorable step before the current one, while its slots are intact: across
    # nodes the ranks may agree on it (announcements arrive at different times).
    previous_step: int | None = None
    # Multi-node jobs: the node list, this node's number, the code (proto/meta.py).
    topology: Topology | None = None


@dataclass(frozen=True)
class Registration:
    arena_path: str
    arena_bytes: int
    slot_bytes: int
    lease: str
    restorable_step: int | None


@dataclass(frozen=True)
class FlushHold:
    """A slot held for the persistent tier: its bytes stay as ``record`` says until released."""

    rank: int
    slot: int
    view: memoryview
    record: SlotRecord
    rr: RankRecord


@dataclass(frozen=True)
class OpenSlot:
    """A slot opened for restore: where its bytes are, and the checksums they must match."""

    slot: int
    step: int
    data_bytes: int
    manifest_offset: int
    manifest_bytes: int
    data_crc: int
    manifest_crc: int
    #: Restores are checked (``verify_on_restore``).
    check: bool


#: What a check reports when the bytes it read were rewritten meanwhile.
SUPERSEDED = "superseded"
#: Longest a ``begin`` waits for the persistent tier to finish copying out the slot it
#: needs (a memcpy of the slot: far less, unless the node is starved).
FLUSH_HOLD_WAIT_S = 60.0


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
                 on_node_sealed: Callable[[str, int], None] | None = None,
                 metrics: Metrics | None = None) -> None:
        self.shm_dir = shm_dir
        self.prefix = prefix
        self.budget_bytes = budget_bytes
        self.verify_on_restore = verify_on_restore
        self.on_node_sealed = on_node_sealed
        self.on_roll_back: Callable[[str, int], None] | None = None
        # Called (job, step) outside the lock when a seal made ``step`` restorable
        # (jobs whose every rank is on this node; the protection layer reports the others).
        self.on_restorable: Callable[[str, int], None] | None = None
        self.metrics = metrics or Metrics()
        self._verifier = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="sg-verify")
        self._lock = threading.RLock()
        self._released = threading.Condition(self._lock)  # a flush hold was let go
        self._jobs: dict[str, JobRecord] = {}
        # CRC32C of each CRC_BLOCK_BYTES block of a sealed slot's data, by (job, rank) then (step,
        # generation): the protection layer derives its pieces' CRCs from them instead of
        # reading the bytes a second time (memory only; a restarted daemon reads again).
        self._blocks: dict[tuple[str, int], dict[tuple[int, int], list[int]]] = {}

    # ---------------------------------------------------------------- queries

    def used_bytes(self) -> int:
        with self._lock:
            return sum(r.arena.size for j in self._jobs.values() for r in j.ranks.values())

    def jobs(self) -> list[JobRecord]:
        with self._lock:
            return list(self._jobs.values())

    def job(self, job: str) -> JobRecord:
        with self._lock:
            return self._job(job)

    def latest(self, job: str) -> int | None:
        with self._lock:
            return self._job(job).restorable_step

    # ------------------------------------------------------------- life cycle

    def check_register(self, job: str, rank: int, world_size: int, slot_bytes: int, pid: int,
                       local_ranks: Iterable[int], force: bool = False) -> None:
        """Every check :meth:`register` makes, changing nothing (run before a rebuild)."""
        _check_register_args(job, rank, world_size, slot_bytes, local_ranks)
        _process_start(pid)
        with self._lock:
            rec = self._jobs.get(job)
            if rec is not None and rec.world_size != world_size:
                raise InvalidRequestError(
                    f"job {job} holds snapshots of a world of size {rec.world_size}, not "
                    f"{world_size}; drop the job to start it with another world size")
            rr = rec.ranks.get(rank) if rec is not None else None
            if rr is not None and rr.claimed_by_live_process() and rr.pid != pid and not force:
                raise RankClaimedError(
                    f"job {job} rank {rank} is held by live process {rr.pid}")

    def register(self, job: str, rank: int, world_size: int, slot_bytes: int, pid: int,
                 local_ranks: Iterable[int], force: bool = False,
                 topology: Topology | None = None) -> Registration:
        """Claim (job, rank) for process ``pid``; create or grow its arena."""
        local = _check_register_args(job, rank, world_size, slot_bytes, local_ranks)
        slot_bytes = fmt.align_up(slot_bytes)
        started = _process_start(pid)
        with self._lock:
            rec = self._jobs.get(job)
            if rec is not None and rec.world_size != world_size:
                if any(r.claimed_by_live_process() for r in rec.ranks.values()):
                    raise InvalidRequestError(
                        f"job {job} is registered with world size {rec.world_size}, not "
                        f"{world_size}")
                raise InvalidRequestError(
                    f"job {job} holds snapshots of a world of size {rec.world_size}; drop the "
                    f"job to start it with world size {world_size}")
            new_job = rec is None
            if rec is None:
                rec = JobRecord(job, world_size, local)
            rr = rec.ranks.get(rank)
            if rr is not None and rr.claimed_by_live_process() and rr.pid != pid and not force:
                raise RankClaimedError(
                    f"job {job} rank {rank} is held by live process {rr.pid}")
            self._check_budget(rr.arena.size if rr else 0, fmt.arena_bytes(slot_bytes))
            if new_job:
                # Before any arena: a meta file name another user holds refuses the job here.
                self._persist(rec)
            try:
                if rr is None:
                    rr = self._new_rank(rec, rank, slot_bytes)
                elif rr.slot_bytes < slot_bytes:
                    rr = self._grow(rec, rr, slot_bytes)
            except BaseException:
                if new_job:
                    _unlink(self._meta_path(job))
                raise
            rec.local_ranks = local
            rec.topology = topology
            rec.ranks[rank] = rr
            self._jobs[job] = rec
            # A new claim is a new incarnation of the rank: what it was writing is gone.
            for s in rr.slots:
                if s.state == SlotState.WRITING:
                    _free(s)
            rr.pinned.clear()
            rr.lease = secrets.token_hex(16)
            rr.pid, rr.pid_started = pid, started
            self._sync(rec, rr)
            logger.info("registered: world %d, pid %d, arena %s, slot_bytes %d", world_size,
                        pid, rr.arena.path, rr.slot_bytes, extra={"job": job, "rank": rank})
            return Registration(rr.arena.path, rr.arena.size, rr.slot_bytes, rr.lease,
                                rec.restorable_step)

    def unregister(self, job: str, rank: int, lease: str) -> None:
        with self._lock:
            rr = self._claimed(job, rank, lease)
            rr.lease, rr.pid, rr.pid_started = None, 0, 0.0
            rr.pinned.clear()

    def drop(self, job: str) -> tuple[int, int]:
        """Free every arena of ``job``; returns (arenas, bytes) freed."""
        with self._lock:
            rec = self._job(job)
            freed = sum(r.arena.size for r in rec.ranks.values())
            for rr in rec.ranks.values():
                rr.arena.unlink()
            _unlink(self._meta_path(job))
            self._remove_leftovers(f"{self.prefix}.{job}.")  # nothing of the job stays behind
            del self._jobs[job]
            self._blocks = {k: v for k, v in self._blocks.items() if k[0] != job}  # per rank
            self.metrics.forget(job)
            logger.info("dropped: %d arenas, %d bytes", len(rec.ranks), freed,
                        extra={"job": job})
            return len(rec.ranks), freed

    def close(self) -> None:
        """Unmap everything; the files stay for the next daemon to adopt."""
        self._verifier.shutdown(wait=True)
        with self._lock:
            for rec in self._jobs.values():
                for rr in rec.ranks.values():
                    rr.arena.close()
            self._jobs.clear()

    # ---------------------------------------------------------- the snapshot

    def begin(self, job: str, rank: int, lease: str, step: int) -> int:
        """Hand out the slot for ``step`` (free -> writing)."""
        started = time.monotonic()
        deadline, waited = started + FLUSH_HOLD_WAIT_S, False
        with self._lock:
            while True:
                rec = self._job(job)
                rr = self._claimed(job, rank, lease)
                if step < 0:
                    raise InvalidRequestError(f"step {step} is negative")
                if rec.restorable_step is not None and step <= rec.restorable_step:
                    raise StepOrderError(
                        f"job {job} rank {rank}: step {step} is not after the restorable step "
                        f"{rec.restorable_step} (restore it, or drop the job to start over)")
                index = self._writable_slot(rec, rr)
                left = deadline - time.monotonic()
                if index is not None or not rr.flushing or left <= 0:
                    break
                # The persistent tier is copying the slot out (a memcpy): wait for it.
                self._released.wait(left)
                waited = True
            if waited:
                logger.debug("begin waited %.3fs for the persistent tier's copy",
                             time.monotonic() - started,
                             extra={"job": job, "rank": rank, "step": step})
            if index is None:
                raise SlotStateError(
                    f"job {job} rank {rank}: no free slot for step {step} (slots: "
                    f"{[(s.state.name, s.step) for s in rr.slots]}, pinned {sorted(rr.pinned)})")
            # Any other unfinished step of this rank is superseded by the new one.
            for i, s in enumerate(rr.slots):
                if i != index and s.state in (SlotState.WRITING, SlotState.SEALED):
                    _free(s)
            s = rr.slots[index]
            if s.step == rec.previous_step:
                rec.previous_step = None
            s.state, s.step = SlotState.WRITING, step
            s.generation += 1
            s.data_bytes = s.manifest_offset = s.manifest_bytes = 0
            # Persisted, not only mirrored: after a crash the slot must not come back as
            # the sealed step it held before this rewrite began.
            self._sync(rec, rr)
            return index

    def seal(self, job: str, rank: int, lease: str, step: int, slot: int, data_bytes: int,
             manifest_offset: int, manifest_bytes: int) -> int | None:
        """Checksum a written slot and seal it (writing -> sealed).

        Returns the job's restorable step after the seal.
        """
        with self._lock:
            rr = self._claimed(job, rank, lease)
            rec = self._jobs[job]
            s = self._slot_in_state(rr, job, slot, SlotState.WRITING, step)
            _check_extents(rr.slot_bytes, data_bytes, manifest_offset, manifest_bytes)
            view = rr.arena.slot(slot, rr.slot_bytes)
            generation = s.generation
        # Validation and checksums of up to GiBs run without the lock: other ranks seal meanwhile.
        raw_manifest = view[manifest_offset:manifest_offset + manifest_bytes]
        doc = mf.parse(raw_manifest, data_bytes)
        if doc["step"] != step:
            raise mf.ManifestError(f"manifest is for step {doc['step']}, sealed as step {step}")
        manifest_crc = crc32c(raw_manifest)
        data_crc, blocks = crc32c_blocks(view[:data_bytes], CRC_BLOCK_BYTES)
        faults.point("seal", step, rec.topology.node_index if rec.topology else 0)
        with self._lock:
            if rr.slots[slot] is not s or s.generation != generation \
                    or s.state != SlotState.WRITING:
                raise SlotStateError(f"job {job} rank {rank}: slot {slot} changed while sealing")
            s.state = SlotState.SEALED
            s.data_bytes, s.manifest_offset, s.manifest_bytes = \
                data_bytes, manifest_offset, manifest_bytes
            s.data_crc, s.manifest_crc = data_crc, manifest_crc
            held = {(x.step, x.generation) for x in rr.slots}  # the other slot's stay
            mine = self._blocks.get((job, rank), {})
            self._blocks[(job, rank)] = {k: v for k, v in mine.items() if k in held}
            self._blocks[(job, rank)][(step, generation)] = blocks
            node_sealed = all(q in rec.ranks and any(
                x.state == SlotState.SEALED and x.step == step for x in rec.ranks[q].slots)
                for q in rec.local_ranks)
            whole_job_here = len(rec.local_ranks) == rec.world_size
            self.metrics.rank_sealed(job, step, node_sealed)
            decides_here = node_sealed and (whole_job_here or self.on_node_sealed is None)
            if decides_here:
                self._make_restorable(rec, step)
            else:
                self._sync(rec, rr)
            restorable = rec.restorable_step
        if decides_here and restorable == step and self.on_restorable is not None:
            self.on_restorable(job, step)
        logger.debug("sealed slot %d, %d bytes", slot, data_bytes,
                     extra={"job": job, "rank": rank, "step": step})
        if node_sealed and not whole_job_here and self.on_node_sealed is not None:
            self.on_node_sealed(job, step)
        return restorable

    def check_sealed(self, job: str, step: int) -> None:
        """Every local rank of ``job`` has sealed ``step`` (else SlotStateError); changes nothing."""
        with self._lock:
            rec = self._job(job)
            for q in rec.local_ranks:
                rr = rec.ranks.get(q)
                if rr is None or not any(s.state == SlotState.SEALED and s.step == step
                                         for s in rr.slots):
                    raise SlotStateError(f"job {job}: rank {q} has not sealed step {step}")

    def mark_restorable(self, job: str, step: int) -> None:
        """The protection layer's verdict: ``step`` is protected on every node."""
        with self._lock:
            self._make_restorable(self._job(job), step)

    def open_for_restore(self, job: str, rank: int, lease: str, step: int | None,
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
            rec = self._job(job)
            rr = self._claimed(job, rank, lease)
            if rec.restorable_step is None:
                raise NotRestorableError(f"job {job} has no restorable step")
            if step is not None and step != rec.restorable_step:
                self._roll_back(rec, step)
            index = next((i for i, s in enumerate(rr.slots)
                          if s.state == SlotState.RESTORABLE and s.step == rec.restorable_step),
                         None)
            if index is None:
                raise NotRestorableError(
                    f"job {job} rank {rank}: no slot holds restorable step {rec.restorable_step}")
            if index in rr.corrupt:
                raise CorruptionError(f"job {job} rank {rank} step {rec.restorable_step}: "
                                      "the stored bytes failed their checksum")
            s = dataclasses.replace(rr.slots[index])
            rr.pinned[index] = s.step
            if self.verify_on_restore and not client_checks:
                view = rr.arena.slot(index, rr.slot_bytes)
                rr.verifying[index] = self._verifier.submit(self._verify, job, rank, view, s)
        return OpenSlot(index, s.step, s.data_bytes, s.manifest_offset, s.manifest_bytes,
                        s.data_crc, s.manifest_crc, self.verify_on_restore)

    def _roll_back(self, rec: JobRecord, step: int) -> None:
        """Make the previous restorable step the restorable one again, on every local rank."""
        if step != rec.previous_step:
            raise NotRestorableError(
                f"job {rec.job}: step {step} is not restorable (the restorable step is "
                f"{rec.restorable_step})")
        pairs = []
        for rr in rec.ranks.values():
            old = next((s for s in rr.slots if s.state == SlotState.FREE and s.step == step),
                       None)
            cur = next((s for s in rr.slots if s.state == SlotState.RESTORABLE), None)
            if old is None and rr.rank in rec.local_ranks:
                raise NotRestorableError(
                    f"job {rec.job} rank {rr.rank}: step {step} has been overwritten")
            pairs.append((old, cur))
        for old, cur in pairs:
            if old is not None:
                old.state = SlotState.RESTORABLE
            if cur is not None:
                _free(cur)
        logger.warning("rolled back from step %s to step %d, the step every rank agreed on",
                       rec.restorable_step, step, extra={"job": rec.job, "step": step})
        rec.restorable_step, rec.previous_step = step, None
        self._persist(rec)
        for rr in rec.ranks.values():
            self._write_header(rec, rr)
        if self.on_roll_back is not None:
            self.on_roll_back(rec.job, step)

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
            rr = self._claimed(job, rank, lease)
            slots = [i for i, pinned_step in rr.pinned.items() if pinned_step == step]
            checks = [(i, rr.verifying.pop(i, None)) for i in slots]
            if corrupt:
                checks = [(i, check or self._verifier.submit(
                    self._verify, job, rank, rr.arena.slot(i, rr.slot_bytes),
                    dataclasses.replace(rr.slots[i]))) for i, check in checks]
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
        if failure is not None:
            raise failure
        if corrupt:
            logger.warning("the client's check of a restore failed, the stored bytes pass "
                           "theirs: the client reads them again",
                           extra={"job": job, "rank": rank, "step": step})

    def hold_for_flush(self, job: str, step: int) -> list[FlushHold]:
        """Hold every local rank's slot of ``step`` against reuse while the tier copies it.

        The slot may already be free (a newer step is restorable) as long as nothing
        was written over it. Release with :meth:`release_flush`.

        Raises:
            NotRestorableError: some local rank no longer holds ``step``.
        """
        with self._lock:
            rec = self._job(job)
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
                                       dataclasses.replace(rr.slots[index]), rr))
            return holds

    def release_flush(self, holds: list[FlushHold]) -> None:
        with self._lock:
            self._let_go(holds)

    def _let_go(self, holds: list[FlushHold]) -> None:
        for h in holds:
            h.rr.flushing.discard(h.slot)
        self._released.notify_all()

    def block_crcs(self, job: str, rank: int, step: int, generation: int) -> list[int] | None:
        """The CRC32C of each ``CRC_BLOCK_BYTES`` block of the slot's data, computed at its
        seal (None: not known here, e.g. a slot adopted after a restart)."""
        with self._lock:
            return self._blocks.get((job, rank), {}).get((step, generation))

    def sealed_slot(self, job: str, rank: int, step: int) -> tuple[memoryview, SlotRecord, int]:
        """The bytes and record of ``rank``'s sealed or restorable slot of ``step``, and slot_bytes."""
        with self._lock:
            rr = self._job(job).ranks.get(rank)
            if rr is None:
                raise UnknownJobError(f"job {job} has no rank {rank} on this daemon")
            for i, s in enumerate(rr.slots):
                if s.step == step and s.state in (SlotState.SEALED, SlotState.RESTORABLE):
                    return rr.arena.slot(i, rr.slot_bytes), dataclasses.replace(s), rr.slot_bytes
            raise NotRestorableError(f"job {job} rank {rank} holds no sealed step {step}")

    def check_slot(self, job: str, rank: int, step: int) -> tuple[str | None, int]:
        """Re-check the checksums of ``rank``'s slot of ``step`` without pinning it.

        Returns ``(problem, bytes_checked)``; problem is None when the bytes are
        sound, ``SUPERSEDED`` when the slot was rewritten while it was read
        (training went on: not a fault), else what is wrong. Nothing is
        marked corrupt and no slot is held, so training is not disturbed.
        """
        with self._lock:
            rr = self._job(job).ranks.get(rank)
            if rr is None:
                return f"rank {rank} holds nothing on this node", 0
            found = [(i, dataclasses.replace(s)) for i, s in enumerate(rr.slots)
                     if s.step == step and s.state in (SlotState.SEALED, SlotState.RESTORABLE)]
            if not found:
                return f"rank {rank} holds no sealed step {step}", 0
            index, rec = found[0]
            view = rr.arena.slot(index, rr.slot_bytes)
        try:
            self._verify(job, rank, view, rec)
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
            rr = self._job(job).ranks.get(rank)
            for s in rr.slots if rr is not None else ():
                if s.step == step and s.state in (SlotState.SEALED, SlotState.RESTORABLE):
                    return s.generation
        return None

    def install(self, job: str, world_size: int, local_ranks: Iterable[int], rank: int,
                slot_bytes: int, record: SlotRecord, fill: Callable[[memoryview], None]) -> None:
        """Put a rebuilt snapshot of ``rank`` in place as its restorable step.

        ``fill`` writes the slot's bytes; their checksums must match ``record``.
        """
        with self._lock:
            rec = self._jobs.get(job)
            if rec is None:
                rec = JobRecord(job, world_size, tuple(local_ranks))
                self._jobs[job] = rec
            rr = rec.ranks.get(rank)
            if rr is None or rr.slot_bytes < slot_bytes:
                self._check_budget(rr.arena.size if rr else 0, fmt.arena_bytes(slot_bytes))
                if rr is not None:
                    rr.arena.unlink()
                rr = self._new_rank(rec, rank, slot_bytes)
                rec.ranks[rank] = rr
            index = self._writable_slot(rec, rr)
            if index is None:
                raise SlotStateError(f"job {job} rank {rank}: no free slot to rebuild into")
            view = rr.arena.slot(index, rr.slot_bytes)
        fill(view)
        self._verify(job, rank, view, record)
        with self._lock:
            s = rr.slots[index]
            for f in dataclasses.fields(SlotRecord):
                setattr(s, f.name, getattr(record, f.name))
            s.state = SlotState.SEALED
            if rec.restorable_step == record.step:
                # A repair: the rebuilt copy replaces the one that failed its checksum.
                for other in rr.slots:
                    if other is not s and other.step == record.step:
                        _free(other)
                s.state = SlotState.RESTORABLE
                rr.corrupt.clear()
            rec.local_ranks = tuple(sorted(set(rec.local_ranks) | {rank}))
            self._sync(rec, rr)

    def set_restorable(self, job: str, step: int) -> None:
        """Mark ``step`` restorable for the ranks of this node that hold it (after a rebuild)."""
        with self._lock:
            self._make_restorable(self._job(job), step, every_local_rank=False)

    # --------------------------------------------------------------- adoption

    def adopt(self) -> int:
        """Re-adopt the jobs a previous daemon left in shm; returns how many."""
        for path in self._remove_leftovers(self.prefix + "."):
            logger.info("removed %s, a write a previous daemon did not finish", path)
        pattern = os.path.join(self.shm_dir, glob.escape(self.prefix) + ".*.meta")
        adopted = 0
        for meta_path in sorted(glob.glob(pattern)):
            try:
                rec = self._adopt_job(meta_path)
            except Exception as exc:  # noqa: BLE001 - one bad job must not stop the daemon
                logger.error("cannot adopt %s: %s; its arenas are left in place", meta_path, exc)
                continue
            with self._lock:
                self._jobs[rec.job] = rec
            adopted += 1
            logger.info("adopted: ranks %s, restorable step %s", sorted(rec.ranks),
                        rec.restorable_step, extra={"job": rec.job, "step": rec.restorable_step})
        return adopted

    def _adopt_job(self, meta_path: str) -> JobRecord:
        # Only a regular file of this daemon's user, never through a symlink: in a shared
        # shm dir anyone can create a file at the name of a job's meta file.
        meta = json.loads(safefile.read_owned(meta_path))
        if not isinstance(meta, dict) or meta.get("version") != META_VERSION:
            raise ValueError(f"not a version {META_VERSION} meta file")
        job = meta["job"]
        _check_job(job)
        named = os.path.basename(meta_path)[len(self.prefix) + 1:-len(".meta")]
        if job != named:
            raise ValueError(f"the file of job {named!r} describes job {job!r}")
        _check_meta_types(meta)
        rec = JobRecord(job, int(meta["world_size"]), tuple(meta["local_ranks"]),
                        restorable_step=meta["restorable_step"],
                        previous_step=meta.get("previous_step"),
                        topology=Topology.from_doc(meta["topology"]) if meta.get("topology")
                        else None)
        try:
            self._adopt_ranks(rec, meta)
        except BaseException:
            for rr in rec.ranks.values():
                rr.arena.close()
            raise
        return rec

    def _adopt_ranks(self, rec: JobRecord, meta: dict[str, Any]) -> None:
        job = rec.job
        for key, rm in meta["ranks"].items():
            rank = int(key)
            path = os.path.join(self.shm_dir, fmt.arena_name(self.prefix, job, rank))
            try:
                arena, header = Arena.adopt(path)
            except UnsafePathError:
                raise  # a symlink or another user's file: never mapped, never written
            except (OSError, ArenaFormatError) as exc:
                # The header is only a mirror: rebuild it from the meta when the file is sound.
                logger.warning("job=%s rank=%d arena header unusable (%s); rewriting it",
                               job, rank, exc, extra={"job": job, "rank": rank})
                arena = _remap(path, int(rm["slot_bytes"]))
                header = None
            slots = [SlotRecord(SlotState(d["state"]), *[int(d[k]) for k in (
                "step", "data_bytes", "manifest_offset", "manifest_bytes", "data_crc",
                "manifest_crc", "generation")]) for d in rm["slots"]]
            if header is not None and header.slot_bytes != int(rm["slot_bytes"]):
                arena.close()
                raise ArenaFormatError(f"arena {path} slot size disagrees with the meta file")
            for s in slots:
                if s.state == SlotState.WRITING:
                    _free(s)
            rr = RankRecord(rank, arena, int(rm["slot_bytes"]), slots)
            rec.ranks[rank] = rr
            self._write_header(rec, rr)

    # ---------------------------------------------------------------- helpers

    def _job(self, job: str) -> JobRecord:
        _check_job(job)
        rec = self._jobs.get(job)
        if rec is None:
            raise UnknownJobError(f"job {job} is not registered with this daemon")
        return rec

    def _claimed(self, job: str, rank: int, lease: str) -> RankRecord:
        rec = self._job(job)
        rr = rec.ranks.get(rank)
        if rr is None:
            raise UnknownJobError(f"job {job} has no rank {rank} on this daemon")
        if rr.lease is None or not secrets.compare_digest(
                rr.lease.encode(), str(lease).encode("utf-8", "surrogatepass")):
            raise LeaseError(f"job {job} rank {rank}: lease does not match the rank's holder")
        return rr

    def _slot_in_state(self, rr: RankRecord, job: str, slot: int, state: SlotState,
                       step: int) -> SlotRecord:
        if not 0 <= slot < len(rr.slots):
            raise InvalidRequestError(f"slot {slot} out of range [0, {len(rr.slots)})")
        s = rr.slots[slot]
        if s.state != state or s.step != step:
            raise SlotStateError(
                f"job {job} rank {rr.rank}: slot {slot} is {s.state.name} step {s.step}, "
                f"not {state.name} step {step}")
        return s

    def _writable_slot(self, rec: JobRecord, rr: RankRecord) -> int | None:
        for i, s in enumerate(rr.slots):
            if i in rr.pinned or i in rr.flushing:
                continue
            if s.state == SlotState.RESTORABLE and s.step == rec.restorable_step:
                continue
            return i
        return None

    def _make_restorable(self, rec: JobRecord, step: int, every_local_rank: bool = True) -> None:
        if rec.restorable_step is not None and step <= rec.restorable_step:
            return
        for q in rec.local_ranks if every_local_rank else ():
            rr = rec.ranks.get(q)
            if rr is None or not any(s.state == SlotState.SEALED and s.step == step
                                     for s in rr.slots):
                raise SlotStateError(f"job {rec.job}: rank {q} has not sealed step {step}")
        rec.previous_step, rec.restorable_step = rec.restorable_step, step
        for rr in rec.ranks.values():
            rr.corrupt.clear()
            for s in rr.slots:
                if s.step == step and s.state == SlotState.SEALED:
                    s.state = SlotState.RESTORABLE
                elif s.state == SlotState.RESTORABLE and s.step < step:
                    # Free to overwrite, but kept readable until then (see _roll_back).
                    s.state = SlotState.FREE
                elif s.state == SlotState.SEALED and s.step < step:
                    _free(s)
        self._persist(rec)
        for rr in rec.ranks.values():
            self._write_header(rec, rr)
        self.metrics.restorable(rec.job, step)
        logger.debug("step %d restorable", step, extra={"job": rec.job, "step": step})

    def _verify(self, job: str, rank: int, view: memoryview, s: SlotRecord) -> None:
        m = view[s.manifest_offset:s.manifest_offset + s.manifest_bytes]
        if crc32c(m) != s.manifest_crc:
            raise CorruptionError(f"job {job} rank {rank} step {s.step}: manifest checksum fails")
        if crc32c(view[:s.data_bytes]) != s.data_crc:
            raise CorruptionError(f"job {job} rank {rank} step {s.step}: data checksum fails")

    def _check_budget(self, current: int, wanted: int) -> None:
        used = sum(r.arena.size for j in self._jobs.values() for r in j.ranks.values())
        after = used - current + wanted
        if wanted > current and after > self.budget_bytes:
            raise BudgetExceededError(
                f"an arena of {wanted} bytes would take this daemon to {after} bytes, over its "
                f"memory budget of {self.budget_bytes} bytes ({used} in use)")

    def _new_rank(self, rec: JobRecord, rank: int, slot_bytes: int) -> RankRecord:
        path = os.path.join(self.shm_dir, fmt.arena_name(self.prefix, rec.job, rank))
        safefile.remove(path)  # a stale file the meta no longer knows of
        header = fmt.Header(slot_bytes, rank, rec.world_size, rec.job,
                            tuple(fmt.SlotDesc() for _ in range(fmt.NSLOTS)))
        arena = Arena.create(path, header)
        return RankRecord(rank, arena, slot_bytes, [SlotRecord() for _ in range(fmt.NSLOTS)])

    def _grow(self, rec: JobRecord, rr: RankRecord, slot_bytes: int) -> RankRecord:
        """A bigger arena, keeping the restorable slot's bytes in the same slot index."""
        tmp = safefile.temp_path(rr.arena.path)
        header = fmt.Header(slot_bytes, rr.rank, rec.world_size, rec.job,
                            tuple(fmt.SlotDesc() for _ in range(fmt.NSLOTS)))
        arena = Arena.create(tmp, header)
        slots = [SlotRecord() for _ in range(fmt.NSLOTS)]
        try:
            for i, s in enumerate(rr.slots):
                if s.state == SlotState.RESTORABLE:
                    used = s.manifest_offset + s.manifest_bytes
                    arena.slot(i, slot_bytes)[:used] = rr.arena.slot(i, rr.slot_bytes)[:used]
                    slots[i] = dataclasses.replace(s)
            safefile.replace(tmp, rr.arena.path)
        except BaseException:
            arena.unlink()
            raise
        arena.path = rr.arena.path
        rr.arena.close()
        logger.info("grew arena: slot_bytes %d -> %d", rr.slot_bytes, slot_bytes,
                    extra={"job": rec.job, "rank": rr.rank})
        return RankRecord(rr.rank, arena, slot_bytes, slots)

    def _write_header(self, rec: JobRecord, rr: RankRecord) -> None:
        rr.arena.write_header(fmt.Header(rr.slot_bytes, rr.rank, rec.world_size, rec.job,
                                         tuple(s.to_desc() for s in rr.slots)))

    def _sync(self, rec: JobRecord, rr: RankRecord) -> None:
        self._persist(rec)
        self._write_header(rec, rr)

    def _remove_leftovers(self, names: str) -> list[str]:
        """Remove the temporaries of this daemon's user that a write cut short left (ENOSPC,
        a crash) among the files whose names start with ``names``: this version's, and the
        ``<meta>.tmp<thread id>`` of older ones. Returns their paths."""
        removed = safefile.clean_temps(self.shm_dir, names)
        for name in os.listdir(self.shm_dir):
            path = os.path.join(self.shm_dir, name)
            try:
                if name.startswith(names) and _LEGACY_TMP.search(name) \
                        and os.lstat(path).st_uid == os.geteuid():
                    os.unlink(path)
                    removed.append(path)
            except OSError:
                continue  # gone meanwhile, or not ours to remove
        return removed

    def _meta_path(self, job: str) -> str:
        return os.path.join(self.shm_dir, fmt.meta_name(self.prefix, job))

    def _persist(self, rec: JobRecord) -> None:
        """Write the job's meta file atomically (a new file, then renamed over the old one;
        nothing planted at either name is followed, proto/safefile.py)."""
        doc: dict[str, Any] = {
            "version": META_VERSION, "job": rec.job, "world_size": rec.world_size,
            "local_ranks": list(rec.local_ranks), "restorable_step": rec.restorable_step,
            "previous_step": rec.previous_step,
            "topology": rec.topology.to_doc() if rec.topology is not None else None,
            "written": time.time(),
            "ranks": {str(r): {"slot_bytes": rr.slot_bytes,
                               "slots": [_slot_doc(s) for s in rr.slots]}
                      for r, rr in rec.ranks.items()},
        }
        safefile.write_atomic(self._meta_path(rec.job), json.dumps(doc).encode())


def _slot_doc(s: SlotRecord) -> dict[str, int]:
    # A slot being written is not worth remembering: after a crash it is free.
    if s.state == SlotState.WRITING:
        s = SlotRecord(generation=s.generation)
    d = dataclasses.asdict(s)
    d["state"] = int(s.state)
    return d


def _free(s: SlotRecord) -> None:
    s.state, s.step = SlotState.FREE, -1


def _check_register_args(job: str, rank: int, world_size: int, slot_bytes: int,
                         local_ranks: Iterable[int]) -> tuple[int, ...]:
    """Validate a registration's fields; returns the local ranks."""
    _check_job(job)
    local = tuple(local_ranks) or (rank,)
    if not 1 <= world_size <= MAX_WORLD:
        raise InvalidRequestError(f"world_size {world_size} out of range [1, {MAX_WORLD}]")
    if not 0 <= rank < world_size:
        raise InvalidRequestError(f"rank {rank} outside world of size {world_size}")
    if len(set(local)) != len(local) or any(not 0 <= r < world_size for r in local) \
            or rank not in local:
        raise InvalidRequestError(
            f"local_ranks {list(local)} must be distinct ranks of the world and include {rank}")
    if slot_bytes <= 0:
        raise InvalidRequestError("slot_bytes must be > 0")
    return local


def _check_meta_types(meta: dict[str, Any]) -> None:
    """A meta file's fields have the types the store relies on (else ValueError)."""
    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not is_int(meta.get("world_size")) or not 1 <= meta["world_size"] <= MAX_WORLD:
        raise ValueError("world_size is not a world size")
    for key in ("restorable_step", "previous_step"):
        if meta.get(key) is not None and not is_int(meta[key]):
            raise ValueError(f"{key} is not an integer")
    local = meta.get("local_ranks")
    if not isinstance(local, list) or not all(is_int(r) for r in local):
        raise ValueError("local_ranks is not a list of ranks")
    topo = meta.get("topology")
    if topo is not None and not (isinstance(topo, dict) and isinstance(topo.get("nodes"), list)
                                 and is_int(topo.get("node_index"))
                                 and is_int(topo.get("group_size")) and is_int(topo.get("parity"))):
        raise ValueError("topology is malformed")
    if not isinstance(meta.get("ranks"), dict):
        raise ValueError("ranks is not a table")


def _check_job(job: str) -> None:
    if not isinstance(job, str) or not JOB_RE.fullmatch(job):
        raise InvalidRequestError(
            f"job name {job!r} must be 1-64 characters of letters, digits, '_', '-' "
            "and not start with '-'")


def _check_extents(slot_bytes: int, data_bytes: int, manifest_offset: int,
                   manifest_bytes: int) -> None:
    if manifest_offset % fmt.PAGE or manifest_offset < data_bytes:
        raise InvalidRequestError(
            f"manifest_offset {manifest_offset} must be page-aligned and >= data_bytes "
            f"{data_bytes}")
    if not 0 < manifest_bytes <= MAX_MANIFEST_BYTES \
            or manifest_offset + manifest_bytes > slot_bytes:
        raise InvalidRequestError(
            f"manifest [{manifest_offset}, +{manifest_bytes}) does not fit a slot of "
            f"{slot_bytes} bytes")


def _process_start(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        raise InvalidRequestError(f"pid {pid} is not a live process on this node") from None


def _remap(path: str, slot_bytes: int) -> Arena:
    fd = safefile.open_owned(path, os.O_RDWR)
    size = os.fstat(fd).st_size
    if size != fmt.arena_bytes(slot_bytes):
        os.close(fd)
        raise ArenaFormatError(f"arena {path} size {size} does not match the meta file")
    return Arena(path, fd, size)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

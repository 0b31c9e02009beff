"""The slot state machine of each rank, and which step is the job's restorable one (the
store: storage/store.py).

Slot states run free -> writing -> sealed -> restorable -> free. A slot is handed out
(``begin``) only if it does not hold the job's restorable step, is not pinned by a
restore in progress and is not held by the persistent tier (a ``begin`` that needs a
held slot waits for the tier's copy instead of failing), so a sealed snapshot is never
written again until a newer step is restorable. The restorable step before the current
one stays readable until its slot is written over: the ranks may roll back to it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable, Iterable

from shardguard.daemon.base import faults
from shardguard.daemon.base.metrics import Metrics
from shardguard.daemon.coding.dest import FileDest, WrittenCrcs
from shardguard.daemon.errors import (
    InvalidRequestError,
    NotRestorableError,
    SlotStateError,
    StepOrderError,
)
from shardguard.daemon.storage.flush_holds import FLUSH_HOLD_WAIT_S, FlushHolds
from shardguard.daemon.storage.jobs import Jobs
from shardguard.daemon.storage.records import Hooks, JobRecord, RankRecord
from shardguard.daemon.storage.slot_checks import ClientBlocks, SlotChecks, seal_sums, verify
from shardguard.proto import arena as fmt
from shardguard.proto.arena import SlotDesc, SlotState

logger = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 256 << 20


class Slots:
    """The transitions of every rank's slots; each takes the store's lock, checksums run
    outside it.

    Args:
        jobs: the jobs held here.
        holds: the persistent tier's holds, which ``begin`` waits for.
        checks: where a seal's block CRCs are kept.
        hooks: whom a seal or a roll back tells.
        metrics: the daemon's metrics.
        lock: the store's lock.
    """

    def __init__(self, jobs: Jobs, holds: FlushHolds, checks: SlotChecks, hooks: Hooks,
                 metrics: Metrics, lock: threading.RLock) -> None:
        self._jobs = jobs
        self._files = jobs.files
        self._holds = holds
        self._checks = checks
        self._hooks = hooks
        self._metrics = metrics
        self._lock = lock

    # ------------------------------------------------------- the snapshot

    def begin(self, job: str, rank: int, lease: str, step: int) -> int:
        """Hand out the slot for ``step`` (free -> writing)."""
        started = time.monotonic()
        deadline, waited = started + FLUSH_HOLD_WAIT_S, False
        with self._lock:
            arena = self._jobs.claimed(job, rank, lease).arena
        arena.ensure_allocated()  # a rebuilt arena's second slot, if nothing did it yet
        arena.start_preparing()  # and faulted in, if no restore started it
        with self._lock:
            while True:
                rec = self._jobs.get(job)
                rr = self._jobs.claimed(job, rank, lease)
                if step < 0:
                    raise InvalidRequestError(f"step {step} is negative")
                if rec.restorable_step is not None and step <= rec.restorable_step:
                    raise StepOrderError(
                        f"job {job} rank {rank}: step {step} is not after the restorable step "
                        f"{rec.restorable_step} (restore it, or drop the job to start over)")
                index = _writable_slot(rec, rr)
                left = deadline - time.monotonic()
                if index is not None or not rr.flushing or left <= 0:
                    break
                # The persistent tier is copying the slot out (a memcpy): wait for it.
                self._holds.wait_released(left)
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
                    rr.slots[i] = s.freed()
            s = rr.slots[index]
            if s.step == rec.previous_step:
                rec.previous_step = None
            rr.slots[index] = SlotDesc(SlotState.WRITING, step, generation=s.generation + 1)
            # Persisted, not only mirrored: after a crash the slot must not come back as
            # the sealed step it held before this rewrite began.
            self._files.sync(rec, rr)
            return index

    def seal(self, job: str, rank: int, lease: str, step: int, slot: int, data_bytes: int,
             manifest_offset: int, manifest_bytes: int,
             given: ClientBlocks | None = None) -> int | None:
        """Checksum a written slot (``given``: its data's block CRCs, as the client made
        them) and seal it (writing -> sealed).

        Returns the job's restorable step after the seal.
        """
        with self._lock:
            rr = self._jobs.claimed(job, rank, lease)
            rec = self._jobs.get(job)
            s = _slot_in_state(rr, job, slot, SlotState.WRITING, step)
            _check_extents(rr.slot_bytes, data_bytes, manifest_offset, manifest_bytes)
            view = rr.arena.slot(slot, rr.slot_bytes)
        # Validation and checksums of up to GiBs run without the lock: other ranks seal meanwhile.
        sums = seal_sums(view, step, data_bytes, manifest_offset, manifest_bytes, given)
        faults.point("seal", step, rec.topology.node_index if rec.topology else 0)
        with self._lock:
            # Records are replaced, never changed: any change since is a new object.
            if rr.slots[slot] is not s:
                raise SlotStateError(f"job {job} rank {rank}: slot {slot} changed while sealing")
            rr.slots[slot] = dataclasses.replace(
                s, state=SlotState.SEALED, data_bytes=data_bytes,
                manifest_offset=manifest_offset, manifest_bytes=manifest_bytes,
                data_crc=sums.data_crc, manifest_crc=sums.manifest_crc)
            self._checks.keep_blocks(job, rank, rr.slots, step, s.generation, sums.blocks)
            node_sealed = all(_has_sealed(rec.ranks.get(q), step) for q in rec.local_ranks)
            whole_job_here = len(rec.local_ranks) == rec.world_size
            self._metrics.rank_sealed(job, step, node_sealed)
            decides_here = node_sealed and (whole_job_here or self._hooks.on_node_sealed is None)
            if decides_here:
                self._make_restorable(rec, step)
            else:
                self._files.sync(rec, rr)
            restorable = rec.restorable_step
        if decides_here and restorable == step and self._hooks.on_restorable is not None:
            self._hooks.on_restorable(job, step)
        logger.debug("sealed slot %d, %d bytes", slot, data_bytes,
                     extra={"job": job, "rank": rank, "step": step})
        if node_sealed and not whole_job_here and self._hooks.on_node_sealed is not None:
            self._hooks.on_node_sealed(job, step)
        return restorable

    def install(self, job: str, world_size: int, local_ranks: Iterable[int], rank: int,
                slot_bytes: int, record: SlotDesc, fill: Callable[[FileDest], None]) -> None:
        """Put a rebuilt snapshot of ``rank`` in place as its restorable step.

        ``fill`` writes the slot's bytes, with ``pwrite`` (coding/dest.py: fresh pages
        written through this daemon's mapping would each be cleared and mapped first);
        their checksums must match ``record``: the data's is combined from the CRCs each
        write was made with (read back only where those do not tile it), the manifest's
        read. No room for a page is a NoSpaceError from the write. A new
        arena's other slot is allocated and faulted in later, on a thread of its own
        (:meth:`Arena.prepare`), once the trainer has restored (the restore's release)
        or at its first Begin: not while ``fill`` runs, where clearing its fresh pages
        (1 GiB: ~1.2 CPU-s, perf, 2026-12-05) competed with the fetches and the decoding
        for 2 cores, nor beside the restore, whose own fresh memory it then slowed as
        much. The trainer's Register names it lazy meanwhile
        (``RegisterReply.lazy_slots``): the trainer maps it without faulting it in, so
        the clearing is not moved into its mapping. Without room for that slot the
        rebuild still succeeds; the trainer's first Begin then meets the NoSpaceError.
        """
        with self._lock:
            rec, rr = self._jobs.for_rebuild(job, world_size, local_ranks, rank, slot_bytes)
            index = _writable_slot(rec, rr)
            if index is None:
                raise SlotStateError(f"job {job} rank {rank}: no free slot to rebuild into")
            view = rr.arena.slot(index, rr.slot_bytes)
        fresh = not rr.arena.allocated  # a new arena: only its header is allocated
        if index > 0:
            rr.arena.ensure_allocated()
        base = fmt.slot_offset(index, rr.slot_bytes)
        # The slot past its snapshot is allocated now, the snapshot's own pages as they
        # are written: the whole slot, as in a trainer's arena.
        used = record.manifest_offset + record.manifest_bytes
        rr.arena.allocate(base + used, rr.slot_bytes - used)
        written = WrittenCrcs(marks=(base + record.data_bytes,))
        with rr.arena.slot_dest(index, rr.slot_bytes, written) as dest:
            fill(dest)
        verify(job, rank, view, record, written.crc(base, base + record.data_bytes))
        with self._lock:
            state = SlotState.SEALED
            if rec.restorable_step == record.step:
                # A repair: the rebuilt copy replaces the one that failed its checksum.
                for i, other in enumerate(rr.slots):
                    if i != index and other.step == record.step:
                        rr.slots[i] = other.freed()
                state = SlotState.RESTORABLE
                rr.corrupt.clear()
            rr.slots[index] = dataclasses.replace(record, state=state)
            rec.local_ranks = tuple(sorted(set(rec.local_ranks) | {rank}))
            self._files.sync(rec, rr)
        if fresh:
            rr.arena.prepare((i for i in range(fmt.NSLOTS) if i != index), rr.slot_bytes,
                             lambda exc: logger.warning(
                                 "allocating the rebuilt arena's other slot failed: %s", exc,
                                 extra={"job": job, "rank": rank}))

    # ------------------------------------------------- the restorable step

    def check_sealed(self, job: str, step: int) -> None:
        """Every local rank of ``job`` has sealed ``step`` (else SlotStateError); changes
        nothing."""
        with self._lock:
            rec = self._jobs.get(job)
            for q in rec.local_ranks:
                if not _has_sealed(rec.ranks.get(q), step):
                    raise SlotStateError(f"job {job}: rank {q} has not sealed step {step}")

    def mark_restorable(self, job: str, step: int) -> None:
        """The protection layer's verdict: ``step`` is protected on every node."""
        with self._lock:
            self._make_restorable(self._jobs.get(job), step)

    def set_restorable(self, job: str, step: int) -> None:
        """Mark ``step`` restorable for the ranks of this node that hold it (after a rebuild)."""
        with self._lock:
            self._make_restorable(self._jobs.get(job), step, every_local_rank=False)

    def roll_back(self, rec: JobRecord, step: int) -> None:
        """Make the previous restorable step the restorable one again, on every local rank
        (the caller holds the lock)."""
        if step != rec.previous_step:
            raise NotRestorableError(
                f"job {rec.job}: step {step} is not restorable (the restorable step is "
                f"{rec.restorable_step})")
        pairs = []
        for rr in rec.ranks.values():
            old = next((i for i, s in enumerate(rr.slots)
                        if s.state == SlotState.FREE and s.step == step), None)
            cur = next((i for i, s in enumerate(rr.slots) if s.state == SlotState.RESTORABLE),
                       None)
            if old is None and rr.rank in rec.local_ranks:
                raise NotRestorableError(
                    f"job {rec.job} rank {rr.rank}: step {step} has been overwritten")
            pairs.append((rr, old, cur))
        for rr, old, cur in pairs:
            if old is not None:
                rr.slots[old] = dataclasses.replace(rr.slots[old], state=SlotState.RESTORABLE)
            if cur is not None:
                rr.slots[cur] = rr.slots[cur].freed()
        logger.warning("rolled back from step %s to step %d, the step every rank agreed on",
                       rec.restorable_step, step, extra={"job": rec.job, "step": step})
        rec.restorable_step, rec.previous_step = step, None
        self._files.sync_all(rec)
        if self._hooks.on_roll_back is not None:
            self._hooks.on_roll_back(rec.job, step)

    def _make_restorable(self, rec: JobRecord, step: int, every_local_rank: bool = True) -> None:
        if rec.restorable_step is not None and step <= rec.restorable_step:
            return
        for q in rec.local_ranks if every_local_rank else ():
            if not _has_sealed(rec.ranks.get(q), step):
                raise SlotStateError(f"job {rec.job}: rank {q} has not sealed step {step}")
        rec.previous_step, rec.restorable_step = rec.restorable_step, step
        for rr in rec.ranks.values():
            rr.corrupt.clear()
            for i, s in enumerate(rr.slots):
                if s.step == step and s.state == SlotState.SEALED:
                    rr.slots[i] = dataclasses.replace(s, state=SlotState.RESTORABLE)
                elif s.state == SlotState.RESTORABLE and s.step < step:
                    # Free to overwrite, but kept readable until then (see roll_back).
                    rr.slots[i] = dataclasses.replace(s, state=SlotState.FREE)
                elif s.state == SlotState.SEALED and s.step < step:
                    rr.slots[i] = s.freed()
        self._files.sync_all(rec)
        self._metrics.restorable(rec.job, step)
        logger.debug("step %d restorable", step, extra={"job": rec.job, "step": step})


def _has_sealed(rr: RankRecord | None, step: int) -> bool:
    return rr is not None and any(s.state == SlotState.SEALED and s.step == step
                                  for s in rr.slots)


def _writable_slot(rec: JobRecord, rr: RankRecord) -> int | None:
    for i, s in enumerate(rr.slots):
        if i in rr.pinned or i in rr.flushing:
            continue
        if s.state == SlotState.RESTORABLE and s.step == rec.restorable_step:
            continue
        return i
    return None


def _slot_in_state(rr: RankRecord, job: str, slot: int, state: SlotState,
                   step: int) -> SlotDesc:
    if not 0 <= slot < len(rr.slots):
        raise InvalidRequestError(f"slot {slot} out of range [0, {len(rr.slots)})")
    s = rr.slots[slot]
    if s.state != state or s.step != step:
        raise SlotStateError(
            f"job {job} rank {rr.rank}: slot {slot} is {s.state.name} step {s.step}, "
            f"not {state.name} step {step}")
    return s


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

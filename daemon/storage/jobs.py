"""The jobs and ranks a daemon holds: registration and leases, the memory budget, drop,
and adoption of what a previous daemon left (the store: storage/store.py)."""

from __future__ import annotations

import logging
import secrets
import threading
from typing import Iterable

import psutil

from shardguard.daemon.base.metrics import Metrics
from shardguard.daemon.errors import (
    BudgetExceededError,
    InvalidRequestError,
    LeaseError,
    RankClaimedError,
    UnknownJobError,
)
from shardguard.daemon.storage.records import (
    MAX_WORLD,
    JobRecord,
    RankRecord,
    Registration,
    check_job,
)
from shardguard.daemon.storage.shm_files import ShmFiles
from shardguard.daemon.storage.slot_checks import SlotChecks
from shardguard.proto import arena as fmt
from shardguard.proto.arena import SlotState
from shardguard.proto.meta import Topology

logger = logging.getLogger(__name__)


class Jobs:
    """The table of jobs, by name. Every method takes ``lock``, the store's one lock.

    Args:
        files: the daemon's files in shm.
        budget_bytes: most arena bytes this daemon may hold.
        checks: the block CRCs to forget with a dropped job.
        metrics: the daemon's metrics (a dropped job's go too).
        lock: the store's lock.
    """

    def __init__(self, files: ShmFiles, budget_bytes: int, checks: SlotChecks,
                 metrics: Metrics, lock: threading.RLock) -> None:
        self.files = files
        self.budget_bytes = budget_bytes
        self._checks = checks
        self._metrics = metrics
        self._lock = lock
        self._jobs: dict[str, JobRecord] = {}

    # ------------------------------------------------------------- queries

    def used_bytes(self) -> int:
        with self._lock:
            return sum(r.arena.size for j in self._jobs.values() for r in j.ranks.values())

    def all(self) -> list[JobRecord]:
        with self._lock:
            return list(self._jobs.values())

    def get(self, job: str) -> JobRecord:
        """Raises UnknownJobError unless ``job`` is held here."""
        check_job(job)
        with self._lock:
            rec = self._jobs.get(job)
        if rec is None:
            raise UnknownJobError(f"job {job} is not registered with this daemon")
        return rec

    def claimed(self, job: str, rank: int, lease: str) -> RankRecord:
        """``rank`` of ``job``, if ``lease`` is the one its holder was given (else LeaseError)."""
        rr = self.get(job).ranks.get(rank)
        if rr is None:
            raise UnknownJobError(f"job {job} has no rank {rank} on this daemon")
        if rr.lease is None or not secrets.compare_digest(
                rr.lease.encode(), str(lease).encode("utf-8", "surrogatepass")):
            raise LeaseError(f"job {job} rank {rank}: lease does not match the rank's holder")
        return rr

    # ---------------------------------------------------------- life cycle

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
                 topology: Topology | None = None, epoch: int = 0) -> Registration:
        """Claim (job, rank) for process ``pid``; create or grow its arena. ``epoch``: the
        job's launch (multi-node jobs; the record keeps the highest it was given)."""
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
                self.files.persist(rec)
            try:
                if rr is None:
                    rr = self.files.new_rank(rec, rank, slot_bytes)
                elif rr.slot_bytes < slot_bytes:
                    rr = self.files.grow(rec, rr, slot_bytes)
            except BaseException:
                if new_job:
                    self.files.remove_meta(job)
                raise
            rec.local_ranks = local
            rec.topology = topology
            rec.epoch = max(rec.epoch, epoch)
            rec.ranks[rank] = rr
            self._jobs[job] = rec
            # A new claim is a new incarnation of the rank: what it was writing is gone.
            for i, s in enumerate(rr.slots):
                if s.state == SlotState.WRITING:
                    rr.slots[i] = s.freed()
            rr.pinned.clear()
            rr.lease = secrets.token_hex(16)
            rr.pid, rr.pid_started = pid, started
            self.files.sync(rec, rr)
            logger.info("registered: world %d, pid %d, arena %s, slot_bytes %d", world_size,
                        pid, rr.arena.path, rr.slot_bytes, extra={"job": job, "rank": rank})
            return Registration(rr.arena.path, rr.arena.size, rr.slot_bytes, rr.lease,
                                rec.restorable_step, rr.arena.preparing())

    def unregister(self, job: str, rank: int, lease: str) -> None:
        with self._lock:
            rr = self.claimed(job, rank, lease)
            rr.lease, rr.pid, rr.pid_started = None, 0, 0.0
            rr.pinned.clear()

    def for_rebuild(self, job: str, world_size: int, local_ranks: Iterable[int], rank: int,
                    slot_bytes: int) -> tuple[JobRecord, RankRecord]:
        """The job and rank a rebuilt snapshot goes into, created (or the rank's arena
        replaced by one of ``slot_bytes``) as needed."""
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
                # Only the header is allocated now: the rebuilt bytes allocate the first
                # slot's pages as they are written (coding/dest.py; allocating 1 GiB
                # first held this lock and the rank's fetches back ~0.45 s on 2 cores),
                # the rest is allocated once they are in place (Slots.install), else at
                # the next Begin, which allocates whatever is still a hole.
                rr = self.files.new_rank(rec, rank, slot_bytes, slots_now=0)
                rec.ranks[rank] = rr
            return rec, rr

    def drop(self, job: str) -> tuple[int, int]:
        """Free every arena of ``job``; returns (arenas, bytes) freed."""
        with self._lock:
            rec = self.get(job)
            freed = sum(r.arena.size for r in rec.ranks.values())
            for rr in rec.ranks.values():
                rr.arena.unlink()
            self.files.remove_meta(job)
            # Nothing of the job stays behind.
            self.files.remove_leftovers(f"{self.files.prefix}.{job}.")
            del self._jobs[job]
            self._checks.forget(job)
            self._metrics.forget(job)
            logger.info("dropped: %d arenas, %d bytes", len(rec.ranks), freed,
                        extra={"job": job})
            return len(rec.ranks), freed

    def close(self) -> None:
        """Unmap everything; the files stay for the next daemon to adopt."""
        with self._lock:
            for rec in self._jobs.values():
                for rr in rec.ranks.values():
                    rr.arena.close()
            self._jobs.clear()

    def adopt(self) -> int:
        """Re-adopt the jobs a previous daemon left in shm; returns how many."""
        for path in self.files.remove_leftovers(self.files.prefix + "."):
            logger.info("removed %s, a write a previous daemon did not finish", path)
        adopted = 0
        for meta_path in self.files.meta_paths():
            try:
                rec = self.files.load(meta_path)
            except Exception as exc:  # noqa: BLE001 - one bad job must not stop the daemon
                logger.error("cannot adopt %s: %s; its arenas are left in place", meta_path, exc)
                continue
            with self._lock:
                self._jobs[rec.job] = rec
            adopted += 1
            logger.info("adopted: ranks %s, restorable step %s", sorted(rec.ranks),
                        rec.restorable_step, extra={"job": rec.job, "step": rec.restorable_step})
        return adopted

    def _check_budget(self, current: int, wanted: int) -> None:
        used = self.used_bytes()
        after = used - current + wanted
        if wanted > current and after > self.budget_bytes:
            raise BudgetExceededError(
                f"an arena of {wanted} bytes would take this daemon to {after} bytes, over its "
                f"memory budget of {self.budget_bytes} bytes ({used} in use)")


def _check_register_args(job: str, rank: int, world_size: int, slot_bytes: int,
                         local_ranks: Iterable[int]) -> tuple[int, ...]:
    """Validate a registration's fields; returns the local ranks."""
    check_job(job)
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


def _process_start(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        raise InvalidRequestError(f"pid {pid} is not a live process on this node") from None

"""The store's records: what it knows of each job, rank and slot, and the typed values its
parts hand each other and the layers above (the store: storage/store.py).

Every record here is read and changed only under the store's one lock.
"""

from __future__ import annotations

import concurrent.futures
import re
from dataclasses import dataclass, field
from typing import Callable

import psutil

from shardguard.daemon.errors import InvalidRequestError
from shardguard.daemon.storage.arena import Arena
from shardguard.proto.arena import SlotDesc
from shardguard.proto.meta import Topology

JOB_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")
MAX_WORLD = 1 << 20


@dataclass
class RankRecord:
    rank: int
    arena: Arena
    slot_bytes: int
    # Replaced whole (they are frozen) on every change; a change never shows through a
    # record handed out before it.
    slots: list[SlotDesc]
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
    # Multi-node jobs: the launch the ranks registered in (RegisterRequest.epoch); this
    # node's pieces carry it (roles/source.py). Only ever grows.
    epoch: int = 0


@dataclass(frozen=True)
class Registration:
    arena_path: str
    arena_bytes: int
    slot_bytes: int
    lease: str
    restorable_step: int | None
    #: Slots the daemon is still allocating and faulting in (a just rebuilt arena's).
    lazy_slots: tuple[int, ...] = ()


@dataclass(frozen=True)
class FlushHold:
    """A slot held for the persistent tier: its bytes stay as ``record`` says until released."""

    rank: int
    slot: int
    view: memoryview
    record: SlotDesc
    rr: RankRecord


@dataclass(frozen=True)
class OpenSlot:
    """A slot opened for restore: which one, its record (where its bytes are, and the
    checksums they must match), and whether restores are checked (``verify_on_restore``)."""

    slot: int
    record: SlotDesc
    check: bool


@dataclass
class Hooks:
    """What the layers above are told (None: nobody).

    Attributes:
        on_node_sealed: (job, step), outside the lock, when every local rank sealed
            ``step``; the protection layer then makes it restorable. None means this
            node is the whole job: the step is restorable at once.
        on_roll_back: (job, step), under the lock, when a restore rolled the job back
            to ``step``, its previous restorable step.
        on_restorable: (job, step), outside the lock, when a seal made ``step``
            restorable (jobs whose every rank is on this node; the protection layer
            reports the others).
    """

    on_node_sealed: Callable[[str, int], None] | None = None
    on_roll_back: Callable[[str, int], None] | None = None
    on_restorable: Callable[[str, int], None] | None = None


def check_job(job: str) -> None:
    if not isinstance(job, str) or not JOB_RE.fullmatch(job):
        raise InvalidRequestError(
            f"job name {job!r} must be 1-64 characters of letters, digits, '_', '-' "
            "and not start with '-'")

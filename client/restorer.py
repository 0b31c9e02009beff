"""``restore()``: the one step every rank uses, read back from the node's memory, or from the
persistent tier when memory holds nothing (or only older steps); one outcome on every rank.

What is read from memory is checked against the checksums the slot was sealed with as it
is read: copied chunk by chunk, each chunk checksummed while it is in cache (the slot is
read once; proto/parallel_copy.py), or, without copies (``copy=False``), checked whole before the
tensors that map it are returned.
"""

from __future__ import annotations

import logging
import mmap
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from shardguard.client import tier
from shardguard.client._faults import fault_point
from shardguard.client.agreement import TIER_FALLBACK, Agreement, failure_code
from shardguard.client.arena_map import ArenaMap
from shardguard.client.session import Session
from shardguard.proto import arena as fmt
from shardguard.proto import hostmem
from shardguard.proto import manifest as mf
from shardguard.proto.crc32c import crc32c
from shardguard.proto.errors import CorruptionError, NotRestorableError, ShardguardError
from shardguard.proto.state_layout import rebuild

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mapped:
    """A restore without copies: its step's slot stays pinned while pages of it may still
    show through the private mapping its tensors live in."""

    step: int
    mapping: "weakref.ref[mmap.mmap]"
    #: The slot's data in the arena, and its seal's CRC32C (None: restores unchecked).
    base: int
    data_bytes: int
    data_crc: int | None


class Restorer:
    """A rank's restores, through its session and agreeing on its group.

    Args:
        tier_dir: the persistent tier's directory ("": none).
    """

    def __init__(self, session: Session, agreement: Agreement, tier_dir: str) -> None:
        self.session = session
        self.agreement = agreement
        self.tier_dir = tier_dir
        #: The last agreed step comes from the persistent tier (the same on every rank).
        self.from_tier = False
        #: The restore without copies whose slot is still pinned (see :meth:`settle`).
        self.mapped: Mapped | None = None

    def agreed_step(self, wanted: int | None) -> int:
        """The step every rank uses: ``wanted``, or the oldest of the ranks' daemons'
        restorable steps (-1: none), so that a step announced to some nodes and not yet
        to others is not chosen; an error on any rank is raised on every rank.

        With a persistent tier, its step (the oldest the ranks see) is used instead when
        memory holds nothing (whole-job loss, too many nodes lost) or only older steps;
        :attr:`from_tier` then says so, on every rank.
        """
        reg = self.session.reg
        self.agreement.reduce_max([0])  # every rank has drained its seals before anyone asks
        step, code, error = -1, 0, None
        try:
            step = wanted if wanted is not None and not self.tier_dir else self.session.latest()
        except ShardguardError as exc:
            error, code = exc, failure_code(exc)
        flushed = tier.latest(self.tier_dir, reg.job, reg.rank, reg.world_size) \
            if self.tier_dir else -1
        worst, neg_oldest, neg_flushed = self.agreement.reduce_max([code, -step, -flushed])
        flushed = -neg_flushed
        self.from_tier = flushed >= 0 and wanted in (None, flushed) and (
            worst in TIER_FALLBACK or (not worst and -neg_oldest < flushed))
        if self.from_tier:
            if worst:
                logger.warning("job=%s rank=%d: memory holds no restorable step (%s); using "
                               "step %d of the persistent tier", reg.job, reg.rank,
                               error or "on another rank", flushed)
            return flushed
        if worst:
            # The same class on every rank; the rank that failed says why.
            self.agreement.raise_failure(
                worst, error, lambda why: f"job {reg.job}: {why}",
                otherwise="another rank could not find the restorable step", own=True)
        return -neg_oldest if wanted is None else wanted

    def restore(self, wanted: int | None, into: Any, map_location: Any,
                allow_pickle: bool, copy: bool = True) -> tuple[int, Any]:
        """The agreed step and its state, or the same error on every rank (see
        ``Client.restore``)."""
        reg = self.session.reg
        self.settle()
        agreed = self.agreed_step(wanted)
        if agreed < 0:
            raise NotRestorableError(f"job {reg.job} has no restorable step")
        state: Any = None
        error: BaseException | None = None
        for _ in range(1 if self.from_tier else 2):
            try:
                state = (self._from_tier(agreed, into, map_location, allow_pickle)
                         if self.from_tier else
                         self._from_memory(agreed, into, map_location, allow_pickle, copy))
                error = None
                break
            except CorruptionError as exc:
                # The bytes failed their checksum while we copied them: what we read is
                # dropped; a daemon that can repair from parity does so on the next open.
                error = exc
            except (ShardguardError, ValueError, TypeError, RuntimeError) as exc:
                error = exc
                break
        # Every rank raises the same class: the most specific failure on any rank.
        worst = self.agreement.reduce_max([failure_code(error) if error is not None else 0])[0]
        if worst:
            self.agreement.raise_failure(
                worst, error, lambda why: f"job {reg.job} rank {reg.rank}: restore of step "
                f"{agreed} failed ({why})", otherwise="failed on another rank")
        logger.info("job=%s rank=%d: resumed from step %d (%s)", reg.job, reg.rank, agreed,
                    "persistent tier" if self.from_tier else "memory")
        return agreed, state

    def _from_memory(self, step: int, into: Any, map_location: Any, allow_pickle: bool,
                     copy: bool) -> Any:
        reply = self.session.open_for_restore(step)
        kept, corrupt = False, False
        try:
            m = self.session.arena
            assert m is not None
            base = m.slot_base(reply.slot)
            doc = _manifest(m, base, reply)
            fault_point("mid-restore", step, self.session.reg.rank)
            data_crc = reply.data_crc if reply.check else None
            device_for = device_resolver(map_location)
            if copy or not reply.data_bytes:
                return rebuild(doc, m.u8, m.arr, base, into, allow_pickle, device_for,
                               data_crc=data_crc)
            # Checked through the arena's own mapping, whose page tables are filled (the
            # private one's would cost twice the CRC to fill); both see the same pages.
            if data_crc is not None and crc32c(m.arr[base:base + reply.data_bytes]) != data_crc:
                raise CorruptionError(f"the data of step {step} fails its checksum")
            mapping = hostmem.map_private(m.path, base, fmt.align_up(reply.data_bytes))
            state = rebuild(doc, torch.frombuffer(mapping, dtype=torch.uint8),
                            np.frombuffer(mapping, dtype=np.uint8), 0, None, allow_pickle,
                            device_for, copy=False)
            self.mapped = Mapped(step, weakref.ref(mapping), base, reply.data_bytes, data_crc)
            kept = True
            return state
        except CorruptionError:
            corrupt = True  # the daemon checks the slot itself, and repairs it from parity
            raise
        finally:
            if not kept:
                self.session.release(step, corrupt)

    def settle(self) -> None:
        """End a restore without copies: the pages of its mapping the trainer has not
        written are copied into the process, so nothing of the slot shows through any
        more, and the slot is unpinned. Called before anything may write the slot again:
        the rank's next snapshot, restore and close.

        The slot is checked once more first (nothing writes a pinned slot): bytes that
        changed in the node's memory since the restore's check showed through pages the
        trainer had not written, and may now be in its state. That is logged as an error
        and the daemon told (it re-checks the slot and marks it corrupt).
        """
        mapped, self.mapped = self.mapped, None
        if mapped is None:
            return
        reg, started = self.session.reg, time.monotonic()
        mm, m, corrupt = mapped.mapping(), self.session.arena, False
        if mm is not None:  # some tensor still lives in it
            if mapped.data_crc is not None and m is not None and crc32c(
                    m.arr[mapped.base:mapped.base + mapped.data_bytes]) != mapped.data_crc:
                corrupt = True
                logger.error("job=%s rank=%d: step %d, restored without copies, changed in "
                             "this node's memory after its check: tensors that still map it "
                             "may hold the changed bytes (restore again)", reg.job, reg.rank,
                             mapped.step)
            hostmem.make_private(mm)
            logger.info("job=%s rank=%d: the restore of step %d without copies now owns its "
                        "pages (%d bytes, %.3fs)", reg.job, reg.rank, mapped.step, len(mm),
                        time.monotonic() - started)
        try:
            self.session.release(mapped.step, corrupt)
        except ShardguardError as exc:  # the daemon restarted (the pin went), or corrupt
            logger.warning("job=%s rank=%d: releasing step %d restored without copies: %s",
                           reg.job, reg.rank, mapped.step, exc)

    def _from_tier(self, step: int, into: Any, map_location: Any, allow_pickle: bool) -> Any:
        reg = self.session.reg
        logger.info("job=%s rank=%d: restoring step %d from the persistent tier in %s",
                    reg.job, reg.rank, step, self.tier_dir)
        return tier.restore(self.tier_dir, reg.job, step, reg.rank, reg.world_size, into,
                            allow_pickle, device_resolver(map_location))


def _manifest(m: ArenaMap, base: int, reply: Any) -> dict[str, Any]:
    """The manifest of the slot at ``base``, checked against its seal's CRC32C first."""
    at = base + reply.manifest_offset
    raw = m.arr[at:at + reply.manifest_bytes]
    if reply.check and crc32c(raw) != reply.manifest_crc:
        raise CorruptionError(f"the manifest of step {reply.step} fails its checksum")
    return mf.parse(raw, reply.data_bytes)


def device_resolver(map_location: Any) -> Callable[[str], torch.device]:
    """Where a restored tensor goes: ``map_location``, else where it was if that device
    exists here, else the CPU."""
    if map_location is not None:
        fixed = torch.device(map_location)
        return lambda _: fixed

    def resolve(dev: str) -> torch.device:
        d = torch.device(dev)
        if d.type == "cuda" and (not torch.cuda.is_available()
                                 or (d.index or 0) >= torch.cuda.device_count()):
            return torch.device("cpu")
        return d

    return resolve

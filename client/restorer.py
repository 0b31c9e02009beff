"""``restore()``: the one step every rank uses, read back from the node's memory, or from the
persistent tier when memory holds nothing (or only older steps); one outcome on every rank.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from shardguard.client import tier
from shardguard.client._faults import fault_point
from shardguard.client.agreement import TIER_FALLBACK, Agreement, failure_code
from shardguard.client.session import Session
from shardguard.proto import manifest as mf
from shardguard.proto.errors import CorruptionError, NotRestorableError, ShardguardError
from shardguard.proto.state_layout import rebuild

logger = logging.getLogger(__name__)


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
                allow_pickle: bool) -> tuple[int, Any]:
        """The agreed step and its state, or the same error on every rank (see
        ``Client.restore``)."""
        reg = self.session.reg
        agreed = self.agreed_step(wanted)
        if agreed < 0:
            raise NotRestorableError(f"job {reg.job} has no restorable step")
        state: Any = None
        error: BaseException | None = None
        for _ in range(1 if self.from_tier else 2):
            try:
                state = (self._from_tier(agreed, into, map_location, allow_pickle)
                         if self.from_tier else
                         self._from_memory(agreed, into, map_location, allow_pickle))
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

    def _from_memory(self, step: int, into: Any, map_location: Any, allow_pickle: bool) -> Any:
        reply = self.session.open_for_restore(step)
        try:
            m = self.session.arena
            assert m is not None
            base = m.slot_base(reply.slot)
            mo = base + reply.manifest_offset
            doc = mf.parse(m.arr[mo:mo + reply.manifest_bytes], reply.data_bytes)
            fault_point("mid-restore", step, self.session.reg.rank)
            return rebuild(doc, m.u8, m.arr, base, into, allow_pickle,
                           device_resolver(map_location))
        finally:
            self.session.release(step)

    def _from_tier(self, step: int, into: Any, map_location: Any, allow_pickle: bool) -> Any:
        reg = self.session.reg
        logger.info("job=%s rank=%d: restoring step %d from the persistent tier in %s",
                    reg.job, reg.rank, step, self.tier_dir)
        return tier.restore(self.tier_dir, reg.job, step, reg.rank, reg.world_size, into,
                            allow_pickle, device_resolver(map_location))


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

"""Where a rank's newest snapshot stands (in flight, sealed, restorable, failed, given up),
hence the :class:`Verdict` the rank brings to the take/skip agreement, the warnings
when protection stalls, and the last snapshot when it was skipped (taken later by
``wait()`` and ``close()``, so that the final step is protected)."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from shardguard.client.agreement import Agreement, Verdict
from shardguard.client.handle import SnapshotHandle
from shardguard.client.session import Session
from shardguard.proto import arena as fmt
from shardguard.proto.errors import DaemonUnavailableError, LeaseError, ShardguardError

logger = logging.getLogger(__name__)

# Consecutive skipped snapshots after which the client warns that protection stalled.
SKIP_WARNING = 50
#: A sealed step not restorable after this long is given up (its protection was lost
#: with a daemon that crashed mid-step), so that the next snapshots are taken again.
#: ``SHARDGUARD_PROTECT_TIMEOUT_S`` overrides it.
PROTECT_TIMEOUT_S = 60.0


class Progress:
    """A rank's newest snapshot, as the next one needs to know it."""

    def __init__(self, session: Session, protect_timeout_s: float) -> None:
        self.session = session
        self.protect_timeout_s = protect_timeout_s
        self.last: SnapshotHandle | None = None
        #: Snapshots skipped in a row.
        self.skips = 0
        #: The last snapshot, when it was skipped: ``(step, state, allow_pickle)``.
        #: Forgotten at the next snapshot and when the optimizer steps (the tensors it
        #: names change then).
        self.pending: tuple[int, Any, bool] | None = None

    def verdict(self) -> tuple[Verdict, BaseException | None]:
        """What this rank can do now; a daemon that restarted is registered with again."""
        h = self.last
        if h is not None and not h.done():
            return Verdict.BUSY, None
        if self.session.lost:
            try:
                arena = self.session.arena
                self.session.register(arena.slot_bytes if arena else fmt.PAGE)
            except (DaemonUnavailableError, LeaseError):
                return Verdict.BUSY, None  # the daemon is restarting: skip, try again next step
            except ShardguardError as exc:
                return Verdict.ERROR, exc
        if h is not None and h.settled:
            return Verdict.READY, None
        if h is not None and not self.is_restorable(h.step):
            if h.pending_for() > self.protect_timeout_s:
                h.give_up()
                logger.warning("job=%s rank=%d: step %d sealed but not restorable after %.0fs "
                               "(%s); taking new snapshots", self.session.reg.job,
                               self.session.reg.rank, h.step, self.protect_timeout_s,
                               self.session.stall() or "a daemon lost it?")
                return Verdict.READY, None
            return Verdict.PENDING, None
        return Verdict.READY, None

    def previous_settled(self) -> bool:
        """The newest snapshot failed or was given up here."""
        return self.last is not None and self.last.settled

    def is_restorable(self, step: int) -> bool:
        assert self.session.arena is not None
        return self.session.arena.is_restorable(step)

    def skipped(self) -> None:
        """Count a skipped snapshot; warn, less and less often, while they go on."""
        self.skips += 1
        if self.skips % SKIP_WARNING == 0 and self.skips // SKIP_WARNING in (1, 2, 4, 8, 16, 32):
            # The daemon names the cause when it knows it (clock skew, a port that
            # does not answer, mismatched config, a link too slow for the step rate).
            why = self.session.stall() or "is a node or its daemon down?"
            logger.warning(
                "job=%s rank=%d: %d snapshots skipped in a row (step %s not yet restorable "
                "everywhere): %s", self.session.reg.job, self.session.reg.rank, self.skips,
                self.last.step if self.last else None, why)

    def taken(self) -> int:
        """A snapshot is taken: how many were skipped before it."""
        skipped, self.skips = self.skips, 0
        return skipped

    def settle(self, deadline: float) -> str | None:
        """Wait until this rank may take a snapshot; None, or why it cannot soon."""
        next_look = 0.0
        while self.verdict()[0] in (Verdict.BUSY, Verdict.PENDING):
            now = time.monotonic()
            if now > deadline:
                return "the step before it was not protected in time"
            if self.session.lost:
                return "the node's daemon does not answer"
            if now >= next_look:
                next_look = now + 0.5
                stall = self.session.stall()
                if stall:
                    return stall
            time.sleep(0.005)
        return None

    def take_pending(self, agreement: Agreement, snapshot: Callable[..., Any],
                     timeout: float | None) -> None:
        """Take the skipped last snapshot (with ``snapshot``, the client's) once the step
        in flight has settled here.

        Each rank first waits until its own previous step is sealed and restorable,
        so that the agreement inside ``snapshot()`` finds every rank ready; a rank
        that was still behind makes everyone skip once more, and the loop agrees
        again. Protection that cannot settle (the daemon unreachable, a stall its
        daemon names, ``protect_timeout_s`` or ``timeout`` passed on any rank) gives
        the last snapshot up on every rank, with a warning: every round is one
        agreement on every rank, so the ranks leave the loop together.
        """
        limit = self.protect_timeout_s if timeout is None else min(timeout,
                                                                  self.protect_timeout_s)
        deadline = time.monotonic() + limit
        while self.pending is not None:
            step, state, pickle_ok = self.pending
            why = self.settle(deadline)
            if agreement.anyone(why is not None):
                self.pending = None
                logger.warning("job=%s rank=%d: the last snapshot (step %d) was skipped and "
                               "cannot be taken now: %s", self.session.reg.job,
                               self.session.reg.rank, step,
                               why or "protection did not settle on another rank")
                return
            snapshot(step, state, allow_pickle=pickle_ok)

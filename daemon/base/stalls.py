"""Why a job's protection is stalled on this node, in words an operator can act on.

A step that never becomes restorable shows to the trainer only as skipped
snapshots. Every place that sees the reason records it here, once, with the
node and what was seen; a restorable step clears it. ``status``, ``verify``,
``doctor``, the trainer's skip warning and the metric
``shardguard_protection_stalled{job,cause}`` all read it from here.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass

from shardguard.proto.errors import AuthenticationError, ConfigError, PeerUnavailableError

logger = logging.getLogger(__name__)


class Cause(str, enum.Enum):
    CLOCK_SKEW = "clock_skew"              # peer tokens outside the window: clocks disagree
    AUTH_FAILED = "auth_failed"            # peer tokens refused otherwise: secrets differ
    PEER_UNREACHABLE = "peer_unreachable"  # a peer's control port does not answer
    DATA_UNREACHABLE = "data_unreachable"  # a peer's data port takes or delivers no bytes
    CONFIG_MISMATCH = "config_mismatch"    # nodes disagree on the job's code or node list
    TOO_SLOW = "too_slow"                  # bytes flow, slower than the trainer snapshots
    NO_SPACE = "no_space"                  # the shm directory is full


@dataclass(frozen=True)
class Stall:
    cause: Cause
    detail: str
    since: float  # time.time() of the first sighting


def cause_of_error(exc: BaseException) -> Cause:
    """The cause a peer failure points at (by its class and message)."""
    text = str(exc)
    if isinstance(exc, AuthenticationError) or "AuthenticationError" in text:
        return Cause.CLOCK_SKEW if "clocks disagree" in text else Cause.AUTH_FAILED
    if isinstance(exc, ConfigError):
        return Cause.CONFIG_MISMATCH
    if isinstance(exc, OSError) and getattr(exc, "errno", None) == 28:
        return Cause.NO_SPACE
    if isinstance(exc, PeerUnavailableError) and ("took no data" in text
                                                 or "data port" in text):
        return Cause.DATA_UNREACHABLE
    return Cause.PEER_UNREACHABLE


class Stalls:
    """The current stall of each job on this node (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_job: dict[str, Stall] = {}

    def record(self, job: str, cause: Cause, detail: str) -> None:
        with self._lock:
            old = self._by_job.get(job)
            if old is not None and old.cause == cause and old.detail == detail:
                return
            self._by_job[job] = Stall(cause, detail, old.since if old and old.cause == cause
                                      else time.time())
        logger.warning("protection stalled (%s): %s", cause.value, detail, extra={"job": job})

    def record_error(self, job: str, exc: BaseException, what: str) -> Cause:
        cause = cause_of_error(exc)
        self.record(job, cause, f"{what}: {exc}")
        return cause

    def clear(self, job: str, cause: Cause | None = None) -> None:
        """Protection works again (a step became restorable), or ``cause`` is gone.

        Without ``cause``, ``too_slow`` stays: a slow link still protects steps, and it is
        cleared only when a transfer is fast again (transport/delivery.py)."""
        with self._lock:
            old = self._by_job.get(job)
            gone = old is not None and (old.cause == cause if cause is not None
                                        else old.cause != Cause.TOO_SLOW)
            if gone:
                del self._by_job[job]
        if gone and old is not None:
            logger.info("protection no longer stalled (%s)", old.cause.value,
                        extra={"job": job})

    def get(self, job: str) -> Stall | None:
        with self._lock:
            return self._by_job.get(job)

    def items(self) -> list[tuple[str, Stall]]:
        with self._lock:
            return list(self._by_job.items())

    def forget(self, job: str) -> None:
        with self._lock:
            self._by_job.pop(job, None)

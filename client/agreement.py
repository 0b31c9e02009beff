"""What the ranks agree on, each time in one collective over the gloo control group: whether
every rank takes a snapshot or every rank skips it, and which failure every rank raises
when a restore fails somewhere (with the first failing rank's reason).

Without a group (a world of one, or ranks a test drives as threads) a rank agrees with
itself.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, NoReturn

import torch
import torch.distributed as dist

from shardguard.proto.errors import (
    InsufficientPiecesError,
    NotRestorableError,
    RestoreError,
    ShardguardError,
)


class Verdict(enum.Enum):
    """What one rank can do about the next snapshot."""

    #: Its newest snapshot is restorable, failed or given up (or there is none).
    READY = enum.auto()
    #: Its newest snapshot is sealed and not yet restorable.
    PENDING = enum.auto()
    #: A copy or a seal is in flight, or its daemon is restarting.
    BUSY = enum.auto()
    #: It cannot snapshot this state (the error is raised on it; the others refuse too).
    ERROR = enum.auto()


class Decision(enum.Enum):
    """What every rank does with a snapshot."""

    TAKE = enum.auto()
    SKIP = enum.auto()
    REFUSE = enum.auto()


#: Restore failures by precedence (a higher one wins when ranks fail differently).
RESTORE_FAILURES: tuple[type[ShardguardError], ...] = (
    RestoreError, NotRestorableError, InsufficientPiecesError)

#: Failures that mean "memory holds nothing to restore": the persistent tier answers instead.
TIER_FALLBACK = (RESTORE_FAILURES.index(NotRestorableError) + 1,
                 RESTORE_FAILURES.index(InsufficientPiecesError) + 1)


def failure_code(exc: BaseException) -> int:
    """1-based index of the most specific class in RESTORE_FAILURES that ``exc`` is, else 1."""
    return max((i for i, cls in enumerate(RESTORE_FAILURES, 1) if isinstance(exc, cls)),
               default=1)


def all_gather(obj: Any, group: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a group)."""
    if group is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def group_rank(group: Any) -> int:
    return dist.get_rank(group) if group is not None else 0


def error_words(error: BaseException | None) -> str | None:
    """An error as a rank tells the others (None: no error)."""
    return None if error is None else f"{type(error).__name__}: {error}"


def raise_any(errors: list[str | None], what: str, mine: BaseException | None) -> None:
    """Raise RestoreError on every rank when any rank failed (``errors``: every rank's
    :func:`error_words`, gathered), naming them all."""
    failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
    if failed:
        raise RestoreError(f"{what} ({'; '.join(failed)})") from mine


class Agreement:
    """A rank's side of the agreements on ``group`` (None: alone)."""

    def __init__(self, group: Any, rank: int) -> None:
        self.group = group
        self.rank = rank

    def reduce_max(self, values: list[int]) -> list[int]:
        """The largest of every rank's ``values``, position by position."""
        if self.group is None:
            return values
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return [int(v) for v in t.tolist()]

    def anyone(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank."""
        return bool(self.reduce_max([int(flag)])[0])

    def decide(self, verdict: Verdict, previous_settled: bool) -> Decision:
        """Take if nobody is busy and the previous step is settled everywhere: restorable,
        or failed or given up on some rank (then every rank takes the next one)."""
        busy, pending, settled, error = self.reduce_max([
            int(verdict is Verdict.BUSY), int(verdict is Verdict.PENDING),
            int(previous_settled), int(verdict is Verdict.ERROR)])
        if error:
            return Decision.REFUSE
        if busy or (pending and not settled):
            return Decision.SKIP
        return Decision.TAKE

    def raise_failure(self, worst: int, error: BaseException | None,
                      message: Callable[[str], str], *, otherwise: str,
                      own: bool = False) -> NoReturn:
        """Raise the agreed failure ``RESTORE_FAILURES[worst - 1]`` on every rank, with the
        first failing rank's reason (``otherwise`` when none gave one); with ``own``, a rank
        whose error is of that very class raises it as it is.

        Every rank gathers the reason first (a collective: none may skip it).
        """
        cls = RESTORE_FAILURES[worst - 1]
        why = self.first_reason(error) or otherwise
        if own and error is not None and type(error) is cls:
            raise error
        raise cls(message(why)) from error

    def first_reason(self, error: BaseException | None) -> str:
        """The first failing rank's error in words, on every rank (collective: only on a
        failure path that every rank takes, after an agreement that something failed)."""
        mine = error_words(error) or ""
        if self.group is None:
            return mine
        try:
            everyone = all_gather(mine, self.group)
        except Exception:  # noqa: BLE001 - a rank that raised first may have left already:
            return mine    # the class is agreed, only the words of another rank are lost
        for rank, text in enumerate(everyone):
            if text:
                return text if rank == self.rank else f"rank {rank}: {text}"
        return ""

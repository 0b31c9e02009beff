"""Named fault-injection points for tests: a process SIGKILLs itself at a chosen instant.

Enabled only by ``SHARDGUARD_TEST_FAULT=point@step`` (optionally restricted to
one rank with ``SHARDGUARD_TEST_FAULT_RANK``); without it :func:`fault_point` is
a dictionary lookup. Points: ``before-copy``, ``mid-copy``, ``before-seal``,
``after-seal``, ``between-steps``, ``mid-restore``.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "SHARDGUARD_TEST_FAULT"
FAULT_RANK_ENV = "SHARDGUARD_TEST_FAULT_RANK"


def _parse() -> tuple[str, int] | None:
    spec = os.environ.get(FAULT_ENV, "")
    if "@" not in spec:
        return None
    point, step = spec.rsplit("@", 1)
    return point, int(step)


_FAULT = _parse()


def fault_point(point: str, step: int, rank: int) -> None:
    """SIGKILL this process at the first ``point`` reached at a step >= the configured one
    (a step the ranks skip together never reaches the copy's points)."""
    if _FAULT is None or _FAULT[0] != point or step < _FAULT[1]:
        return
    only = os.environ.get(FAULT_RANK_ENV)
    if only is not None and int(only) != rank:
        return
    os.kill(os.getpid(), signal.SIGKILL)

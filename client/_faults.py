"""The trainer's named fault-injection points (``shardguard.proto.faults``): a rank SIGKILLs
itself at a chosen instant.

Enabled only by ``SHARDGUARD_TEST_FAULT=point@step`` (optionally restricted to one
rank with ``SHARDGUARD_TEST_FAULT_RANK``), read when the client is imported; without
it a point costs one attribute test. A step the ranks skip together never reaches the
copy's points.
"""

from __future__ import annotations

from shardguard.proto import faults

FAULT_ENV = "SHARDGUARD_TEST_FAULT"
FAULT_RANK_ENV = "SHARDGUARD_TEST_FAULT_RANK"
POINTS = ("before-snapshot", "before-copy", "mid-copy", "before-seal", "after-seal",
          "mid-restore")

_ARMED = faults.Faults.from_env(FAULT_ENV, points=POINTS, who_env=FAULT_RANK_ENV)


def fault_point(point: str, step: int, rank: int) -> None:
    """SIGKILL this process at the first ``point`` reached at a step >= the armed one."""
    _ARMED.point(point, step, rank)

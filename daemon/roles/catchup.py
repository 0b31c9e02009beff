"""Catching up: a node (re)registering a job brings itself to the job's newest restorable step,
and a slot whose bytes failed their checksum is repaired from its stripes.

A failed catch-up is kept (per job) and raised by every restore on this node, on
every rank, until a later registration catches up; it is also named as the job's
stall cause (except "nothing restorable", which is not a stall).
"""

from __future__ import annotations

import logging
from typing import Callable

from shardguard.daemon.base import faults
from shardguard.daemon.base.stalls import Stalls
from shardguard.daemon.errors import NotRestorableError, ShardguardError
from shardguard.daemon.roles.rebuild import Rebuilder
from shardguard.daemon.roles.state import ProtectionState
from shardguard.daemon.storage.stepmeta import StepMetas
from shardguard.daemon.storage.store import Store
from shardguard.proto.meta import Topology

logger = logging.getLogger(__name__)


class CatchUp:
    """Rebuilds on register (a restart after a loss) and repairs corrupt slots."""

    def __init__(self, store: Store, state: ProtectionState, metas: StepMetas, stalls: Stalls,
                 rebuilder: Callable[[Topology], Rebuilder]) -> None:
        self.store, self.state, self.metas, self.stalls = store, state, metas, stalls
        self._rebuilder = rebuilder

    def sync(self, job: str, topo: Topology, world_size: int, local_ranks: list[int]) -> None:
        """Bring this node up to the job's newest restorable step.

        Asks the job's other nodes for their newest restorable step; if one is newer
        than what this node holds, this node's ranks get that step from where it
        lives: their own slots if present, else the node holding them, else decoded
        from ``k`` surviving pieces of each stripe.
        """
        self.state.set_failure(job, None)
        try:
            faults.point("sync", 0, topo.node_index)
            self._rebuilder(topo).run(job, world_size, local_ranks)
        except ShardguardError as exc:
            logger.error("rebuild failed: %s", exc, extra={"job": job, "node": topo.node_index})
            self.state.set_failure(job, exc)
            if not isinstance(exc, NotRestorableError):
                self.stalls.record_error(job, exc, "catching up with the job's other nodes")
        else:
            self.stalls.clear(job)  # caught up: an earlier catch-up's stall is gone

    def repair(self, job: str, rank: int) -> None:
        """Rebuild ``rank``'s restorable snapshot from its stripes (its own bytes failed
        their checksum)."""
        meta, rec = self.metas.get(job), self.store.job(job)
        if meta is None or rec.topology is None:
            raise NotRestorableError(f"job {job}: no step metadata to repair from")
        self._rebuilder(rec.topology).repair(job, meta, rank, rec.world_size,
                                             list(rec.local_ranks))
        logger.warning("corrupt snapshot repaired from parity", extra={
            "job": job, "rank": rank, "step": meta.step, "node": rec.topology.node_index})

    def failure(self, job: str) -> ShardguardError | None:
        return self.state.failure(job)

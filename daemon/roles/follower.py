"""Every node's side of "step N is restorable": keep its group's metadata of the step, mark
the step restorable, release what older steps held.

Checked before anything is written: the job is held here, the metadata is a step's
metadata for this job and step with a code placement accepts, and every local rank
sealed the step. Then the metadata is kept (with which node of the step this daemon
holds the pieces of: its own number as its group's leader listed it), the store
marks the step restorable, the job's stall is cleared, and the parity, metadata and
in-flight state of older steps are released (the previous step's metadata stays
while its slots do: ranks may still agree on it). Observers (the persistent tier)
are told last.
"""

from __future__ import annotations

import logging
from typing import Callable

from shardguard.daemon.base.stalls import Stalls
from shardguard.daemon.coding import placement
from shardguard.daemon.errors import InvalidRequestError, ShardguardError, StepOrderError
from shardguard.daemon.roles.state import ProtectionState
from shardguard.daemon.storage.pieces import PieceFiles
from shardguard.daemon.storage.stepmeta import StepMetas
from shardguard.daemon.storage.store import Store
from shardguard.proto.meta import StepMeta

logger = logging.getLogger(__name__)

#: Told after a step became restorable here: (job, step, meta).
OnRestorable = Callable[[str, int, StepMeta], None]


class Follower:
    """Makes announced steps restorable on this node."""

    def __init__(self, store: Store, state: ProtectionState, metas: StepMetas,
                 pieces: PieceFiles, stalls: Stalls) -> None:
        self.store, self.state, self.metas, self.pieces = store, state, metas, pieces
        self.stalls = stalls
        self.on_restorable: OnRestorable | None = None

    def announce(self, job: str, step: int, meta: StepMeta) -> None:
        rec = self.store.job(job)
        if meta.job != job or meta.step != step:
            raise InvalidRequestError(f"job {job} step {step}: metadata of job {meta.job} "
                                      f"step {meta.step}")
        try:
            grp = placement.placement_of(meta.code).groups[meta.group]
        except IndexError:
            raise InvalidRequestError(f"job {job} step {step}: step metadata of group "
                                      f"{meta.group}, which the code has not") from None
        except ShardguardError as exc:
            raise InvalidRequestError(f"job {job} step {step}: step metadata has an "
                                      f"impossible code: {exc}") from None
        if rec.restorable_step is not None and step <= rec.restorable_step:
            if step == rec.restorable_step:
                return  # announced again (a retry): nothing to do
            raise StepOrderError(f"job {job}: step {step} is older than the restorable step "
                                 f"{rec.restorable_step}")
        if set(meta.members) != set(grp.nodes):
            raise InvalidRequestError(f"job {job} step {step}: group {meta.group}'s metadata "
                                      f"lists nodes {sorted(meta.members)}, not {list(grp.nodes)}")
        self.store.check_sealed(job, step)
        self.metas.save(meta, self._own_index(job, meta))
        self.store.mark_restorable(job, step)
        self.stalls.clear(job)
        previous = self.store.job(job).previous_step
        self.pieces.release_before(job, step)
        self.metas.release_before(job, step if previous is None else previous)
        self.state.release_before(job, step)
        logger.debug("restorable on every node", extra={"job": job, "step": step})
        if self.on_restorable is not None:
            self.on_restorable(job, step, meta)

    def _own_index(self, job: str, meta: StepMeta) -> int | None:
        """This daemon's number among ``meta``'s members (by its current address), if there."""
        topo = self.store.job(job).topology
        if topo is None:
            return None
        return next((n for n, a in meta.members.items() if a == topo.me), None)

"""Freeing a job: on this node (its arenas, parity, step metadata, protection state) and on
every node of its node list (``shardguard drop``)."""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Callable

from shardguard.daemon.base.stalls import Stalls
from shardguard.daemon.errors import UnknownJobError
from shardguard.daemon.roles.state import ProtectionState
from shardguard.daemon.storage.pieces import PieceFiles
from shardguard.daemon.storage.stepmeta import StepMetas
from shardguard.daemon.storage.store import Store
from shardguard.daemon.transport.peer_client import PeerClients
from shardguard.proto import peer_pb2 as ppb

logger = logging.getLogger(__name__)


class Dropper:
    """Frees a job here, or everywhere."""

    def __init__(self, store: Store, state: ProtectionState, metas: StepMetas,
                 pieces: PieceFiles, stalls: Stalls, peers: PeerClients | None,
                 pool: concurrent.futures.Executor, timeout_s: float) -> None:
        self.store, self.state, self.metas, self.pieces = store, state, metas, pieces
        self.stalls, self.peers, self.pool, self.timeout_s = stalls, peers, pool, timeout_s
        #: Told before a job is dropped here (the persistent tier stops its flushes).
        self.on_drop: Callable[[str], None] | None = None

    def drop(self, job: str) -> tuple[int, int]:
        """Free a job's memory on this node; returns (arenas, bytes) freed."""
        if self.on_drop is not None:
            self.on_drop(job)
        arenas, freed = self.store.drop(job)
        self.pieces.drop(job)
        self.metas.release_before(job, 1 << 62)
        self.metas.forget(job)
        self.state.drop(job)
        self.stalls.forget(job)
        return arenas, freed

    def drop_everywhere(self, job: str) -> tuple[int, int, int, list[str]]:
        """Free a job on this node and on every other node of its node list.

        Returns (arenas, bytes, nodes that freed it, control addresses that did not answer).
        """
        try:
            topo = self.store.job(job).topology
        except UnknownJobError:
            topo = None
        others = [c for i, (c, _) in enumerate(topo.nodes) if i != topo.node_index] \
            if topo is not None and self.peers is not None else []
        futs = {c: self.pool.submit(self.peers.stub(c).DropJob,  # type: ignore[union-attr]
                                    ppb.DropJobRequest(job=job), timeout=self.timeout_s)
                for c in others}
        arenas, freed = self.drop(job)
        nodes, unreachable = 1, []
        for control, fut in futs.items():
            try:
                r = fut.result()
                arenas, freed, nodes = arenas + r.arenas_freed, freed + r.bytes_freed, nodes + 1
            except UnknownJobError:
                nodes += 1  # nothing of the job there (already dropped, or a fresh node)
            except Exception as exc:  # noqa: BLE001 - reported to the caller, not fatal
                logger.warning("drop on %s failed: %s", control, exc, extra={"job": job})
                unreachable.append(control)
        return arenas, freed, nodes, unreachable

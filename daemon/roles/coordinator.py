"""The coordinator role (node 0 of the job's node list) and how reports reach it.

Encoders report each stripe they encoded (its pieces' places and CRCs, its sources'
layouts), parity holders each forwarded piece they stored. When every stripe of every
group and every forwarded parity piece is in, the step is protected: the coordinator
builds its :class:`~shardguard.proto.meta.StepMeta` and announces it to every node
(peer ``Announce``; to itself directly), which makes it restorable there
(roles/follower.py). A node that misses the announcement learns the step when it
catches up (roles/rebuild.py). The persistent tier hooks in from above: ``claim``
decides at completion whether this step is flushed (the claim travels with the
announcement), ``on_flushed`` takes the nodes' flush reports.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Callable

from shardguard.daemon import faults
from shardguard.daemon.coding import placement
from shardguard.daemon.errors import InvalidRequestError
from shardguard.daemon.roles import checks
from shardguard.daemon.roles.state import Collected, ProtectionState
from shardguard.daemon.storage.store import Store
from shardguard.daemon.transport.peer_client import PeerClients
from shardguard.proto import peer_pb2 as ppb
from shardguard.proto.meta import (
    FlushedReport,
    NodeLayout,
    ParityReport,
    Report,
    StepMeta,
    StripeMeta,
    StripeReport,
    Topology,
    encode_report,
)

logger = logging.getLogger(__name__)

#: The tier's claim: (job, step, nodes, world) -> a token naming the flush, or None.
Claim = Callable[[str, int, int, int], "str | None"]
#: The tier's report handler: (job, step, node, report).
OnFlushed = Callable[[str, int, int, FlushedReport], None]
#: Announce locally: (job, step, meta).
Announce = Callable[[str, int, StepMeta], None]


class Coordinator:
    """Collects a step's reports and announces it when complete (on node 0)."""

    def __init__(self, store: Store, state: ProtectionState, peers: PeerClients,
                 pool: concurrent.futures.Executor, timeout_s: float) -> None:
        self.store, self.state, self.peers = store, state, peers
        self.pool, self.timeout_s = pool, timeout_s
        self.announce_here: Announce | None = None  # wired to the follower by the server
        self.claim: Claim | None = None
        self.on_flushed: OnFlushed | None = None

    def report(self, job: str, step: int, node: int, report: Report) -> None:
        """Take one report; announce the step when it completes it."""
        topo = checks.topology_of(self.store, job)
        if topo.node_index != 0:
            raise InvalidRequestError(f"this daemon does not coordinate job {job}")
        if isinstance(report, FlushedReport):
            if self.on_flushed is not None:
                self.on_flushed(job, step, node, report)
            return
        checks.group_of(topo, report.group, report.stripe,
                        report.index if isinstance(report, ParityReport) else 0)
        pl = placement.placement_of(topo)
        st = self.state.job(job)
        with self.state.lock:
            col = st.collected.setdefault(step, Collected())
            where = (report.group, report.stripe)
            if isinstance(report, StripeReport):
                col.stripes[where] = report
            else:
                col.parity.add((where, report.index))
            complete = (len(col.stripes) == pl.num_nodes
                        and len(col.parity) == pl.num_nodes * (topo.parity - 1)
                        and not col.announced)
            if complete:
                col.announced = True
        if complete:
            meta = _step_meta(job, step, topo, col)
            if self.claim is not None:
                # Every node flushes the steps the coordinator claims: the claim travels
                # with the announcement.
                token = self.claim(job, step, len(topo.nodes), self.store.job(job).world_size)
                meta = StepMeta(meta.job, meta.step, meta.topology, meta.layouts,
                                meta.stripes, token or "")
            self.pool.submit(self._announce_all, job, step, topo, meta)

    def _announce_all(self, job: str, step: int, topo: Topology, meta: StepMeta) -> None:
        raw = meta.encode()
        futs = []
        for i, (control, _) in enumerate(topo.nodes):
            if i == topo.node_index:
                assert self.announce_here is not None
                futs.append(self.pool.submit(self.announce_here, job, step, meta))
            else:
                futs.append(self.pool.submit(
                    self.peers.stub(control).Announce,
                    ppb.AnnounceRequest(job=job, step=step, meta=raw), timeout=self.timeout_s))
            if len(futs) == 1 and len(topo.nodes) > 1:
                # Test fault point: announced to one node, not yet to the others.
                concurrent.futures.wait(futs)
                faults.point("announce", step, topo.node_index)
        for f in futs:
            try:
                f.result()
            except Exception as exc:  # noqa: BLE001 - a dead node learns it on restart
                logger.warning("announce failed: %s", exc, extra={"job": job, "step": step})
        st = self.state.job(job)
        with self.state.lock:
            for s in [s for s in st.collected if s <= step]:
                del st.collected[s]


def _step_meta(job: str, step: int, topo: Topology, col: Collected) -> StepMeta:
    layouts: dict[int, NodeLayout] = {}
    for rep in col.stripes.values():
        layouts.update(rep.layouts)
    return StepMeta(job, step, topo, layouts,
                    {k: StripeMeta(r.plen, dict(r.pieces)) for k, r in col.stripes.items()})


class Reporter:
    """Sends a report to the job's coordinator: node 0, directly when that is this node."""

    def __init__(self, coordinator: Coordinator, peers: PeerClients, timeout_s: float) -> None:
        self.coordinator, self.peers, self.timeout_s = coordinator, peers, timeout_s

    def send(self, job: str, step: int, topo: Topology, report: Report) -> None:
        if topo.node_index == 0:
            self.coordinator.report(job, step, 0, report)
            return
        self.peers.stub(topo.nodes[0][0]).Report(ppb.ReportRequest(
            job=job, step=step, node=topo.node_index, report=encode_report(report)),
            timeout=self.timeout_s)

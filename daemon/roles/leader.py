"""A group's leader (its first node) and how reports reach it.

Encoders report each stripe they encoded (its pieces' places and CRCs, its sources'
layouts), parity holders each forwarded piece they stored, to the leader of their
group. When the group's ``g`` stripes and ``g·(m−1)`` forwarded pieces are in, the
leader builds the group's :class:`~shardguard.proto.meta.StepMeta` (its members,
layouts and stripes: the group's size, not the job's) and tells the root (node 0)
that the group stored the step: a few bytes. When the root has heard from every
group it commits the step to the leaders (roles/root.py); each leader then announces
it, with the group's metadata, to every node of its group (peer ``Announce``; to
itself directly), which makes it restorable there (roles/follower.py).

Per step, a node sends and keeps O(group size) of control data; the root handles
one small message per group in and out.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Callable

from shardguard.daemon.base import faults
from shardguard.daemon.coding import placement
from shardguard.daemon.errors import InvalidRequestError
from shardguard.daemon.roles import checks
from shardguard.daemon.roles.state import Collected, ProtectionState
from shardguard.daemon.storage.store import Store
from shardguard.daemon.transport.peer_client import PeerClients
from shardguard.proto import peer_pb2 as ppb
from shardguard.proto.meta import (
    GroupReport,
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

#: Announce locally: (job, step, meta).
Announce = Callable[[str, int, StepMeta], None]


class Reporter:
    """Sends a report where it goes: stripe and parity reports to the group's leader, group
    and flush reports to the root (node 0); directly when that is this node."""

    def __init__(self, peers: PeerClients, timeout_s: float) -> None:
        self.peers, self.timeout_s = peers, timeout_s
        #: This node's own leader and root roles (wired by the server).
        self.local: Callable[[str, int, int, Report], None] | None = None

    def send(self, job: str, step: int, topo: Topology, report: Report) -> None:
        if isinstance(report, (StripeReport, ParityReport)):
            grp = placement.placement_of(topo).groups[report.group]
            to = placement.leader_of(grp)
        else:
            to = 0
        if to == topo.node_index:
            assert self.local is not None
            self.local(job, step, topo.node_index, report)
            return
        self.peers.stub(topo.nodes[to][0]).Report(ppb.ReportRequest(
            job=job, step=step, node=topo.node_index, report=encode_report(report)),
            timeout=self.timeout_s)


class GroupLeader:
    """Collects its group's reports of a step, and announces the step to the group."""

    def __init__(self, store: Store, state: ProtectionState, peers: PeerClients,
                 reporter: Reporter, pool: concurrent.futures.Executor, timeout_s: float) -> None:
        self.store, self.state, self.peers, self.reporter = store, state, peers, reporter
        self.pool, self.timeout_s = pool, timeout_s
        self.announce_here: Announce | None = None  # wired to the follower by the server

    def report(self, job: str, step: int, report: StripeReport | ParityReport) -> None:
        """Take one report of this node's group; tell the root once the group stored the step."""
        topo = checks.topology_of(self.store, job)
        grp = checks.group_of(topo, report.group, report.stripe,
                              report.index if isinstance(report, ParityReport) else 0)
        if placement.leader_of(grp) != topo.node_index:
            raise InvalidRequestError(f"node {topo.node_index} does not lead group "
                                      f"{report.group} of job {job}")
        st = self.state.job(job)
        with self.state.lock:
            col = st.collected.setdefault(step, Collected())
            where = (report.group, report.stripe)
            if report.epoch < col.epoch:
                logger.info("group %d stripe %d: a report of launch %d, older than launch %d's "
                            "of the step: ignored", report.group, report.stripe, report.epoch,
                            col.epoch, extra={"job": job, "step": step})
                return
            if report.epoch > col.epoch:
                # A relaunch sealed the step again: what an older launch reported is void.
                col.stripes, col.parity, col.meta = {}, set(), None
                col.epoch = report.epoch
            if isinstance(report, StripeReport):
                stale = _other_seal(col, report)
                if stale:
                    # A source sealed the step again (a relaunch resumed before it): the
                    # stripes reported of its older seal are void; the group's metadata is
                    # built from one seal of each node, never a mix.
                    logger.info("group %d: node(s) %s sealed the step again; %d stripe "
                                "report(s) of the older seal dropped", report.group,
                                sorted(stale), len(col.stripes) - len(_keep(col, report)),
                                extra={"job": job, "step": step})
                    col.stripes = _keep(col, report)
                    col.meta = None
                col.stripes[where] = report
            else:
                col.parity.add((where, report.index))
            complete = (len(col.stripes) == grp.g and len(col.parity) == grp.g * (grp.m - 1)
                        and col.meta is None)
            if complete:
                col.meta = _group_meta(job, step, topo, grp, col)
        if complete:
            self.reporter.send(job, step, topo, GroupReport(grp.group, col.epoch))

    def commit(self, job: str, step: int, tier: str) -> None:
        """The root says every group stored ``step``: announce it to this group's nodes."""
        topo = checks.topology_of(self.store, job)
        st = self.state.job(job)
        with self.state.lock:
            col = st.collected.get(step)
            meta = col.meta if col is not None else None
        if meta is None:
            raise InvalidRequestError(f"job {job} step {step}: node {topo.node_index} holds no "
                                      f"stored group of this step to announce")
        self.pool.submit(self._announce_group, job, step, topo, meta.with_tier(tier))

    def _announce_group(self, job: str, step: int, topo: Topology, meta: StepMeta) -> None:
        raw = meta.encode()
        futs = []
        for node in sorted(meta.members):
            if node == topo.node_index:
                assert self.announce_here is not None
                futs.append(self.pool.submit(self.announce_here, job, step, meta))
            else:
                futs.append(self.pool.submit(
                    self.peers.stub(topo.nodes[node][0]).Announce,
                    ppb.AnnounceRequest(job=job, step=step, meta=raw), timeout=self.timeout_s))
            if len(futs) == 1 and len(meta.members) > 1:
                # Test fault point: announced to one node, not yet to the others.
                concurrent.futures.wait(futs)
                faults.point("announce", step, topo.node_index)
        for f in futs:
            try:
                f.result()
            except Exception as exc:  # noqa: BLE001 - a dead node learns it on restart
                logger.warning("announce failed: %s", exc, extra={"job": job, "step": step})


def _other_seal(col: Collected, report: StripeReport) -> set[int]:
    """The nodes whose layout in ``report`` differs from the one collected reports name."""
    return {n for rep in col.stripes.values() for n, lay in rep.layouts.items()
            if n in report.layouts and report.layouts[n] != lay}


def _keep(col: Collected, report: StripeReport) -> dict[tuple[int, int], StripeReport]:
    """The collected stripe reports whose every layout agrees with ``report``'s."""
    return {k: r for k, r in col.stripes.items()
            if all(report.layouts.get(n, lay) == lay for n, lay in r.layouts.items())}


def _group_meta(job: str, step: int, topo: Topology, grp: placement.GroupLayout,
                col: Collected) -> StepMeta:
    layouts: dict[int, NodeLayout] = {}
    for rep in col.stripes.values():
        for node, lay in rep.layouts.items():
            if layouts.setdefault(node, lay) != lay:  # report() keeps one seal per node
                raise InvalidRequestError(f"job {job} step {step}: two layouts of node {node}")
    return StepMeta(job, step, topo.code, grp.group, {n: topo.nodes[n] for n in grp.nodes},
                    layouts, {k: StripeMeta(r.plen, dict(r.pieces))
                              for k, r in col.stripes.items()})

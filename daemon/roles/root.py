"""The root (node 0 of the job's node list): a step is protected when every group stored it.

Each group leader tells the root when its group stored a step (a few bytes); when
every group has, the root commits the step to the leaders (peer ``Commit``; to
itself directly), which announce it to their groups (roles/leader.py). A step is
thus restorable only once every group's parity is stored; the root handles one
small message per group in and out, whatever the job's size. The persistent tier
hooks in from above: ``claim`` decides at commit whether the step is flushed (the
claim travels with the commit and the announcements), ``on_flushed`` takes the
nodes' flush reports.

If the root or a leader dies mid-commit, some nodes learn the step and others keep
the previous one (still retained everywhere): the ranks agree on the older one, and
the nodes that moved on roll back to it (docs/design.md §4).
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Callable

from shardguard.daemon.coding import placement
from shardguard.daemon.errors import InvalidRequestError
from shardguard.daemon.roles import checks
from shardguard.daemon.roles.state import Collected, ProtectionState
from shardguard.daemon.storage.store import Store
from shardguard.daemon.transport.peer_client import PeerClients
from shardguard.proto import peer_pb2 as ppb
from shardguard.proto.meta import FlushedReport, Topology

logger = logging.getLogger(__name__)

#: The tier's claim: (job, step, nodes, world) -> a token naming the flush, or None.
Claim = Callable[[str, int, int, int], "str | None"]
#: The tier's report handler: (job, step, node, report).
OnFlushed = Callable[[str, int, int, FlushedReport], None]
#: Commit locally: (job, step, tier token).
Commit = Callable[[str, int, str], None]


class Root:
    """Commits a step once every group stored it (on node 0)."""

    def __init__(self, store: Store, state: ProtectionState, peers: PeerClients,
                 pool: concurrent.futures.Executor, timeout_s: float) -> None:
        self.store, self.state, self.peers = store, state, peers
        self.pool, self.timeout_s = pool, timeout_s
        self.commit_here: Commit | None = None  # this node's own leader (wired by the server)
        self.claim: Claim | None = None
        self.on_flushed: OnFlushed | None = None

    def group_stored(self, job: str, step: int, group: int, epoch: int = 0) -> None:
        topo = self._topology(job)
        pl = placement.placement_of(topo)
        if not 0 <= group < len(pl.groups):
            raise InvalidRequestError(f"group {group}: the job has groups 0..{len(pl.groups) - 1}")
        st = self.state.job(job)
        with self.state.lock:
            col = st.collected.setdefault(step, Collected())
            if epoch < col.groups_epoch:
                logger.info("group %d stored the step in launch %d, older than %d: ignored",
                            group, epoch, col.groups_epoch, extra={"job": job, "step": step})
                return
            if epoch > col.groups_epoch and not col.committed:
                col.groups, col.groups_epoch = set(), epoch  # an older launch's are void
            col.groups.add(group)
            complete = len(col.groups) == len(pl.groups) and not col.committed
            if complete:
                col.committed = True
        if not complete:
            return
        token = ""
        if self.claim is not None:
            # Every node flushes the steps the root claims: the claim travels with the commit.
            token = self.claim(job, step, len(topo.nodes), self.store.job(job).world_size) or ""
        self.pool.submit(self._commit_all, job, step, topo, token)

    def flushed(self, job: str, step: int, node: int, report: FlushedReport) -> None:
        self._topology(job)
        if self.on_flushed is not None:
            self.on_flushed(job, step, node, report)

    def _commit_all(self, job: str, step: int, topo: Topology, token: str) -> None:
        futs = []
        for grp in placement.placement_of(topo).groups:
            leader = placement.leader_of(grp)
            if leader == topo.node_index:
                assert self.commit_here is not None
                futs.append(self.pool.submit(self.commit_here, job, step, token))
            else:
                futs.append(self.pool.submit(
                    self.peers.stub(topo.nodes[leader][0]).Commit,
                    ppb.CommitRequest(job=job, step=step, tier=token), timeout=self.timeout_s))
        for f in futs:
            try:
                f.result()
            except Exception as exc:  # noqa: BLE001 - its group learns the step on restart
                logger.warning("commit failed: %s", exc, extra={"job": job, "step": step})

    def _topology(self, job: str) -> Topology:
        topo = checks.topology_of(self.store, job)
        if topo.node_index != 0:
            raise InvalidRequestError(f"this daemon does not coordinate job {job}")
        return topo

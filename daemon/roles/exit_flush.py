"""Saving the newest step on the way down: when a job's trainers are gone, or the daemon is
stopped, the persistent tier flushes the job's newest restorable step, whatever
``tier_every`` says (config ``tier_on_exit``).

The job's root (node 0; the only node of a one-node job) watches its own ranks: once it
has seen them held by live trainers and then none is (they crashed, were killed, or
closed at the end of the run), it claims the newest restorable step (``Tier.claim``
with ``force``) and asks every node to flush its ranks of it (peer ``Flush``; itself
directly); the nodes report to the root and it commits as for any flush. Nothing of
this runs on the training path: the trainers are gone. A stopping daemon (SIGTERM:
systemd, the Slurm epilog) does the same for the jobs it is the root of, then waits up
to ``tier_exit_wait_s`` for those flushes to commit before it stops; on the other
nodes a flush in progress delays their stop the same way. When every daemon of a job
is stopped at once, a node may stop before it wrote its part: that flush fails and
``latest`` keeps naming the previous complete step (never a partial one).
"""

from __future__ import annotations

import logging
import threading
import time

from shardguard.daemon.errors import ShardguardError
from shardguard.daemon.roles.leader import Reporter
from shardguard.daemon.roles.tier import Tier
from shardguard.daemon.storage.store import JobRecord, Store
from shardguard.daemon.transport.peer_client import PeerClients
from shardguard.proto import peer_pb2 as ppb

logger = logging.getLogger(__name__)

#: How often the root looks at its trainers.
WATCH_S = 1.0


class ExitFlush:
    """Flushes a job's newest restorable step when its trainers are gone or the daemon stops."""

    def __init__(self, store: Store, tier: Tier, peers: PeerClients | None,
                 reporter: Reporter | None, timeout_s: float) -> None:
        self.store, self.tier, self.peers, self.reporter = store, tier, peers, reporter
        self.timeout_s = timeout_s
        self._seen_alive: set[str] = set()
        self._flushed: dict[str, int] = {}  # the step a flush on the way down was asked for
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="sg-exit-flush", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=WATCH_S + 5)

    def on_stop(self, wait_s: float) -> None:
        """The daemon is stopping: flush the newest step of every job it is the root of, and
        wait up to ``wait_s`` for this node's flushes to commit."""
        self.close()
        deadline = time.monotonic() + wait_s
        pending = [rec for rec in self.store.jobs() if self._is_root(rec)]
        while pending and time.monotonic() < deadline:  # a running flush first, then ours
            pending = [rec for rec in pending
                       if not self._flush_newest(rec, "the daemon is stopping")]
            if pending:
                time.sleep(0.05)
        while time.monotonic() < deadline and any(
                self.tier.busy(rec.job) or self.tier.flushing(rec.job)
                for rec in self.store.jobs()):
            time.sleep(0.05)

    def saw_trainer(self, job: str) -> None:
        """A rank of ``job`` registered here (a run shorter than one look counts too)."""
        self._seen_alive.add(job)

    def flush(self, job: str, step: int, token: str) -> None:
        """A root's request (peer ``Flush``): write this node's ranks of ``step``."""
        topo = self.store.job(job).topology
        if topo is None or self.reporter is None:
            raise ShardguardError(f"job {job} is not a multi-node job on this daemon")
        self.tier.prepare(job)
        self.tier.flush(job, step, token, topo.node_index,
                        lambda r: self.reporter.send(job, step, topo, r))  # type: ignore[union-attr]

    # ---------------------------------------------------------------- watching

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_S):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watch must outlive one bad round
                logger.exception("exit flush check failed")

    def check(self) -> None:
        """One look at the ranks of the jobs this node is the root of."""
        for rec in self.store.jobs():
            if not self._is_root(rec):
                continue
            ranks = [rec.ranks[r] for r in rec.local_ranks if r in rec.ranks]
            if any(rr.claimed_by_live_process() for rr in ranks):
                self._seen_alive.add(rec.job)
            elif rec.job in self._seen_alive and self._flush_newest(rec, "its trainers are gone"):
                self._seen_alive.discard(rec.job)  # done, or nothing newer to save

    def _is_root(self, rec: JobRecord) -> bool:
        return rec.topology is None or rec.topology.node_index == 0

    def _flush_newest(self, rec: JobRecord, why: str) -> bool:
        """Start the flush of the job's newest restorable step; False when it must wait (a
        flush of the job is running: asked again at the next look)."""
        step = rec.restorable_step
        if step is None or self._flushed.get(rec.job) == step:
            return True
        if self.tier.busy(rec.job):
            return False
        topo = rec.topology
        nodes = len(topo.nodes) if topo is not None else 1
        token = self.tier.claim(rec.job, step, nodes, rec.world_size, force=True)
        if token is None:
            return not self.tier.busy(rec.job)  # already flushed, or just claimed elsewhere
        self._flushed[rec.job] = step
        logger.info("saving step %d on the way down: %s", step, why,
                    extra={"job": rec.job, "step": step})
        if topo is None:
            self.tier.flush(rec.job, step, token, 0,
                            lambda r: self.tier.flushed(rec.job, step, 0, r))
            return True
        for i, (control, _) in enumerate(topo.nodes):
            if i == topo.node_index:
                self.flush(rec.job, step, token)
                continue
            try:
                assert self.peers is not None
                self.peers.stub(control).Flush(
                    ppb.FlushRequest(job=rec.job, step=step, tier=token),
                    timeout=self.timeout_s)
            except ShardguardError as exc:
                logger.warning("node %d not asked to flush: %s", i, exc,
                               extra={"job": rec.job, "step": step})
        return True


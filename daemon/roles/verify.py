"""``shardguard verify``: re-check every checksum of a restorable step, and that every stripe decodes.

Each node checks its own part of the step (:meth:`Verifier.check_node`): the CRC32C of
its ranks' slots (data and manifest), of every data piece it contributed and of
every parity piece it holds, against the step's metadata. The node asked
(:meth:`Verifier.verify_job`) gathers the nodes' answers and decides per stripe
whether at least ``k`` of its ``k + m`` pieces are sound, i.e. whether a lost node
could still be rebuilt.

Nothing is pinned, marked or repaired: training goes on while this runs. A slot or
parity file that training rewrote while it was read is reported as *superseded* (the
step was replaced by a newer one), not as corruption; the command line then checks
the new restorable step.
"""

from __future__ import annotations

import concurrent.futures
import logging
import mmap
import os
import time
from typing import Any

from shardguard.daemon.base.stalls import Stalls
from shardguard.daemon.coding import placement
from shardguard.daemon.coding.checksum import crc32c, crc_of
from shardguard.daemon.errors import NotRestorableError, ShardguardError
from shardguard.daemon.roles.serve import PieceReader
from shardguard.daemon.storage.pieces import PieceFiles
from shardguard.daemon.storage.stepmeta import StepMetas
from shardguard.daemon.storage.store import SUPERSEDED, Store
from shardguard.daemon.transport.peer_client import PeerClients
from shardguard.proto import peer_pb2 as ppb
from shardguard.proto.meta import StepMeta
from shardguard.proto.verify_report import JobCheck, NodeCheck, PieceCheck, RankCheck, StripeCheck

logger = logging.getLogger(__name__)


class Verifier:
    """Checks a step on this node, or across the job."""

    def __init__(self, store: Store, metas: StepMetas | None, reader: PieceReader | None,
                 pieces: PieceFiles | None, peers: PeerClients | None, stalls: Stalls,
                 timeout_s: float) -> None:
        self.store, self.metas, self.reader, self.pieces = store, metas, reader, pieces
        self.peers, self.stalls, self.timeout_s = peers, stalls, timeout_s

    def check_node(self, job: str, step: int) -> NodeCheck:
        """This node's part of ``step``."""
        topo = self.store.job(job).topology
        rec = self.store.job(job)
        gens = {r: self.store.slot_generation(job, r, step) for r in rec.local_ranks}
        out = self._check_ranks(job, step, topo.node_index if topo is not None else 0)
        if out.superseded or topo is None:
            return out
        meta = self._meta_of(job, step)
        if meta is None:
            out.superseded = True
            return out
        # The pieces of the node of the step's topology that this daemon holds: after a
        # relaunch that moved ranks, not necessarily the one with its current number.
        held = self.metas.holder(job) if self.metas is not None else None
        groups = placement.placement_of(meta.code).groups
        for (group, s), stripe in sorted(meta.stripes.items()):
            k = groups[group].k
            for index, piece in sorted(stripe.pieces.items()):
                if held is None or piece.node != held:
                    continue
                ok, error = False, ""
                try:
                    if index >= k:
                        crc, moved = _parity_crc(self.pieces.path(job, step, group, s, index))
                        if moved:
                            out.superseded = True
                            return out
                    else:
                        crc = crc_of(self.reader.read(job, step, group, s, index))
                    ok = crc == piece.crc
                    error = "" if ok else "checksum fails"
                    out.bytes += piece.len
                except FileNotFoundError:
                    if self._moved_on(job, step):  # released: a newer step became restorable
                        out.superseded = True
                        return out
                    error = "parity piece missing"
                except ShardguardError as exc:
                    error = str(exc)
                out.pieces.append(PieceCheck(group, s, index, held, index >= k, ok, error))
        if any(self.store.slot_generation(job, r, step) != g for r, g in gens.items()):
            out.superseded = True
        elif any(not c.ok for c in out.pieces) and self._moved_on(job, step):
            out.superseded = True  # what failed may have been replaced while it was read
        return out

    def verify_job(self, job: str, step: int | None) -> JobCheck:
        """Check every node's part of ``step`` (default: the restorable step) and every stripe."""
        rec = self.store.job(job)
        if rec.restorable_step is None:
            stall = self.stalls.get(job)
            raise NotRestorableError(f"job {job} has no restorable step" + (
                f"; protection is stalled here ({stall.cause.value}): {stall.detail}"
                if stall is not None else ""))
        if step is None:
            step = rec.restorable_step
        if step != rec.restorable_step:
            raise NotRestorableError(f"job {job}: step {step} is not restorable here (the "
                                     f"restorable step is {rec.restorable_step}); only it has "
                                     f"parity")
        topo = rec.topology
        if topo is None or self.metas is None:
            node = self.check_node(job, step) if self.metas is not None else \
                self._check_ranks(job, step, 0)
            return JobCheck(job, step, node.superseded, [node])
        meta = self._meta_of(job, step)
        if meta is None:  # replaced while this began: the caller checks the new step
            return JobCheck(job, step, True)
        # Every node answers for the pieces it holds (whatever its number was when the
        # step was protected); the stripes' counts come from the code.
        addresses = topo.nodes
        report = JobCheck(job, step)
        with concurrent.futures.ThreadPoolExecutor(min(32, len(addresses))) as pool:
            futs = {i: pool.submit(self.check_node, job, step) if i == topo.node_index
                    else pool.submit(self._remote, control, job, step)
                    for i, (control, _) in enumerate(addresses)}
            for i, fut in futs.items():
                try:
                    report.nodes.append(fut.result())
                except Exception as exc:  # noqa: BLE001 - a node that cannot answer is reported
                    logger.warning("job=%s step=%d: node %d did not answer verify: %s", job,
                                   step, i, exc)
                    report.unreachable.append((i, f"{type(exc).__name__}: {exc}"))
        sound = {(c.group, c.stripe, c.index) for n in report.nodes for c in n.pieces if c.ok}
        for grp in placement.placement_of(meta.code).groups:
            for s in range(grp.g):
                good = sum((grp.group, s, i) in sound for i in range(grp.g))
                report.stripes.append(StripeCheck(grp.group, s, grp.k, grp.g, good))
        report.superseded = any(n.superseded for n in report.nodes)
        report.nodes.sort(key=lambda n: n.node)
        return report

    def _meta_of(self, job: str, step: int) -> StepMeta | None:
        """This node's metadata of ``step``; None when a newer step replaced it.

        The announcement that ``step`` is restorable reaches the nodes one by one,
        so a node whose ranks sealed ``step`` may not have it yet: it is waited for
        (up to ``peer_timeout_s``), then the node is reported as not knowing the step.
        """
        deadline = time.monotonic() + self.timeout_s
        while True:
            meta = self.metas.get(job) if self.metas is not None else None
            have = None if meta is None else meta.step
            if have == step:
                return meta
            if have is not None and have > step:
                return None
            try:
                self.store.check_sealed(job, step)  # else no announcement can be on its way
                waiting = True
            except ShardguardError:
                waiting = False
            if not waiting or time.monotonic() >= deadline:
                topo = self.store.job(job).topology
                raise NotRestorableError(
                    f"job {job}: node {topo.node_index if topo else 0} has no metadata of "
                    f"step {step} (its restorable step is {have})")
            time.sleep(0.05)

    def _moved_on(self, job: str, step: int) -> bool:
        have = self.metas.step(job) if self.metas is not None else None
        return have is not None and have > step

    def _check_ranks(self, job: str, step: int, node: int) -> NodeCheck:
        """The slot checks of this node's ranks (a node report without pieces yet)."""
        out = NodeCheck(node, step)
        for rank in sorted(self.store.job(job).local_ranks):
            problem, nbytes = self.store.check_slot(job, rank, step)
            if problem == SUPERSEDED:
                out.superseded = True
                break
            out.ranks.append(RankCheck(rank, problem is None, problem or ""))
            out.bytes += nbytes
        return out

    def _remote(self, control: str, job: str, step: int) -> NodeCheck:
        assert self.peers is not None
        reply = self.peers.stub(control).VerifyLocal(ppb.VerifyLocalRequest(job=job, step=step),
                                                     timeout=max(60.0, self.timeout_s))
        return NodeCheck.decode(reply.report)


def _parity_crc(path: str) -> tuple[int, bool]:
    """The CRC32C of a parity file, and whether it was released (renamed) while read."""
    with open(path, "rb") as fh:
        ino = os.fstat(fh.fileno()).st_ino
        size = os.fstat(fh.fileno()).st_size
        if not size:
            return 0, False
        with mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mm:
            crc = crc32c(memoryview(mm))
    try:
        return crc, os.stat(path).st_ino != ino
    except FileNotFoundError:
        return crc, True


def summarize(report: JobCheck) -> dict[str, Any]:
    """The VerifyReply counters of a :meth:`Verifier.verify_job` report."""
    stripes = report.stripes
    return {
        "step": report.step,
        "superseded": report.superseded,
        "stripes": len(stripes),
        "stripes_degraded": sum(1 for s in stripes if s.k <= s.good < s.total),
        "stripes_lost": sum(1 for s in stripes if s.good < s.k),
        "bad_pieces": sum(1 for n in report.nodes for c in n.pieces if not c.ok),
        "bad_ranks": sum(1 for n in report.nodes for r in n.ranks if not r.ok),
        "unreachable_nodes": [n for n, _ in report.unreachable],
        "bytes_checked": report.bytes,
    }

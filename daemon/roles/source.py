"""The source role: when every local rank sealed a step, send this node's pieces to their encoders.

The node's payload ``D`` (its ranks' sealed slots, in rank order) is cut into ``k``
pieces of ``P`` bytes (placement.source_piece_bytes: page-aligned), each *offered*
(peer ``Offer``) to the encoder of its stripe. An offer returns once the stripe's ``k``
sources have offered; the source then streams the piece over ZeroMQ straight from
arena memory and waits until the encoder says every byte arrived
(transport/delivery.py). A piece's CRC32C comes from the block CRCs the slots were sealed
with, not from reading the bytes again. A failure is named as the job's stall
cause; the step is then never restorable, and the trainers give it up.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading

from shardguard.daemon.base import faults
from shardguard.daemon.base.stalls import Stalls
from shardguard.daemon.coding import placement
from shardguard.daemon.coding.checksum import SegmentCrcs, crc_of, range_crc, slice_segments
from shardguard.daemon.errors import ShardguardError, SupersededError
from shardguard.daemon.storage.store import Store
from shardguard.daemon.transport.dataplane import DataPlane
from shardguard.daemon.transport.delivery import Delivery
from shardguard.daemon.transport.peer_client import PeerClients
from shardguard.proto import peer_pb2 as ppb
from shardguard.proto.meta import NodeLayout, RankEntry, Topology, seal_token

logger = logging.getLogger(__name__)

#: Times a piece is offered again when its encoder started the stripe over for another
#: node's newer seal of the step (each restart needs one more relaunched node's offer).
RESTARTS = 4


class Source:
    """Sends this node's pieces of each sealed step."""

    def __init__(self, store: Store, peers: PeerClients, plane: DataPlane, delivery: Delivery,
                 pool: concurrent.futures.Executor, stalls: Stalls, timeout_s: float) -> None:
        self.store, self.peers, self.plane, self.delivery = store, peers, plane, delivery
        self.pool, self.stalls, self.timeout_s = pool, stalls, timeout_s
        # The seal (seal_token of its layout) each (job, step) being sent is of: a relaunch
        # that seals a step again supersedes a send of it still under way (blocked in an
        # offer, say), which then ends quietly instead of pushing the older seal's bytes.
        self._sending: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def on_node_sealed(self, job: str, step: int) -> None:
        """Every local rank sealed ``step`` (the store calls this): send, on a pool thread."""
        self.pool.submit(self._send_step, job, step)

    def _send_step(self, job: str, step: int) -> None:
        token = None
        try:
            topo = self.store.job(job).topology
            assert topo is not None
            faults.point("sealed", step, topo.node_index)
            grp = placement.placement_of(topo).group_of(topo.node_index)
            epoch = self.store.job(job).epoch  # the launch whose ranks sealed it
            segs, layout, infos = self._payload(job, step, grp.k)
            raw = layout.encode()
            token = seal_token(raw)
            with self._lock:
                self._sending[(job, step)] = token
            jobs = []
            for ref in grp.data_pieces(grp.position(topo.node_index)):
                start, length = placement.piece_span(layout.bytes, ref.index, layout.plen)
                end = start + length
                jobs.append(self.pool.submit(
                    self._offer_and_send, job, step, topo, grp, ref.stripe, ref.index, layout,
                    raw, epoch, slice_segments(segs, start, end),
                    lambda a=start, b=end: range_crc(segs, infos, a, b)))
            for j in jobs:
                j.result()
        except Exception as exc:  # noqa: BLE001 - the step is simply never restorable
            if self._superseded(job, step, token) or isinstance(exc, SupersededError):
                logger.info("step %d was sealed again here; the older send ends: %s", step,
                            exc, extra={"job": job, "step": step})
            else:
                if not isinstance(exc, ShardguardError):  # a peer's answer needs no trace
                    logger.exception("sending pieces failed", extra={"job": job, "step": step})
                self.stalls.record_error(job, exc, f"sending this node's pieces of step {step}")
        finally:
            with self._lock:
                if token is not None and self._sending.get((job, step)) == token:
                    del self._sending[(job, step)]

    def _superseded(self, job: str, step: int, token: int | None) -> bool:
        """A newer seal of ``step`` is being sent (or was) since this send began."""
        with self._lock:
            now = self._sending.get((job, step))
        return token is not None and now is not None and now != token

    def _payload(self, job: str, step: int, k: int
                 ) -> tuple[list[memoryview], NodeLayout, list[SegmentCrcs]]:
        """This node's payload of ``step`` (its ranks' slots, in rank order), its layout,
        and what the seals checksummed of each slot."""
        segs, ranks, infos, off = [], [], [], 0
        for rank in sorted(self.store.job(job).local_ranks):
            view, rec, slot_bytes = self.store.sealed_slot(job, rank, step)
            used = rec.manifest_offset + rec.manifest_bytes
            segs.append(view[:used])
            ranks.append(RankEntry(rank, off, used, slot_bytes, rec))
            infos.append(SegmentCrcs(rec.data_bytes, self.store.block_crcs(
                job, rank, step, rec.generation)))
            off += used
        return segs, NodeLayout(off, placement.source_piece_bytes(off, k), tuple(ranks)), infos

    def _offer_and_send(self, job: str, step: int, topo: Topology,
                        grp: placement.GroupLayout, stripe: int, q: int, layout: NodeLayout,
                        raw: bytes, epoch: int, bufs: list[memoryview],
                        crc: object = None) -> None:
        token = seal_token(raw)
        checksum = crc() if callable(crc) else crc_of(bufs)
        for attempt in range(1, RESTARTS + 2):
            try:
                self._offer_and_push(job, step, topo, grp, stripe, q, layout, raw, epoch,
                                     bufs, checksum, token)
                return
            except SupersededError:
                if attempt > RESTARTS or self._superseded(job, step, token):
                    raise
                # This seal is still this node's newest: another node's newer seal made
                # the encoder start the stripe over (a relaunch's offers can meet older
                # ones there in any order). Offer again, into the new encoding.
                logger.info("group %d stripe %d: the encoder started over; offering piece "
                            "%d again", grp.group, stripe, q, extra={"job": job, "step": step})

    def _offer_and_push(self, job: str, step: int, topo: Topology,
                        grp: placement.GroupLayout, stripe: int, q: int, layout: NodeLayout,
                        raw: bytes, epoch: int, bufs: list[memoryview], checksum: int,
                        token: int) -> None:
        real = sum(len(b) for b in bufs)
        encoder = grp.nodes[grp.encoder(stripe)]
        control, data = topo.nodes[encoder]
        self.peers.stub(control).Offer(ppb.OfferRequest(
            job=job, step=step, stripe=stripe, group=grp.group, index=q, node=topo.node_index,
            piece_bytes=layout.plen, real_bytes=real, crc=checksum, layout=raw,
            topology=topo.describe(), epoch=epoch), timeout=self.timeout_s)
        if self._superseded(job, step, token):  # the slot's bytes may be the newer seal's
            raise SupersededError(f"step {step} was sealed again on this node")
        where = ppb.ReceivedRequest(job=job, step=step, group=grp.group, stripe=stripe, index=q,
                                    seal=token)
        self.plane.push(data, b"data", {"job": job, "step": step, "group": grp.group,
                                         "stripe": stripe, "index": q, "seal": token}, bufs,
                        on_frame=lambda: faults.point("mid-transfer", step, topo.node_index),
                        delivered=lambda acked: self.delivery.confirm(
                            where, real, encoder, control, data, acked))
        self.store.metrics.bytes_sent(job, "data", real)

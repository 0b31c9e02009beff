"""The source role: when every local rank sealed a step, send this node's pieces to their encoders.

The node's payload ``D`` (its ranks' sealed slots, in rank order) is cut into ``k``
pieces of ``P`` bytes (placement.source_piece_bytes: page-aligned), each *offered*
(peer ``Offer``) to the encoder of its stripe. An offer returns once the stripe's ``k``
sources have offered; the source then streams the piece over ZeroMQ straight from
arena memory and waits until the encoder says every byte arrived
(transport/delivery.py). A piece's CRC32C comes from the block CRCs the seals
computed, not from reading the bytes again. A failure is named as the job's stall
cause; the step is then never restorable, and the trainers give it up.
"""

from __future__ import annotations

import concurrent.futures
import logging

from shardguard.daemon.base import faults
from shardguard.daemon.base.stalls import Stalls
from shardguard.daemon.coding import placement
from shardguard.daemon.coding.checksum import SegmentCrcs, crc_of, range_crc, slice_segments
from shardguard.daemon.errors import ShardguardError
from shardguard.daemon.storage.store import Store
from shardguard.daemon.transport.dataplane import DataPlane
from shardguard.daemon.transport.delivery import Delivery
from shardguard.daemon.transport.peer_client import PeerClients
from shardguard.proto import peer_pb2 as ppb
from shardguard.proto.meta import NodeLayout, RankEntry, SlotDoc, Topology

logger = logging.getLogger(__name__)


class Source:
    """Sends this node's pieces of each sealed step."""

    def __init__(self, store: Store, peers: PeerClients, plane: DataPlane, delivery: Delivery,
                 pool: concurrent.futures.Executor, stalls: Stalls, timeout_s: float) -> None:
        self.store, self.peers, self.plane, self.delivery = store, peers, plane, delivery
        self.pool, self.stalls, self.timeout_s = pool, stalls, timeout_s

    def on_node_sealed(self, job: str, step: int) -> None:
        """Every local rank sealed ``step`` (the store calls this): send, on a pool thread."""
        self.pool.submit(self._send_step, job, step)

    def _send_step(self, job: str, step: int) -> None:
        try:
            topo = self.store.job(job).topology
            assert topo is not None
            faults.point("sealed", step, topo.node_index)
            grp = placement.placement_of(topo).group_of(topo.node_index)
            segs, layout, infos = self._payload(job, step, grp.k)
            jobs = []
            for ref in grp.data_pieces(grp.position(topo.node_index)):
                start, length = placement.piece_span(layout.bytes, ref.index, layout.plen)
                end = start + length
                jobs.append(self.pool.submit(
                    self._offer_and_send, job, step, topo, grp, ref.stripe, ref.index, layout,
                    slice_segments(segs, start, end),
                    lambda a=start, b=end: range_crc(segs, infos, a, b)))
            for j in jobs:
                j.result()
        except ShardguardError as exc:  # a peer's answer: named, the step never restorable
            self.stalls.record_error(job, exc, f"sending this node's pieces of step {step}")
        except Exception as exc:  # noqa: BLE001 - the step is simply never restorable
            logger.exception("sending pieces failed", extra={"job": job, "step": step})
            self.stalls.record_error(job, exc, f"sending this node's pieces of step {step}")

    def _payload(self, job: str, step: int, k: int
                 ) -> tuple[list[memoryview], NodeLayout, list[SegmentCrcs]]:
        """This node's payload of ``step`` (its ranks' slots, in rank order), its layout,
        and what the seals checksummed of each slot."""
        segs, ranks, infos, off = [], [], [], 0
        for rank in sorted(self.store.job(job).local_ranks):
            view, rec, slot_bytes = self.store.sealed_slot(job, rank, step)
            used = rec.manifest_offset + rec.manifest_bytes
            segs.append(view[:used])
            ranks.append(RankEntry(rank, off, used, slot_bytes, SlotDoc(
                int(rec.state), rec.step, rec.data_bytes, rec.manifest_offset,
                rec.manifest_bytes, rec.data_crc, rec.manifest_crc, rec.generation)))
            infos.append(SegmentCrcs(rec.data_bytes, self.store.block_crcs(
                job, rank, step, rec.generation)))
            off += used
        return segs, NodeLayout(off, placement.source_piece_bytes(off, k), tuple(ranks)), infos

    def _offer_and_send(self, job: str, step: int, topo: Topology,
                        grp: placement.GroupLayout, stripe: int, q: int, layout: NodeLayout,
                        bufs: list[memoryview], crc: object = None) -> None:
        real = sum(len(b) for b in bufs)
        encoder = grp.nodes[grp.encoder(stripe)]
        control, data = topo.nodes[encoder]
        self.peers.stub(control).Offer(ppb.OfferRequest(
            job=job, step=step, stripe=stripe, group=grp.group, index=q, node=topo.node_index,
            piece_bytes=layout.plen, real_bytes=real,
            crc=crc() if callable(crc) else crc_of(bufs), layout=layout.encode(),
            topology=topo.describe()), timeout=self.timeout_s)
        where = ppb.ReceivedRequest(job=job, step=step, group=grp.group, stripe=stripe, index=q)
        self.plane.push(data, b"data", {"job": job, "step": step, "group": grp.group,
                                         "stripe": stripe, "index": q}, bufs,
                        on_frame=lambda: faults.point("mid-transfer", step, topo.node_index),
                        delivered=lambda: self.delivery.confirm(where, real, encoder, control,
                                                                data))
        self.store.metrics.bytes_sent(job, "data", real)

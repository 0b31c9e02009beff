"""The encoder role: a stripe's ``k`` data pieces arrive, its parity is computed as they come.

A source's ``Offer`` waits until the stripe's ``k`` sources have offered (then the
stripe's piece size is known: the largest of theirs); the parity buffers are made then
(parity 0 in its shm file, parities ``1..m-1`` in scratch buffers; reused from an older
step and not cleared). Each arriving 8 MiB frame is folded into the parity in place
(ISA-L): written where it is the first share to reach those bytes, added to where it is
not (coding/coverage.py), so encoding overlaps the transfer; each chunk of the parity is
checksummed on the pool as soon as its last share is in (coding/parity_sums.py). When
every byte is in, the encoder clears what no source reached (past every source's end),
checksums those bytes and combines the chunks' CRCs into the parity's, keeps parity 0,
forwards parities ``1..m-1`` to their holders (waiting until each arrived) and reports
the stripe, with its pieces' places and CRCs and its sources' layouts, to the
coordinator.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Any

from shardguard.daemon.base import faults
from shardguard.daemon.base.stalls import Stalls
from shardguard.daemon.coding.codec import Codecs
from shardguard.daemon.coding.parity_sums import ParitySums
from shardguard.daemon.coding.placement import stripe_piece_bytes
from shardguard.daemon.errors import (
    ConfigMismatchError,
    InvalidRequestError,
    PeerUnavailableError,
    SupersededError,
)
from shardguard.daemon.roles import checks
from shardguard.daemon.roles.leader import Reporter
from shardguard.daemon.roles.state import Encoding, JobState, ProtectionState
from shardguard.daemon.storage.pieces import PieceFiles
from shardguard.daemon.storage.store import Store
from shardguard.daemon.transport.dataplane import DataPlane
from shardguard.daemon.transport.delivery import Delivery
from shardguard.proto import peer_pb2 as ppb
from shardguard.proto.meta import NodeLayout, PieceMeta, StripeReport, seal_token

logger = logging.getLogger(__name__)


class Encoder:
    """Encodes the stripes this node leads."""

    def __init__(self, store: Store, state: ProtectionState, pieces: PieceFiles, codecs: Codecs,
                 plane: DataPlane, delivery: Delivery, reporter: Reporter,
                 pool: concurrent.futures.Executor, stalls: Stalls, timeout_s: float) -> None:
        self.store, self.state, self.pieces, self.codecs = store, state, pieces, codecs
        self.plane, self.delivery, self.reporter = plane, delivery, reporter
        self.pool, self.stalls, self.timeout_s = pool, stalls, timeout_s

    def offer(self, req: ppb.OfferRequest) -> int:
        """A source's offer; blocks until the stripe's ``k`` sources have offered. Returns
        the stripe's piece size."""
        topo = checks.topology_of(self.store, req.job)
        checks.in_flight(self.store, req.job, req.step)
        if req.topology and req.topology != topo.describe():
            raise ConfigMismatchError(
                f"job {req.job}: node {req.node} protects it as {req.topology}, node "
                f"{topo.node_index} as {topo.describe()}: every node of a job must be given "
                f"the same node list and code")
        grp = checks.group_of(topo, req.group, req.stripe, req.index)
        if req.index >= grp.k:
            raise InvalidRequestError(f"offer of piece {req.index}: data pieces are 0..{grp.k - 1}")
        if req.node >= len(topo.nodes):
            raise InvalidRequestError(f"offer from node {req.node} of a {len(topo.nodes)}-node job")
        checks.piece_size(req.piece_bytes, self.store.budget_bytes, "piece_bytes")
        if req.real_bytes > req.piece_bytes:
            raise InvalidRequestError(f"real_bytes {req.real_bytes} > piece_bytes {req.piece_bytes}")
        if grp.nodes[grp.encoder(req.stripe)] != topo.node_index:
            raise InvalidRequestError(f"node {topo.node_index} does not encode group "
                                      f"{req.group} stripe {req.stripe}")
        NodeLayout.decode(req.layout)  # a layout that does not parse is refused now
        st = self.state.job(req.job)
        key = (req.step, req.group, req.stripe)
        voided = False
        with self.state.lock:
            if req.epoch < st.epoch:
                raise SupersededError(
                    f"job {req.job} step {req.step}: node {req.node}'s offer is of launch "
                    f"{req.epoch}; launch {st.epoch} of the job offers here now")
            if req.epoch > st.epoch:
                voided = self._void_older(req.job, st, req.epoch)
            enc = st.encodings.get(key)
            prev = enc.offers.get(req.index) if enc is not None else None
            if enc is not None and enc.ready.is_set() and prev is not None \
                    and prev.layout != req.layout:
                # The source sealed this step again (a relaunch resumed before it) while
                # the stripe was under way: it starts over from this offer; the old one's
                # frames are refused and its parity never reported.
                with enc.lock:
                    enc.superseded = True
                voided = True
                logger.info("group %d stripe %d: node %d sealed the step again; the stripe "
                            "starts over", req.group, req.stripe, req.node,
                            extra={"job": req.job, "step": req.step})
                enc = None
            if enc is None:
                enc = st.encodings[key] = Encoding(grp, req.stripe, req.epoch)
            enc.offers[req.index] = req  # a newer seal's offer replaces an older one
            enc.got.setdefault(req.index, 0)
            if len(enc.offers) == grp.k and not enc.ready.is_set():
                enc.piece_bytes = stripe_piece_bytes(o.piece_bytes for o in enc.offers.values())
                enc.sums = ParitySums(enc.piece_bytes,
                                      [o.real_bytes for o in enc.offers.values()], grp.m,
                                      pool=self.pool)
                enc.parity = [self.pieces.create(req.job, req.step, req.group, req.stripe,
                                                 grp.k + j, enc.piece_bytes, clear=False)
                              if j == 0 else self.pieces.scratch(req.job, req.group, req.stripe,
                                                                 j, enc.piece_bytes, clear=False)
                              for j in range(grp.m)]
                enc.ready.set()
        if voided:
            # Senders of the void stripes waiting in ``Received`` learn it now (frames
            # wake them only when a piece is complete); outside the state lock, which
            # they take under this condition.
            with self.state.arrived:
                self.state.arrived.notify_all()
        if not enc.ready.wait(self.timeout_s):
            raise PeerUnavailableError(
                f"job {req.job} step {req.step} group {req.group} stripe {req.stripe}: only "
                f"{len(enc.offers)} of {grp.k} sources offered")
        if enc.superseded or enc.offers.get(req.index) is not req:
            raise SupersededError(
                f"job {req.job} step {req.step} group {req.group} stripe {req.stripe} piece "
                f"{req.index} from node {req.node}: void, the stripe started over (a newer "
                f"seal or launch of the step)")
        return enc.piece_bytes

    def _void_older(self, job: str, st: JobState, epoch: int) -> bool:
        """A newer launch offers here: every encoding of an older one is void (its waiting
        offers are answered SupersededError, its frames refused, its parity unreported).
        Called under the state lock; whether any was."""
        st.epoch = epoch
        void = [key for key, enc in st.encodings.items() if enc.epoch < epoch]
        for key in void:
            enc = st.encodings.pop(key)
            with enc.lock:
                enc.superseded = True
            enc.ready.set()  # wakes its waiting offers: they see it is void
        if void:
            logger.info("launch %d of the job offers here: %d stripe(s) of older launches "
                        "void", epoch, len(void), extra={"job": job})
        return bool(void)

    def on_data(self, h: dict[str, Any], payload: memoryview) -> None:
        """A frame of a data piece (the data plane calls this on its thread)."""
        job, step, group, stripe = h["job"], int(h["step"]), int(h["group"]), int(h["stripe"])
        st = self.state.peek(job)
        enc = st.encodings.get((step, group, stripe)) if st is not None else None
        where = (job, step, group, stripe)
        if enc is not None and enc.finished:
            raise InvalidRequestError(f"stripe {where} is complete: no more data is taken")
        if enc is None or not enc.ready.is_set():
            raise InvalidRequestError(f"no encoding in progress for {where}")
        q, off, n = int(h["index"]), int(h["off"]), int(h["n"])
        topo = self.store.job(job).topology
        faults.point("mid-encode", step, topo.node_index if topo else None)
        offer = enc.offers.get(q)
        if offer is None or h.get("seal") != seal_token(offer.layout):
            raise SupersededError(f"frame of piece {q} of {where}: not the seal offered")
        if n != len(payload) or off < 0 or off + n > offer.real_bytes:
            raise InvalidRequestError(f"frame [{off}, +{n}) outside piece {q} of {where}")
        if n:
            codec, sums = self.codecs.get(enc.group.k, enc.group.m), enc.sums
            assert sums is not None  # made with the parity, before ready
            with enc.lock, self.store.metrics.encoding(job, n):
                if enc.superseded:
                    raise SupersededError(f"frame of piece {q} of {where}: the stripe started "
                                          f"over")
                for lo, hi, first in enc.coverage.take(off, n):
                    codec.encode_update(q, payload[lo - off:hi - off],
                                        [p[lo:hi] for p in enc.parity], first=first)
                    sums.folded(lo, hi, enc.parity)
        with self.state.arrived:
            enc.got[q] += n
            if enc.got[q] >= offer.real_bytes:  # its sender waits for the whole piece
                self.state.arrived.notify_all()
        self.store.metrics.bytes_received(job, "data", n)
        if all(enc.got.get(i) == o.real_bytes for i, o in enc.offers.items()) \
                and len(enc.offers) == enc.group.k and not enc.finished:
            enc.finished = True
            self.pool.submit(self._finish, job, step, enc)

    def _finish(self, job: str, step: int, enc: Encoding) -> None:
        group, stripe = enc.group.group, enc.stripe
        try:
            topo = checks.topology_of(self.store, job)
            grp = enc.group
            pieces = {q: PieceMeta(o.node, o.real_bytes, o.crc) for q, o in enc.offers.items()}
            for lo, hi in enc.coverage.gaps(enc.piece_bytes):  # past every source's end
                for par in enc.parity:
                    par[lo:hi] = 0
            faults.point("partial-parity", step, topo.node_index)
            assert enc.sums is not None
            for j, par in enumerate(enc.parity):
                if enc.superseded:
                    break  # no older parity goes out once the stripe started over
                holder = grp.nodes[grp.parity_holders(stripe)[j]]
                crc = enc.sums.crc(j, par)
                pieces[grp.k + j] = PieceMeta(holder, enc.piece_bytes, crc)
                if j:
                    self._forward(job, step, topo.nodes[holder], holder, group, stripe,
                                  grp.k + j, enc.piece_bytes, crc, par, enc.ident, enc.epoch)
            layouts = {o.node: NodeLayout.decode(o.layout) for o in enc.offers.values()}
            enc.parity[1:] = []
            if enc.superseded:  # a newer seal of the step took the stripe over
                logger.info("group %d stripe %d: started over; the older parity is not "
                            "reported", group, stripe, extra={"job": job, "step": step})
                return
            self.reporter.send(job, step, topo, StripeReport(group, stripe, enc.piece_bytes,
                                                             pieces, layouts, enc.epoch))
        except Exception as exc:  # noqa: BLE001
            logger.exception("group %d stripe %d: finishing failed", group, stripe,
                             extra={"job": job, "step": step})
            self.stalls.record_error(job, exc, f"finishing group {group} stripe {stripe} of "
                                               f"step {step}")

    def _forward(self, job: str, step: int, address: tuple[str, str], holder: int, group: int,
                 stripe: int, index: int, plen: int, crc: int, par: Any, encoding: int,
                 epoch: int) -> None:
        """Parity ``index >= k+1`` to its holder, until it says every byte arrived."""
        control, data = address
        where = ppb.ReceivedRequest(job=job, step=step, group=group, stripe=stripe, index=index)
        self.plane.push(data, b"parity", {"job": job, "step": step, "group": group,
                                           "stripe": stripe, "index": index, "plen": plen,
                                           "crc": crc, "encoding": encoding,
                                           "epoch": epoch}, [par.data],
                        delivered=lambda acked: self.delivery.confirm(
                            where, len(par), holder, control, data, acked))
        self.store.metrics.bytes_sent(job, "parity", len(par))

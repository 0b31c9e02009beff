"""Rebuilding a node's ranks from the survivors: a replacement node, moved ranks, corrupt bytes.

A rank's bytes at step S are a range of its old node's payload, which was cut
into ``k`` pieces, each a data piece of one stripe of the old node's group.
Each needed piece is fetched from the old node when it is alive and its
checksum holds; otherwise it is decoded from ``k`` surviving pieces of its
stripe (checksums checked; a corrupt piece counts as lost). More than ``m``
lost pieces of a stripe raise InsufficientPiecesError naming the group and
the missing nodes. Who holds what comes from roles/survey.py. A new daemon that
stands in for a lost node also recreates that node's parity pieces, so the
group is protected again at once.

Speed (issue 14, item 3: a rebuild runs at its transfer floor, the ``k`` pieces
fetched per lost piece): the pieces of a rebuild are worked on in parallel, up
to :data:`STRIPES_IN_FLIGHT` at a time, each stripe's ``k`` fetches at once; a
stripe is decoded range by range as its frames arrive (coding/stream.py),
from the received frames into a small buffer written with ``pwrite`` into the
slot or parity file (coding/dest.py: fresh tmpfs pages are then neither cleared
nor mapped first), and each frame's checksum is made as it lands, so no piece
is staged whole or read a second time; the slot is checked against its seal
from the CRCs its writes were made with.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time

from shardguard.daemon.base import faults
from shardguard.daemon.coding import placement
from shardguard.daemon.coding.codec import Codecs
from shardguard.daemon.coding.dest import Dest
from shardguard.daemon.coding.stream import StreamClosed
from shardguard.daemon.errors import (
    CorruptionError,
    NotRestorableError,
    PeerUnavailableError,
    UnknownJobError,
)
from shardguard.daemon.roles.rebuild_pieces import PieceSource, spawn, wait_all
from shardguard.daemon.roles.serve import PieceReader
from shardguard.daemon.roles.survey import LOCAL, Surveyor
from shardguard.daemon.storage.pieces import PieceFiles
from shardguard.daemon.storage.stepmeta import StepMetas
from shardguard.daemon.storage.store import Store
from shardguard.daemon.transport.dataplane import DataPlane
from shardguard.daemon.transport.peer_client import PeerClients
from shardguard.proto.meta import NodeLayout, StepMeta, Topology

logger = logging.getLogger(__name__)


#: Pieces a rebuild works on at once, each a fetch from its old node or a decode from
#: ``k`` fetches at once: two keep every peer sending while one piece waits for its
#: slowest source (the frames each holds are bounded by coding/stream.py's AHEAD_BYTES
#: and the data plane's FETCH_WINDOW_FRAMES).
STRIPES_IN_FLIGHT = 2


class Rebuilder:
    """One rebuild pass for one job on this node (this node as ``topo`` numbers it)."""

    def __init__(self, store: Store, metas: StepMetas, pieces: PieceFiles, reader: PieceReader,
                 peers: PeerClients, plane: DataPlane, codecs: Codecs,
                 pool: concurrent.futures.Executor, timeout_s: float, topo: Topology) -> None:
        self.store, self.metas, self.pieces, self.reader = store, metas, pieces, reader
        self.plane, self.codecs, self.pool, self.topo = plane, codecs, pool, topo
        self.surveyor = Surveyor(peers, metas, topo, timeout_s, self._holds)
        self._gate = threading.BoundedSemaphore(STRIPES_IN_FLIGHT)
        self.source = PieceSource(reader, plane, codecs, store.metrics)

    def run(self, job: str, world_size: int, local_ranks: list[int]) -> None:
        """Bring this node to the job's newest restorable step."""
        started = time.monotonic()
        newest = self.surveyor.newest(job)
        if newest is None:
            return
        step = newest.step
        need = [r for r in local_ranks if not self._holds(job, r, step)]
        survey = self.surveyor.survey(newest)
        todo = []
        for rank in need:
            try:
                meta, _, _ = newest.owner_of(rank)
            except LookupError:
                raise NotRestorableError(
                    f"job {job} step {step}: no node that answered holds the metadata of the "
                    f"group of rank {rank} (more than its parity lost?)") from None
            todo.append((rank, meta))
        keep = todo[0][1] if todo else None
        held, replaced, lost_meta = survey.own, None, None
        code = next(iter(newest.metas.values())).code
        groups = placement.placement_of(code).groups
        if held is None:
            old = {n: a for m in newest.metas.values() for n, a in m.members.items()}
            replaced = survey.stand_in(code.nodes, old, list(self.topo.nodes),
                                       self.topo.node_index)
            lost_meta = newest.meta_of_node(replaced, groups) if replaced is not None else None
            if lost_meta is None:
                replaced = None
        elif (mine := newest.meta_of_node(held, groups)) is not None:
            keep = mine
        # The ranks and the lost node's parity at once: their pieces share the gate.
        abort = threading.Event()
        ranks = [spawn(self.rebuild_rank, job, meta, rank, world_size, local_ranks,
                        survey.alive, False, abort) for rank, meta in todo]
        for fut in ranks:
            fut.add_done_callback(lambda f: f.exception() is not None and abort.set())
        try:
            if lost_meta is not None and replaced is not None:
                keep = self._recreate_parity(job, lost_meta, replaced, survey.alive, abort)
                held = replaced
        except BaseException as exc:
            abort.set()
            concurrent.futures.wait(ranks)
            # A rank's own error first, as when the ranks came first; not a rank that
            # stopped because the parity's failure aborted it.
            own = [e for f in ranks if (e := f.exception()) is not None
                   and not isinstance(e, StreamClosed)]
            if own:
                raise own[0] from None
            raise exc
        wait_all(ranks, abort)
        self.metas.save(keep or next(iter(newest.metas.values())), held)
        self.store.set_restorable(job, step)
        if need or replaced is not None:
            took = time.monotonic() - started
            self.store.metrics.rebuild_pass(job, took)
            logger.info("rebuilt ranks %s%s in %.3f s", need,
                        f" and the parity of node {replaced}" if replaced is not None else "",
                        took, extra={"job": job, "step": step, "node": self.topo.node_index})

    def _recreate_parity(self, job: str, meta: StepMeta, node: int,
                         alive: dict[int, str], abort: threading.Event) -> StepMeta:
        """Decode the parity pieces the lost node held, so the group is protected again."""
        grp = placement.placement_of(meta.code).groups[meta.group]
        others = {i: a for i, a in alive.items() if i != node}
        futs, outs = [], []
        try:
            for ref in grp.parity_pieces(grp.position(node)):
                info = meta.stripes[(grp.group, ref.stripe)]
                outs.append(self.pieces.create_dest(job, meta.step, grp.group, ref.stripe,
                                                    ref.index, info.plen))
                futs.append(spawn(self._parity_into, job, meta, grp, ref.stripe, ref.index,
                                  others, outs[-1], abort))
            wait_all(futs, abort)
        except BaseException:
            abort.set()
            raise
        finally:
            concurrent.futures.wait(futs)  # none writes into a destination closed under it
            for out in outs:
                out.close()
        # This daemon now serves the lost node's pieces: point the metadata at it.
        return meta.with_member(node, self.topo.me)

    def _parity_into(self, job: str, meta: StepMeta, grp: placement.GroupLayout, stripe: int,
                     index: int, alive: dict[int, str], out: Dest,
                     abort: threading.Event) -> None:
        n = meta.stripes[(grp.group, stripe)].pieces[index].len
        with self._gate:
            # Decoded a range at a time and written into the parity file (coding/dest.py).
            self.source.decode_into(job, meta, grp, stripe, index, alive, out.part(0, n), 0, n,
                                    abort)
        self.store.metrics.rebuilt(job, n)

    def repair(self, job: str, meta: StepMeta, rank: int, world_size: int,
               local_ranks: list[int]) -> None:
        """Rebuild ``rank``'s slot of the meta's step from its stripes, not reading this
        daemon's own pieces (its bytes failed their checksum)."""
        newest = self.surveyor.newest(job)
        alive = self.surveyor.survey(newest).alive if newest is not None \
            and newest.step == meta.step else {}
        self.rebuild_rank(job, meta, rank, world_size, local_ranks, alive, distrust_self=True)

    def _holds(self, job: str, rank: int, step: int) -> bool:
        try:
            self.store.sealed_slot(job, rank, step)
            return True
        except (UnknownJobError, NotRestorableError):
            return False

    # ---------------------------------------------------------------- ranks

    def rebuild_rank(self, job: str, meta: StepMeta, rank: int, world_size: int,
                     local_ranks: list[int], alive: dict[int, str],
                     distrust_self: bool = False, abort: threading.Event | None = None) -> None:
        """Put ``rank``'s snapshot of the meta's step into this node's store (``meta``: the
        metadata of the rank's group). ``distrust_self``: this daemon's own pieces are not
        read (its bytes failed). ``abort``: set when the rest of the rebuild failed."""
        try:
            owner, entry = meta.owner_of(rank)
        except LookupError:
            raise NotRestorableError(f"job {job} step {meta.step} holds no rank {rank}") from None
        lay = meta.layouts[owner]
        if distrust_self:
            alive = {i: a for i, a in alive.items() if a != LOCAL}

        def fill(slot: Dest) -> None:
            # Into the slot as the pieces arrive: no staging copy of the rank's bytes.
            self._read_into(slot.part(0, entry.used), job, meta, owner, lay, entry.off, alive,
                            abort or threading.Event())

        self.store.install(job, world_size, local_ranks, rank, entry.slot_bytes, entry.record, fill)
        self.store.metrics.rebuilt(job, entry.used)

    def _read_into(self, out: Dest, job: str, meta: StepMeta, owner: int,
                   lay: NodeLayout, off: int, alive: dict[int, str],
                   abort: threading.Event) -> None:
        """Bytes [off, off+len(out)) of old node ``owner``'s payload, into ``out``: its
        pieces at once (as many as the gate lets through), each straight into its range."""
        grp = placement.placement_of(meta.code).groups[meta.group]
        n, pos, futs = len(out), off, []
        while pos < off + n:
            q = pos // lay.plen
            stripe = (grp.position(owner) - grp.m - q) % grp.g
            want = meta.stripes[(grp.group, stripe)].pieces[q]
            lo = pos - q * lay.plen
            take = min(off + n - pos, want.len - lo)
            if take <= 0:
                raise CorruptionError(f"job {job} step {meta.step}: piece {q} of node {owner} "
                                      f"({want.len} bytes) ends before byte {lo} of it")
            futs.append(spawn(self._piece_into, job, meta, grp, owner, q, stripe, alive,
                               out.part(pos - off, pos - off + take), lo, abort))
            pos += take
        wait_all(futs, abort,
                  each=lambda: faults.point("mid-rebuild", meta.step, self.topo.node_index))

    # --------------------------------------------------------------- pieces

    def _piece_into(self, job: str, meta: StepMeta, grp: placement.GroupLayout, owner: int,
                    q: int, stripe: int, alive: dict[int, str], dest: Dest, dest_off: int,
                    abort: threading.Event) -> None:
        """Bytes [dest_off, dest_off+len(dest)) of old node ``owner``'s data piece ``q``:
        from the node itself when it is alive and its bytes hold, else decoded."""
        want = meta.stripes[(grp.group, stripe)].pieces[q]
        with self._gate:
            if abort.is_set():
                raise StreamClosed("rebuild aborted")
            if owner in alive:
                try:
                    self.source.fetch_into(job, meta, alive, grp.group, stripe, q, want, dest, dest_off)
                    return
                except (PeerUnavailableError, CorruptionError) as exc:
                    logger.warning("piece %d of node %d unusable (%s); decoding it", q, owner, exc,
                                   extra={"job": job, "step": meta.step, "peer": owner})
            self.source.decode_into(job, meta, grp, stripe, q,
                              {i: a for i, a in alive.items() if i != owner}, dest, dest_off,
                              want.len, abort)

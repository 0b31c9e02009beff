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
straight from the received frames into the slot or parity file, and each
frame's checksum is made as it lands, so nothing is staged, copied or read a
second time.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from typing import Any, Callable

import numpy as np

from shardguard.daemon.base import faults
from shardguard.daemon.coding import placement
from shardguard.daemon.coding.checksum import crc32c
from shardguard.daemon.coding.codec import Codecs
from shardguard.daemon.coding.stream import StreamClosed, StripeStream
from shardguard.daemon.errors import (
    CorruptionError,
    InsufficientPiecesError,
    NotRestorableError,
    PeerUnavailableError,
    ShardguardError,
    UnknownJobError,
)
from shardguard.daemon.roles.serve import PieceReader
from shardguard.daemon.roles.survey import LOCAL, Surveyor
from shardguard.daemon.storage.pieces import PieceFiles
from shardguard.daemon.storage.stepmeta import StepMetas
from shardguard.daemon.storage.store import SlotRecord, Store
from shardguard.daemon.transport.dataplane import DataPlane
from shardguard.daemon.transport.peer_client import PeerClients
from shardguard.proto.arena import SlotState
from shardguard.proto.meta import NodeLayout, PieceMeta, StepMeta, Topology

logger = logging.getLogger(__name__)


#: Pieces a rebuild works on at once, each a fetch from its old node or a decode from
#: ``k`` fetches at once: two keep every peer sending while one piece waits for its
#: slowest source (the frames each holds are bounded by coding/stream.py's AHEAD_BYTES
#: and the data plane's FETCH_WINDOW_FRAMES).
STRIPES_IN_FLIGHT = 2


def _spawn(fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
    """Run ``fn(*args)`` in a thread of its own (a few per rebuild: no pool to deadlock)."""
    fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def main() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            fut.set_exception(exc)

    threading.Thread(target=main, name="sg-rebuild", daemon=True).start()
    return fut


def _wait_all(futs: list[concurrent.futures.Future[Any]], abort: threading.Event,
              each: Callable[[], None] | None = None) -> list[Any]:
    """Results of ``futs`` in order. On the first error ``abort`` is set, every future is
    waited for (none may still write into the destination), and the error of the first
    future in order that failed for a reason of its own (not the abort) is raised, as a
    serial rebuild would have. ``each`` runs here after each future that succeeded."""
    failed = False
    for fut in concurrent.futures.as_completed(futs):
        if fut.exception() is not None:
            failed = True
            abort.set()
        elif each is not None and not failed:
            try:
                each()
            except BaseException:
                abort.set()
                concurrent.futures.wait(futs)
                raise
    if failed:
        errors = [f.exception() for f in futs if f.exception() is not None]
        raise next((e for e in errors if not isinstance(e, StreamClosed)), errors[0])
    return [f.result() for f in futs]


class Rebuilder:
    """One rebuild pass for one job on this node (this node as ``topo`` numbers it)."""

    def __init__(self, store: Store, metas: StepMetas, pieces: PieceFiles, reader: PieceReader,
                 peers: PeerClients, plane: DataPlane, codecs: Codecs,
                 pool: concurrent.futures.Executor, timeout_s: float, topo: Topology) -> None:
        self.store, self.metas, self.pieces, self.reader = store, metas, pieces, reader
        self.plane, self.codecs, self.pool, self.topo = plane, codecs, pool, topo
        self.surveyor = Surveyor(peers, metas, topo, timeout_s, self._holds)
        self._gate = threading.BoundedSemaphore(STRIPES_IN_FLIGHT)

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
        ranks = [_spawn(self.rebuild_rank, job, meta, rank, world_size, local_ranks,
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
        _wait_all(ranks, abort)
        self.metas.save(keep or next(iter(newest.metas.values())), held)
        self.store.set_restorable(job, step)
        if need or replaced is not None:
            self.store.metrics.rebuild_pass(job, time.monotonic() - started)
            logger.info("rebuilt ranks %s%s", need,
                        f" and the parity of node {replaced}" if replaced is not None else "",
                        extra={"job": job, "step": step, "node": self.topo.node_index})

    def _recreate_parity(self, job: str, meta: StepMeta, node: int,
                         alive: dict[int, str], abort: threading.Event) -> StepMeta:
        """Decode the parity pieces the lost node held, so the group is protected again."""
        grp = placement.placement_of(meta.code).groups[meta.group]
        others = {i: a for i, a in alive.items() if i != node}
        futs = []
        for ref in grp.parity_pieces(grp.position(node)):
            info = meta.stripes[(grp.group, ref.stripe)]
            out = self.pieces.create(job, meta.step, grp.group, ref.stripe, ref.index, info.plen)
            futs.append(_spawn(self._parity_into, job, meta, grp, ref.stripe, ref.index, others,
                               out, abort))
        _wait_all(futs, abort)
        # This daemon now serves the lost node's pieces: point the metadata at it.
        return meta.with_member(node, self.topo.me)

    def _parity_into(self, job: str, meta: StepMeta, grp: placement.GroupLayout, stripe: int,
                     index: int, alive: dict[int, str], out: np.ndarray,
                     abort: threading.Event) -> None:
        n = meta.stripes[(grp.group, stripe)].pieces[index].len
        with self._gate:
            # Decoded straight into the parity file: no staging copy.
            self._decode_into(job, meta, grp, stripe, index, alive, out[:n], 0, n, abort)
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
        r = entry.record
        record = SlotRecord(SlotState(r.state), r.step, r.data_bytes, r.manifest_offset,
                            r.manifest_bytes, r.data_crc, r.manifest_crc, r.generation)

        def fill(view: memoryview) -> None:
            # Straight into the slot: no staging copy of the rank's bytes.
            self._read_into(np.frombuffer(view, dtype=np.uint8, count=entry.used), job, meta,
                            owner, lay, entry.off, alive, abort or threading.Event())

        self.store.install(job, world_size, local_ranks, rank, entry.slot_bytes, record, fill)
        self.store.metrics.rebuilt(job, entry.used)

    def _read_into(self, out: np.ndarray, job: str, meta: StepMeta, owner: int,
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
            futs.append(_spawn(self._piece_into, job, meta, grp, owner, q, stripe, alive,
                               out[pos - off:pos - off + take], lo, abort))
            pos += take
        _wait_all(futs, abort,
                  each=lambda: faults.point("mid-rebuild", meta.step, self.topo.node_index))

    # --------------------------------------------------------------- pieces

    def _piece_into(self, job: str, meta: StepMeta, grp: placement.GroupLayout, owner: int,
                    q: int, stripe: int, alive: dict[int, str], dest: np.ndarray, dest_off: int,
                    abort: threading.Event) -> None:
        """Bytes [dest_off, dest_off+len(dest)) of old node ``owner``'s data piece ``q``:
        from the node itself when it is alive and its bytes hold, else decoded."""
        want = meta.stripes[(grp.group, stripe)].pieces[q]
        with self._gate:
            if abort.is_set():
                raise StreamClosed("rebuild aborted")
            if owner in alive:
                try:
                    self._fetch_into(job, meta, alive, grp.group, stripe, q, want, dest, dest_off)
                    return
                except (PeerUnavailableError, CorruptionError) as exc:
                    logger.warning("piece %d of node %d unusable (%s); decoding it", q, owner, exc,
                                   extra={"job": job, "step": meta.step, "peer": owner})
            self._decode_into(job, meta, grp, stripe, q,
                              {i: a for i, a in alive.items() if i != owner}, dest, dest_off,
                              want.len, abort)

    def _fetch_into(self, job: str, meta: StepMeta, alive: dict[int, str], group: int,
                    stripe: int, index: int, want: PieceMeta, dest: np.ndarray,
                    dest_off: int) -> None:
        """A piece as its holder has it, bytes [dest_off, ...) copied into ``dest`` as they
        arrive and checksummed on the way."""
        what = (f"job {job} step {meta.step} group {group} stripe {stripe} piece {index} from "
                f"node {want.node}")
        crc, pos = 0, 0

        def land(off: int, part: Any, total: int | None = None) -> None:
            nonlocal crc, pos
            arr = np.frombuffer(part, dtype=np.uint8)
            if off != pos or pos + arr.size > want.len:
                raise CorruptionError(f"{what}: bytes [{off}, {off + arr.size}) arrived out of "
                                      f"order or past the {want.len}-byte piece")
            crc = crc32c(arr, crc)
            lo, hi = max(off, dest_off), min(off + arr.size, dest_off + len(dest))
            if lo < hi:
                dest[lo - dest_off:hi - dest_off] = arr[lo - off:hi - off]
            pos += arr.size

        if alive[want.node] == LOCAL:
            for buf in self._read_local(job, meta, group, stripe, index):
                land(pos, buf)
            got = pos
        else:
            hdr = {"job": job, "step": meta.step, "group": group, "stripe": stripe,
                   "index": index, "req": f"{group}/{stripe}/{index}"}
            got = self.plane.fetch_frames(alive[want.node], hdr, land)
            self.store.metrics.bytes_received(job, "fetch", got)
        if got != want.len:
            raise CorruptionError(f"node {want.node} sent {got} bytes of a {want.len}-byte piece")
        if crc != want.crc:
            raise CorruptionError(f"{what}: checksum fails")

    def _read_local(self, job: str, meta: StepMeta, group: int, stripe: int,
                    index: int) -> list[memoryview]:
        """A piece this daemon holds, read in place."""
        try:
            return self.reader.read(job, meta.step, group, stripe, index, meta)
        except (OSError, ShardguardError) as exc:
            raise PeerUnavailableError(f"own piece {group}/{stripe}/{index}: {exc}") from None

    def _decode_into(self, job: str, meta: StepMeta, grp: placement.GroupLayout, stripe: int,
                     q: int, alive: dict[int, str], dest: np.ndarray, dest_off: int,
                     length: int, abort: threading.Event) -> None:
        """Piece ``q`` of a stripe decoded from ``k`` others as they arrive: its bytes
        [dest_off, dest_off+len(dest)) into ``dest`` (the rest only checksummed).

        The ``k`` pieces are chosen by placement (data pieces first, those of nodes
        that answered); a piece that cannot be fetched or fails its checksum is
        replaced by the next one and the piece decoded again.
        """
        info = meta.stripes[(grp.group, stripe)]
        lost = [p for p, node in enumerate(grp.nodes) if node not in alive]
        try:
            first = [i for i in grp.rebuild_sources(stripe, lost) if i != q]
        except InsufficientPiecesError:
            first = []  # the check below names what is missing
        candidates = first + [i for i in range(grp.k + grp.m) if i != q and i not in first]
        missing = [info.pieces[i].node for i in candidates if info.pieces[i].node not in alive]
        usable = [i for i in candidates if info.pieces[i].node in alive]
        while True:
            if len(usable) < grp.k:
                gone = sorted(set(missing) | {info.pieces[q].node})
                raise InsufficientPiecesError(
                    f"job {job} step {meta.step}: group {grp.group} cannot be rebuilt: nodes "
                    f"{gone} are lost or hold corrupt pieces, and its parity covers {grp.m}")
            stream = self._stream(job, meta, grp.group, stripe, q, usable[:grp.k], alive,
                                  grp.k, grp.m, dest, dest_off, length)
            bad = stream.run(abort)
            if not bad:
                break
            if abort.is_set():
                raise StreamClosed("rebuild aborted")
            for idx, exc in sorted(bad.items()):
                if not isinstance(exc, (PeerUnavailableError, CorruptionError)):
                    raise exc
                node = info.pieces[idx].node
                logger.warning("stripe %d piece %d from node %d unusable: %s", stripe, idx,
                               node, exc, extra={"job": job, "step": meta.step, "peer": node})
                missing.append(node)
                usable.remove(idx)
        if stream.crc != info.pieces[q].crc:
            raise CorruptionError(f"job {job} step {meta.step}: decoded piece {q} of stripe "
                                  f"{stripe}: checksum fails")

    def _stream(self, job: str, meta: StepMeta, group: int, stripe: int, q: int,
                use: list[int], alive: dict[int, str], k: int, m: int, dest: np.ndarray,
                dest_off: int, length: int) -> StripeStream:
        """A stream decoding piece ``q`` from the pieces ``use``, their fetches started."""
        info = meta.stripes[(group, stripe)]
        stream = StripeStream(self.codecs.get(k, m),
                              {i: (info.pieces[i].len, info.pieces[i].crc) for i in use}, q,
                              length, info.plen, dest, dest_off)
        local = []
        for idx in use:
            address = alive[info.pieces[idx].node]
            if address == LOCAL:
                local.append(idx)
            else:
                _spawn(self._feed, stream, job, meta.step, address, group, stripe, idx)
        for idx in local:  # this node's own pieces, read in place
            try:
                bufs, at = self._read_local(job, meta, group, stripe, idx), 0
                for buf in bufs:
                    stream.feed(idx, at, buf)
                    at += len(buf)
            except (PeerUnavailableError, StreamClosed) as exc:
                stream.fail(idx, exc)
            else:
                stream.done(idx, at)
        return stream

    def _feed(self, stream: StripeStream, job: str, step: int, address: str, group: int,
              stripe: int, index: int) -> None:
        """Fetch a piece into ``stream`` frame by frame (a thread per source)."""
        hdr = {"job": job, "step": step, "group": group, "stripe": stripe, "index": index,
               "req": f"{group}/{stripe}/{index}"}
        try:
            got = self.plane.fetch_frames(address, hdr,
                                          lambda off, part, total: stream.feed(index, off, part))
        except StreamClosed:
            return  # not wanted any more (decoded, or given up)
        except BaseException as exc:  # noqa: BLE001 - the stream's run() reports it
            stream.fail(index, exc)
            return
        self.store.metrics.bytes_received(job, "fetch", got)
        stream.done(index, got)

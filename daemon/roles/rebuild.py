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
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time

import numpy as np

from shardguard.daemon.base import faults
from shardguard.daemon.coding import placement
from shardguard.daemon.coding.checksum import crc_of
from shardguard.daemon.coding.codec import Codecs
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


class _Buffers:
    """Piece buffers reused across the stripes of one rebuild.

    Writing into fresh memory runs at 1-3 GB/s here (the kernel's fault and zero),
    slower than fetching and decoding: a rebuild touches new pages only once.
    """

    def __init__(self) -> None:
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()  # the pieces of a stripe are fetched in parallel

    def take(self, size: int) -> np.ndarray:
        with self._lock:
            for i, buf in enumerate(self._free):
                if len(buf) >= size:
                    return self._free.pop(i)[:size]
        return np.zeros(size, dtype=np.uint8)[:size]

    def give(self, view: np.ndarray) -> None:
        base = view.base if isinstance(view.base, np.ndarray) else view
        with self._lock:
            self._free.append(base)


class Rebuilder:
    """One rebuild pass for one job on this node (this node as ``topo`` numbers it)."""

    def __init__(self, store: Store, metas: StepMetas, pieces: PieceFiles, reader: PieceReader,
                 peers: PeerClients, plane: DataPlane, codecs: Codecs,
                 pool: concurrent.futures.Executor, timeout_s: float, topo: Topology) -> None:
        self.store, self.metas, self.pieces, self.reader = store, metas, pieces, reader
        self.plane, self.codecs, self.pool, self.topo = plane, codecs, pool, topo
        self.surveyor = Surveyor(peers, metas, topo, timeout_s, self._holds)
        self._bufs = _Buffers()

    def run(self, job: str, world_size: int, local_ranks: list[int]) -> None:
        """Bring this node to the job's newest restorable step."""
        started = time.monotonic()
        newest = self.surveyor.newest(job)
        if newest is None:
            return
        step = newest.step
        need = [r for r in local_ranks if not self._holds(job, r, step)]
        survey = self.surveyor.survey(newest)
        keep = None
        for rank in need:
            try:
                meta, _, _ = newest.owner_of(rank)
            except LookupError:
                raise NotRestorableError(
                    f"job {job} step {step}: no node that answered holds the metadata of the "
                    f"group of rank {rank} (more than its parity lost?)") from None
            self.rebuild_rank(job, meta, rank, world_size, local_ranks, survey.alive)
            keep = keep or meta
        held, replaced = survey.own, None
        code = next(iter(newest.metas.values())).code
        groups = placement.placement_of(code).groups
        if held is None:
            old = {n: a for m in newest.metas.values() for n, a in m.members.items()}
            replaced = survey.stand_in(code.nodes, old, list(self.topo.nodes),
                                       self.topo.node_index)
            meta = newest.meta_of_node(replaced, groups) if replaced is not None else None
            if meta is not None:
                keep = self._recreate_parity(job, meta, replaced, survey.alive)
                held = replaced
            else:
                replaced = None
        elif (mine := newest.meta_of_node(held, groups)) is not None:
            keep = mine
        self.metas.save(keep or next(iter(newest.metas.values())), held)
        self.store.set_restorable(job, step)
        if need or replaced is not None:
            self.store.metrics.rebuild_pass(job, time.monotonic() - started)
            logger.info("rebuilt ranks %s%s", need,
                        f" and the parity of node {replaced}" if replaced is not None else "",
                        extra={"job": job, "step": step, "node": self.topo.node_index})

    def _recreate_parity(self, job: str, meta: StepMeta, node: int,
                         alive: dict[int, str]) -> StepMeta:
        """Decode the parity pieces the lost node held, so the group is protected again."""
        grp = placement.placement_of(meta.code).groups[meta.group]
        for ref in grp.parity_pieces(grp.position(node)):
            plen = meta.stripes[(grp.group, ref.stripe)].plen
            out = self.pieces.create(job, meta.step, grp.group, ref.stripe, ref.index, plen)
            # Decoded straight into the parity file: no staging copy.
            piece = self._decode(job, meta, grp, ref.stripe, ref.index,
                                 {i: a for i, a in alive.items() if i != node}, into=out)
            self.store.metrics.rebuilt(job, len(piece))
        # This daemon now serves the lost node's pieces: point the metadata at it.
        return meta.with_member(node, self.topo.me)

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
                     distrust_self: bool = False) -> None:
        """Put ``rank``'s snapshot of the meta's step into this node's store (``meta``: the
        metadata of the rank's group). ``distrust_self``: this daemon's own pieces are not
        read (its bytes failed)."""
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
                            owner, lay, entry.off, alive)

        self.store.install(job, world_size, local_ranks, rank, entry.slot_bytes, record, fill)
        self.store.metrics.rebuilt(job, entry.used)

    def _read_into(self, out: np.ndarray, job: str, meta: StepMeta, owner: int,
                   lay: NodeLayout, off: int, alive: dict[int, str]) -> None:
        """Bytes [off, off+len(out)) of old node ``owner``'s payload, into ``out``."""
        n, pos = len(out), off
        while pos < off + n:
            q = pos // lay.plen
            piece = self._data_piece(job, meta, owner, q, alive)
            lo = pos - q * lay.plen
            take = min(off + n - pos, len(piece) - lo)
            out[pos - off:pos - off + take] = piece[lo:lo + take]
            self._bufs.give(piece)
            pos += take
            faults.point("mid-rebuild", meta.step, self.topo.node_index)

    # --------------------------------------------------------------- pieces

    def _data_piece(self, job: str, meta: StepMeta, owner: int, q: int,
                    alive: dict[int, str]) -> np.ndarray:
        grp = placement.placement_of(meta.code).groups[meta.group]
        stripe = (grp.position(owner) - grp.m - q) % grp.g
        want = meta.stripes[(grp.group, stripe)].pieces[q]
        if owner in alive:
            try:
                return self._fetch(job, meta, alive, grp.group, stripe, q, want, want.len)
            except (PeerUnavailableError, CorruptionError) as exc:
                logger.warning("piece %d of node %d unusable (%s); decoding it", q, owner, exc,
                               extra={"job": job, "step": meta.step, "peer": owner})
        return self._decode(job, meta, grp, stripe, q,
                            {i: a for i, a in alive.items() if i != owner})

    def _fetch(self, job: str, meta: StepMeta, alive: dict[int, str], group: int,
               stripe: int, index: int, want: PieceMeta, size: int) -> np.ndarray:
        out = self._bufs.take(size)
        hdr = {"job": job, "step": meta.step, "group": group, "stripe": stripe,
               "index": index, "req": f"{group}/{stripe}/{index}"}
        try:
            if alive[want.node] == LOCAL:
                got = self._read_local(job, meta, group, stripe, index, out)
            else:
                got = self.plane.fetch(alive[want.node], hdr, out)
                self.store.metrics.bytes_received(job, "fetch", got)
            if got != want.len:
                raise CorruptionError(
                    f"node {want.node} sent {got} bytes of a {want.len}-byte piece")
            _verify_piece([out[:got].data], want,
                          f"job {job} step {meta.step} group {group} stripe {stripe} "
                          f"piece {index} from node {want.node}")
        except BaseException:
            self._bufs.give(out)
            raise
        out[got:] = 0  # a reused buffer: the padding of a short piece must read as zeros
        return out

    def _read_local(self, job: str, meta: StepMeta, group: int, stripe: int, index: int,
                    out: np.ndarray) -> int:
        """A piece this daemon holds, copied into ``out``; returns its length."""
        try:
            bufs = self.reader.read(job, meta.step, group, stripe, index, meta)
        except (OSError, ShardguardError) as exc:
            raise PeerUnavailableError(f"own piece {group}/{stripe}/{index}: {exc}") from None
        at = 0
        for b in bufs:
            if at + len(b) > len(out):
                raise CorruptionError(f"own piece {group}/{stripe}/{index} is longer than "
                                      f"{len(out)} bytes")
            out[at:at + len(b)] = np.frombuffer(b, dtype=np.uint8)
            at += len(b)
        return at

    def _decode(self, job: str, meta: StepMeta, grp: placement.GroupLayout, stripe: int,
                q: int, alive: dict[int, str], into: np.ndarray | None = None) -> np.ndarray:
        """Piece ``q`` of a stripe from ``k`` others: a pooled buffer, or ``into`` (plen bytes).

        The ``k`` pieces are chosen by placement (data pieces first, those of nodes
        that answered); a piece that cannot be fetched or fails its checksum is
        replaced by the next one.
        """
        info = meta.stripes[(grp.group, stripe)]
        have: dict[int, np.ndarray] = {}
        missing: list[int] = []
        lost = [p for p, node in enumerate(grp.nodes) if node not in alive]
        try:
            first = [i for i in grp.rebuild_sources(stripe, lost) if i != q]
        except InsufficientPiecesError:
            first = []  # the fetches below name what is missing
        candidates = first + [i for i in range(grp.k + grp.m) if i != q and i not in first]
        # The k pieces come from k different nodes: fetched at once, not one after another.
        while len(have) < grp.k and candidates:
            batch, candidates = candidates[:grp.k - len(have)], candidates[grp.k - len(have):]
            futs = {}
            for idx in batch:
                want = info.pieces[idx]
                if want.node not in alive:
                    missing.append(want.node)
                    continue
                futs[idx] = self.pool.submit(self._fetch, job, meta, alive, grp.group, stripe,
                                             idx, want, info.plen)
            for idx, fut in futs.items():
                node = info.pieces[idx].node
                try:
                    have[idx] = fut.result()
                except (PeerUnavailableError, CorruptionError) as exc:
                    logger.warning("stripe %d piece %d from node %d unusable: %s", stripe, idx,
                                   node, exc, extra={"job": job, "step": meta.step, "peer": node})
                    missing.append(node)
        if len(have) < grp.k:
            for buf in have.values():
                self._bufs.give(buf)
            gone = sorted(set(missing) | {info.pieces[q].node})
            raise InsufficientPiecesError(
                f"job {job} step {meta.step}: group {grp.group} cannot be rebuilt: nodes "
                f"{gone} are lost or hold corrupt pieces, and its parity covers {grp.m}")
        out = self._bufs.take(info.plen) if into is None else into
        try:
            self.codecs.get(grp.k, grp.m).decode(have, {q: out})
        finally:
            for buf in have.values():
                self._bufs.give(buf)
        want = info.pieces[q]
        real = out[:want.len]
        try:
            _verify_piece([real.data], want, f"decoded piece {q} of stripe {stripe}")
        except BaseException:
            if into is None:
                self._bufs.give(out)
            raise
        return real


def _verify_piece(bufs: list[memoryview], want: PieceMeta, what: str) -> None:
    if crc_of(bufs) != want.crc:
        raise CorruptionError(f"{what}: checksum fails")

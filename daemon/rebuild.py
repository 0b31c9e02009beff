"""Rebuilding a node's ranks from the survivors: a replacement node, moved ranks, corrupt bytes.

A rank's bytes at step S are a range of its old node's payload, which was cut
into ``k`` pieces, each a data piece of one stripe of the old node's group.
Each needed piece is fetched from the old node when it is alive and its
checksum holds; otherwise it is decoded from ``k`` surviving pieces of its
stripe (checksums checked; a corrupt piece counts as lost). More than ``m``
lost pieces of a stripe raise InsufficientPiecesError naming the group and
the missing nodes.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from shardguard.daemon.errors import (
    CorruptionError,
    InsufficientPiecesError,
    NotRestorableError,
    PeerUnavailableError,
    UnknownJobError,
)
from shardguard.daemon import faults
from shardguard.daemon.protect import Topology
from shardguard.daemon.store import SlotRecord
from shardguard.proto import peer_pb2 as ppb
from shardguard.proto.arena import SlotState

if TYPE_CHECKING:
    from shardguard.daemon.protect import Protector

logger = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 3.0
#: Nodes asked at once for their step (StepInfo) when a node catches up.
PROBE_THREADS = 32


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
    """One rebuild pass for one job on this node."""

    def __init__(self, protector: "Protector", topo: Topology) -> None:
        self.p = protector
        self.store = protector.store
        self.topo = topo
        self._bufs = _Buffers()

    def run(self, job: str, world_size: int, local_ranks: list[int]) -> None:
        started = time.monotonic()
        meta = self._newest_meta(job)
        if meta is None:
            return
        step = int(meta["step"])
        need = [r for r in local_ranks if not self._holds(job, r, step)]
        replaced = None
        if need:
            alive = self._alive(meta)
            for rank in need:
                self.rebuild_rank(job, meta, rank, world_size, local_ranks, alive)
            replaced = self._replaced_node(meta, alive)
            if replaced is not None:
                meta = self._recreate_parity(job, meta, replaced, alive)
        self.p._save_meta(job, step, meta)
        self.store.set_restorable(job, step)
        if need:
            self.store.metrics.rebuild_pass(job, time.monotonic() - started)
            logger.info("rebuilt ranks %s%s", need,
                        f" and the parity of node {replaced}" if replaced is not None else "",
                        extra={"job": job, "step": step, "node": self.topo.node_index})

    def _replaced_node(self, meta: dict[str, Any], alive: dict[int, str]) -> int | None:
        """The old node this daemon stands in for: same index, same node count, and gone."""
        old = Topology.from_doc(meta["topology"])
        me = self.topo.node_index
        if len(old.nodes) != len(self.topo.nodes) or me in alive \
                or old.nodes[me] == self.topo.nodes[me]:
            return None
        return me

    def _recreate_parity(self, job: str, meta: dict[str, Any], node: int,
                         alive: dict[int, str]) -> dict[str, Any]:
        """Decode the parity pieces the lost node held, so the group is protected again."""
        old = Topology.from_doc(meta["topology"])
        grp = old.placement.group_of(node)
        for ref in grp.parity_pieces(grp.position(node)):
            plen = int(meta["stripes"][f"{grp.group}/{ref.stripe}"]["plen"])
            out = self.p._piece_file(job, int(meta["step"]), grp.group, ref.stripe, ref.index,
                                     plen)
            # Decoded straight into the parity file: no staging copy.
            piece = self._decode(job, meta, old, grp, ref.stripe, ref.index, alive, into=out)
            self.store.metrics.rebuilt(job, len(piece))
        # This daemon now serves the lost node's pieces: point the metadata at it.
        nodes = [list(n) for n in meta["topology"]["nodes"]]
        nodes[node] = list(self.topo.nodes[self.topo.node_index])
        return {**meta, "topology": {**meta["topology"], "nodes": nodes}}

    def _holds(self, job: str, rank: int, step: int) -> bool:
        try:
            self.store.sealed_slot(job, rank, step)
            return True
        except (UnknownJobError, NotRestorableError):
            return False

    def _step_infos(self, job: str, controls: list[str]) -> dict[str, Any]:
        """StepInfo of ``job`` from each control address, asked all at once (a dead
        node costs one PROBE_TIMEOUT_S, not one each); unreachable ones are left out."""
        def ask(control: str) -> Any:
            return self.p._peer(control).StepInfo(ppb.StepInfoRequest(job=job),
                                                  timeout=PROBE_TIMEOUT_S)

        out: dict[str, Any] = {}
        if not controls:
            return out
        with concurrent.futures.ThreadPoolExecutor(min(PROBE_THREADS, len(controls))) as pool:
            futs = {c: pool.submit(ask, c) for c in dict.fromkeys(controls)}
            for control, fut in futs.items():
                try:
                    out[control] = fut.result()
                except Exception as exc:  # noqa: BLE001 - an unreachable peer has nothing
                    logger.info("%s has no step info: %s", control, exc,
                                extra={"job": job, "node": self.topo.node_index})
        return out

    def _newest_meta(self, job: str) -> dict[str, Any] | None:
        best = self.p.meta(job)
        others = [c for i, (c, _) in enumerate(self.topo.nodes) if i != self.topo.node_index]
        for reply in self._step_infos(job, others).values():
            if reply.HasField("step") and (best is None or reply.step > best["step"]):
                best = json.loads(reply.meta)
        return best

    # ---------------------------------------------------------------- ranks

    def rebuild_rank(self, job: str, meta: dict[str, Any], rank: int, world_size: int,
                     local_ranks: list[int], alive: dict[int, str] | None = None,
                     distrust: int | None = None) -> None:
        """Put ``rank``'s snapshot of the meta's step into this node's store.

        ``distrust`` names a node whose pieces are not to be read (its bytes failed).
        """
        owner, entry = _find_rank(meta, rank)
        lay = meta["layouts"][str(owner)]
        alive = dict(self._alive(meta) if alive is None else alive)
        alive.pop(distrust, None)  # type: ignore[arg-type]
        record = SlotRecord(**{**entry["record"], "state": SlotState(entry["record"]["state"])})
        used = int(entry["used"])

        def fill(view: memoryview) -> None:
            # Straight into the slot: no staging copy of the rank's bytes.
            self._read_into(np.frombuffer(view, dtype=np.uint8, count=used), job, meta, owner,
                            lay, int(entry["off"]), alive)

        self.store.install(job, world_size, local_ranks, rank, entry["slot_bytes"], record, fill)
        self.store.metrics.rebuilt(job, used)

    def _alive(self, meta: dict[str, Any]) -> dict[int, str]:
        """Old nodes that answer and hold the meta's step, with their data address.

        A node is looked for at its address in the metadata and, when the job kept
        its node count, at the current address of the same node index (a node
        that was rebuilt earlier serves the old node's pieces there).
        """
        old = Topology.from_doc(meta["topology"])
        same_shape = len(old.nodes) == len(self.topo.nodes)
        me = self.topo.nodes[self.topo.node_index]  # holds nothing of the step yet
        candidates = [[a for a in dict.fromkeys([addr] + ([self.topo.nodes[i]] if same_shape
                                                          else [])) if a != me]
                      for i, addr in enumerate(old.nodes)]
        replies = self._step_infos(meta["job"], [c for cs in candidates for c, _ in cs])
        alive: dict[int, str] = {}
        for i, cs in enumerate(candidates):
            for control, data in cs:
                reply = replies.get(control)
                if reply is not None and reply.HasField("step") and reply.step == meta["step"]:
                    alive[i] = data
                    break
        return alive

    def _read_into(self, out: np.ndarray, job: str, meta: dict[str, Any], owner: int,
                   lay: dict[str, Any], off: int, alive: dict[int, str]) -> None:
        """Bytes [off, off+len(out)) of old node ``owner``'s payload, into ``out``."""
        n = len(out)
        plen = int(lay["plen"])
        pos = off
        while pos < off + n:
            q = pos // plen
            piece = self._data_piece(job, meta, owner, q, alive)
            lo = pos - q * plen
            take = min(off + n - pos, len(piece) - lo)
            out[pos - off:pos - off + take] = piece[lo:lo + take]
            self._bufs.give(piece)
            pos += take
            faults.point("mid-rebuild", int(meta["step"]), self.topo.node_index)

    # --------------------------------------------------------------- pieces

    def _data_piece(self, job: str, meta: dict[str, Any], owner: int, q: int,
                    alive: dict[int, str]) -> np.ndarray:
        old = Topology.from_doc(meta["topology"])
        grp = old.placement.group_of(owner)
        stripe = (grp.position(owner) - grp.m - q) % grp.g
        info = meta["stripes"][f"{grp.group}/{stripe}"]
        want = info["pieces"][str(q)]
        if owner in alive:
            try:
                return self._fetch(job, meta, alive, grp.group, stripe, q, want,
                                   int(want["len"]))
            except (PeerUnavailableError, CorruptionError) as exc:
                logger.warning("piece %d of node %d unusable (%s); decoding it", q, owner, exc,
                               extra={"job": job, "step": meta["step"], "peer": owner})
        return self._decode(job, meta, old, grp, stripe, q,
                            {i: a for i, a in alive.items() if i != owner})

    def _fetch(self, job: str, meta: dict[str, Any], alive: dict[int, str], group: int,
               stripe: int, index: int, want: dict[str, Any], size: int) -> np.ndarray:
        node = int(want["node"])
        out = self._bufs.take(size)
        hdr = {"job": job, "step": meta["step"], "group": group, "stripe": stripe,
               "index": index, "req": f"{group}/{stripe}/{index}"}
        try:
            got = self.p.plane.fetch(alive[node], hdr, out)
            self.store.metrics.bytes_received(job, "fetch", got)
            if got != int(want["len"]):
                raise CorruptionError(
                    f"node {node} sent {got} bytes of a {want['len']}-byte piece")
            self.p.verify_piece([out[:got].data], want,
                                f"job {job} step {meta['step']} group {group} stripe {stripe} "
                                f"piece {index} from node {node}")
        except BaseException:
            self._bufs.give(out)
            raise
        out[got:] = 0  # a reused buffer: the padding of a short piece must read as zeros
        return out

    def _decode(self, job: str, meta: dict[str, Any], old: Topology, grp: Any, stripe: int,
                q: int, alive: dict[int, str], into: np.ndarray | None = None) -> np.ndarray:
        """Piece ``q`` of a stripe from ``k`` others: a pooled buffer, or ``into`` (plen bytes)."""
        info = meta["stripes"][f"{grp.group}/{stripe}"]
        plen = int(info["plen"])
        have: dict[int, np.ndarray] = {}
        missing: list[int] = []
        candidates = [i for i in range(grp.k + grp.m) if i != q]
        # The k pieces come from k different nodes: fetched at once, not one after another.
        while len(have) < grp.k and candidates:
            batch, candidates = candidates[:grp.k - len(have)], candidates[grp.k - len(have):]
            futs = {}
            for idx in batch:
                want = info["pieces"][str(idx)]
                node = int(want["node"])
                if node not in alive:
                    missing.append(node)
                    continue
                futs[idx] = self.p._pool.submit(self._fetch, job, meta, alive, grp.group, stripe,
                                              idx, want, plen)
            for idx, fut in futs.items():
                node = int(info["pieces"][str(idx)]["node"])
                try:
                    have[idx] = fut.result()
                except (PeerUnavailableError, CorruptionError) as exc:
                    logger.warning("stripe %d piece %d from node %d unusable: %s", stripe, idx,
                                   node, exc,
                                   extra={"job": job, "step": meta["step"], "peer": node})
                    missing.append(node)
        if len(have) < grp.k:
            for buf in have.values():
                self._bufs.give(buf)
            lost = sorted(set(missing) | {int(info["pieces"][str(q)]["node"])})
            raise InsufficientPiecesError(
                f"job {job} step {meta['step']}: group {grp.group} cannot be rebuilt: nodes "
                f"{lost} are lost or hold corrupt pieces, and its parity covers {grp.m}")
        out = self._bufs.take(plen) if into is None else into
        try:
            self.p._codec(grp.k, grp.m).decode(have, {q: out})
        finally:
            for buf in have.values():
                self._bufs.give(buf)
        want = info["pieces"][str(q)]
        real = out[:int(want["len"])]
        try:
            self.p.verify_piece([real.data], want, f"decoded piece {q} of stripe {stripe}")
        except BaseException:
            if into is None:
                self._bufs.give(out)
            raise
        return real


def _find_rank(meta: dict[str, Any], rank: int) -> tuple[int, dict[str, Any]]:
    for node, lay in meta["layouts"].items():
        for entry in lay["ranks"]:
            if entry["rank"] == rank:
                return int(node), entry
    raise NotRestorableError(f"job {meta['job']} step {meta['step']} holds no rank {rank}")

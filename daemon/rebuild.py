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

import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from shardguard.daemon.errors import (
    CorruptionError,
    InsufficientPiecesError,
    NotRestorableError,
    PeerUnavailableError,
    UnknownJobError,
)
from shardguard.daemon.protect import Topology
from shardguard.daemon.store import SlotRecord
from shardguard.proto import peer_pb2 as ppb
from shardguard.proto.arena import SlotState

if TYPE_CHECKING:
    from shardguard.daemon.protect import Protector

logger = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 3.0


class Rebuilder:
    """One rebuild pass for one job on this node."""

    def __init__(self, protector: "Protector", topo: Topology) -> None:
        self.p = protector
        self.store = protector.store
        self.topo = topo

    def run(self, job: str, world_size: int, local_ranks: list[int]) -> None:
        meta = self._newest_meta(job)
        if meta is None:
            return
        step = int(meta["step"])
        need = [r for r in local_ranks if not self._holds(job, r, step)]
        for rank in need:
            self.rebuild_rank(job, meta, rank, world_size, local_ranks, trust_owner=True)
        self.p._save_meta(job, step, meta)
        self.store.set_restorable(job, step)
        if need:
            logger.info("job=%s step=%d: rebuilt ranks %s", job, step, need)

    def _holds(self, job: str, rank: int, step: int) -> bool:
        try:
            self.store.sealed_slot(job, rank, step)
            return True
        except (UnknownJobError, NotRestorableError):
            return False

    def _newest_meta(self, job: str) -> dict[str, Any] | None:
        best = self.p.meta(job)
        for i, (control, _) in enumerate(self.topo.nodes):
            if i == self.topo.node_index:
                continue
            try:
                reply = self.p._peer(control).StepInfo(ppb.StepInfoRequest(job=job),
                                                       timeout=PROBE_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - an unreachable peer simply has nothing
                logger.info("job=%s: node %d (%s) has no step info: %s", job, i, control, exc)
                continue
            if reply.HasField("step") and (best is None or reply.step > best["step"]):
                best = json.loads(reply.meta)
        return best

    # ---------------------------------------------------------------- ranks

    def rebuild_rank(self, job: str, meta: dict[str, Any], rank: int, world_size: int,
                     local_ranks: list[int], trust_owner: bool) -> None:
        """Put ``rank``'s snapshot of the meta's step into this node's store."""
        owner, entry = _find_rank(meta, rank)
        lay = meta["layouts"][str(owner)]
        alive = self._alive(meta) if trust_owner else self._alive(meta) - {owner}
        data = self._read(job, meta, owner, lay, entry["off"], entry["used"], alive)
        record = SlotRecord(**{**entry["record"], "state": SlotState(entry["record"]["state"])})

        def fill(view: memoryview) -> None:
            np.frombuffer(view, dtype=np.uint8, count=len(data))[:] = data

        self.store.install(job, world_size, local_ranks, rank, entry["slot_bytes"], record, fill)

    def _alive(self, meta: dict[str, Any]) -> set[int]:
        """Old nodes that answer and still hold the meta's step."""
        old = Topology.from_doc(meta["topology"])
        alive = set()
        for i, (control, _) in enumerate(old.nodes):
            try:
                reply = self.p._peer(control).StepInfo(ppb.StepInfoRequest(job=meta["job"]),
                                                       timeout=PROBE_TIMEOUT_S)
            except Exception:  # noqa: BLE001
                continue
            if reply.HasField("step") and reply.step == meta["step"]:
                alive.add(i)
        return alive

    def _read(self, job: str, meta: dict[str, Any], owner: int, lay: dict[str, Any], off: int,
              n: int, alive: set[int]) -> np.ndarray:
        """Bytes [off, off+n) of old node ``owner``'s payload."""
        out = np.empty(n, dtype=np.uint8)
        plen = int(lay["plen"])
        pos = off
        while pos < off + n:
            q = pos // plen
            piece = self._data_piece(job, meta, owner, q, alive)
            lo = pos - q * plen
            take = min(off + n - pos, len(piece) - lo)
            out[pos - off:pos - off + take] = piece[lo:lo + take]
            pos += take
        return out

    # --------------------------------------------------------------- pieces

    def _data_piece(self, job: str, meta: dict[str, Any], owner: int, q: int,
                    alive: set[int]) -> np.ndarray:
        old = Topology.from_doc(meta["topology"])
        grp = old.placement.group_of(owner)
        stripe = (grp.position(owner) - grp.m - q) % grp.g
        info = meta["stripes"][f"{grp.group}/{stripe}"]
        want = info["pieces"][str(q)]
        if owner in alive:
            try:
                return self._fetch(job, meta, old, grp.group, stripe, q, want, int(want["len"]))
            except (PeerUnavailableError, CorruptionError) as exc:
                logger.warning("job=%s: piece %d of node %d unusable (%s); decoding it", job, q,
                               owner, exc)
        return self._decode(job, meta, old, grp, stripe, q, alive - {owner})

    def _fetch(self, job: str, meta: dict[str, Any], old: Topology, group: int, stripe: int,
               index: int, want: dict[str, Any], size: int) -> np.ndarray:
        node = int(want["node"])
        out = np.zeros(size, dtype=np.uint8)
        hdr = {"job": job, "step": meta["step"], "group": group, "stripe": stripe,
               "index": index, "req": f"{group}/{stripe}/{index}"}
        got = self.p.plane.fetch(old.nodes[node][1], hdr, out)
        if got != int(want["len"]):
            raise CorruptionError(f"node {node} sent {got} bytes of a {want['len']}-byte piece")
        self.p.verify_piece([out[:got].data], want,
                            f"job {job} step {meta['step']} group {group} stripe {stripe} "
                            f"piece {index} from node {node}")
        return out

    def _decode(self, job: str, meta: dict[str, Any], old: Topology, grp: Any, stripe: int,
                q: int, alive: set[int]) -> np.ndarray:
        info = meta["stripes"][f"{grp.group}/{stripe}"]
        plen = int(info["plen"])
        have: dict[int, np.ndarray] = {}
        missing = []
        for idx in range(grp.k + grp.m):
            if idx == q or len(have) == grp.k:
                continue
            want = info["pieces"][str(idx)]
            node = int(want["node"])
            if node not in alive:
                missing.append(node)
                continue
            try:
                have[idx] = self._fetch(job, meta, old, grp.group, stripe, idx, want, plen)
            except (PeerUnavailableError, CorruptionError) as exc:
                logger.warning("job=%s: stripe %d piece %d from node %d unusable: %s", job,
                               stripe, idx, node, exc)
                missing.append(node)
        if len(have) < grp.k:
            lost = sorted(set(missing) | {int(info["pieces"][str(q)]["node"])})
            raise InsufficientPiecesError(
                f"job {job} step {meta['step']}: group {grp.group} cannot be rebuilt: nodes "
                f"{lost} are lost or hold corrupt pieces, and its parity covers {grp.m}")
        out = np.zeros(plen, dtype=np.uint8)
        self.p._codec(grp.k, grp.m).decode(have, {q: out})
        want = info["pieces"][str(q)]
        real = out[:int(want["len"])]
        self.p.verify_piece([real.data], want, f"decoded piece {q} of stripe {stripe}")
        return real


def _find_rank(meta: dict[str, Any], rank: int) -> tuple[int, dict[str, Any]]:
    for node, lay in meta["layouts"].items():
        for entry in lay["ranks"]:
            if entry["rank"] == rank:
                return int(node), entry
    raise NotRestorableError(f"job {meta['job']} step {meta['step']} holds no rank {rank}")

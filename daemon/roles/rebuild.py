"""Rebuilding a node's ranks from the survivors: a replacement node, moved ranks, corrupt bytes.

A rank's bytes at step S are a range of its old node's payload, which was cut
into ``k`` pieces, each a data piece of one stripe of the old node's group.
Each needed piece is fetched from the old node when it is alive and its
checksum holds; otherwise it is decoded from ``k`` surviving pieces of its
stripe (checksums checked; a corrupt piece counts as lost). More than ``m``
lost pieces of a stripe raise InsufficientPiecesError naming the group and
the missing nodes.

Who holds the pieces of an old node is asked, never inferred from node
numbers: a relaunch numbers nodes as its launcher likes (torchrun's c10d
rendezvous orders them by host name and pid), so a survivor may now run a
lost node's ranks and a replacement a survivor's. Every daemon says which
node of the step's topology it holds the pieces of (``StepInfo.holder``: itself
as numbered when the step was protected, or the lost node it rebuilt); this
daemon counts itself too, reading its own pieces in place. A new daemon that
holds nothing stands in for one lost node and recreates that node's parity, so
the group is protected again: new daemons and lost nodes are paired in a
fixed order (a new daemon at a lost node's old address takes that node), so
that the new daemons of one relaunch, each deciding alone, choose different
lost nodes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from shardguard.daemon.errors import (
    AuthenticationError,
    CorruptionError,
    InsufficientPiecesError,
    NotRestorableError,
    PeerUnavailableError,
    ShardguardError,
    UnknownJobError,
)
from shardguard.daemon import faults
from shardguard.daemon.stalls import cause_of_error
from shardguard.daemon.protect import Topology
from shardguard.daemon.store import SlotRecord
from shardguard.proto import peer_pb2 as ppb
from shardguard.proto.arena import SlotState

if TYPE_CHECKING:
    from shardguard.daemon.protect import Protector

logger = logging.getLogger(__name__)
#: In ``Survey.alive``: the pieces are this daemon's own (read in place, not fetched).
LOCAL = ""
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


@dataclasses.dataclass(frozen=True)
class Survey:
    """Who holds the pieces of a step, as the daemons of the job answered.

    ``alive`` maps a node of the step's topology to the data address of the daemon
    holding its pieces (:data:`LOCAL`: this one). ``new`` lists the current nodes
    (by current number) whose daemons hold no node's pieces, this one included if so.
    """

    alive: dict[int, str]
    new: tuple[int, ...]
    own: int | None  # the old node whose pieces this daemon holds

    def stand_in(self, old_nodes: list[tuple[str, str]], cur_nodes: list[tuple[str, str]],
                 me: int) -> int | None:
        """The lost old node that current node ``me`` (a new daemon) stands in for, if any."""
        lost = [i for i in range(len(old_nodes)) if i not in self.alive]
        pairs: dict[int, int] = {}
        for c in self.new:  # at a lost node's old address: that node
            if cur_nodes[c] in old_nodes and old_nodes.index(cur_nodes[c]) in lost:
                i = old_nodes.index(cur_nodes[c])
                pairs[c] = i
                lost.remove(i)
        for c, i in zip([c for c in self.new if c not in pairs], lost):
            pairs[c] = i
        return pairs.get(me)


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
        survey = self.survey(meta)
        for rank in need:
            self.rebuild_rank(job, meta, rank, world_size, local_ranks, survey.alive)
        held, replaced = survey.own, None
        if held is None:
            old = Topology.from_doc(meta["topology"])
            replaced = survey.stand_in(list(old.nodes), list(self.topo.nodes),
                                       self.topo.node_index)
            if replaced is not None:
                meta = self._recreate_parity(job, meta, replaced, survey.alive)
                held = replaced
        self.p._save_meta(job, step, meta, held)
        self.store.set_restorable(job, step)
        if need or replaced is not None:
            self.store.metrics.rebuild_pass(job, time.monotonic() - started)
            logger.info("rebuilt ranks %s%s", need,
                        f" and the parity of node {replaced}" if replaced is not None else "",
                        extra={"job": job, "step": step, "node": self.topo.node_index})

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
            piece = self._decode(job, meta, old, grp, ref.stripe, ref.index,
                                 {i: a for i, a in alive.items() if i != node}, into=out)
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

    def _step_infos(self, job: str, controls: Iterable[str],
                    errors: dict[str, Exception] | None = None) -> dict[str, Any]:
        """StepInfo of ``job`` from each control address, asked all at once (a dead
        node costs one PROBE_TIMEOUT_S, not one each); unreachable ones are left out
        (and their errors put in ``errors``)."""
        def ask(control: str) -> Any:
            return self.p._peer(control).StepInfo(ppb.StepInfoRequest(job=job),
                                                  timeout=PROBE_TIMEOUT_S)

        out: dict[str, Any] = {}
        controls = list(dict.fromkeys(controls))
        if not controls:
            return out
        with concurrent.futures.ThreadPoolExecutor(min(PROBE_THREADS, len(controls))) as pool:
            futs = {c: pool.submit(ask, c) for c in controls}
            for control, fut in futs.items():
                try:
                    out[control] = fut.result()
                except Exception as exc:  # noqa: BLE001 - an unreachable peer has nothing
                    logger.info("%s has no step info: %s", control, exc,
                                extra={"job": job, "node": self.topo.node_index})
                    if errors is not None:
                        errors[control] = exc
        return out

    def _newest_meta(self, job: str) -> dict[str, Any] | None:
        """The newest step metadata this node or any other node of the job holds.

        A node that does not answer is unknown, not empty: it is asked again until
        ``peer_timeout_s`` has passed (a network blip, a peer still starting), and if
        it still has not answered while this node holds nothing, the job is not
        taken for empty: PeerUnavailableError (or the error that names clock skew or
        a secret mismatch) goes to every rank's restore, instead of a job that starts
        again from step 0 while other nodes hold its snapshots.
        """
        best = self.p.meta(job)
        pending = [c for i, (c, _) in enumerate(self.topo.nodes) if i != self.topo.node_index]
        deadline = time.monotonic() + self.p.config.peer_timeout_s
        errors: dict[str, Exception] = {}
        while pending:
            errors.clear()
            for reply in self._step_infos(job, pending, errors).values():
                if reply.HasField("step") and (best is None or reply.step > best["step"]):
                    best = json.loads(reply.meta)
            pending = list(errors)
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        if errors and best is None:
            first = next(iter(errors.values()))
            cause = cause_of_error(first)
            names = ", ".join(sorted(errors))
            text = (f"job {job}: nodes {names} of the job did not answer in "
                    f"{self.p.config.peer_timeout_s:.0f}s ({cause.value}: {first}); they may "
                    f"hold a restorable step, so the job is not started from step 0")
            if isinstance(first, AuthenticationError):
                raise AuthenticationError(text)
            raise PeerUnavailableError(text)
        return best

    # ---------------------------------------------------------------- ranks

    def rebuild_rank(self, job: str, meta: dict[str, Any], rank: int, world_size: int,
                     local_ranks: list[int], alive: dict[int, str] | None = None,
                     distrust_self: bool = False) -> None:
        """Put ``rank``'s snapshot of the meta's step into this node's store.

        ``distrust_self``: this daemon's own pieces are not read (its bytes failed).
        """
        owner, entry = _find_rank(meta, rank)
        lay = meta["layouts"][str(owner)]
        alive = dict(self.survey(meta).alive if alive is None else alive)
        if distrust_self:
            alive = {i: a for i, a in alive.items() if a != LOCAL}
        record = SlotRecord(**{**entry["record"], "state": SlotState(entry["record"]["state"])})
        used = int(entry["used"])

        def fill(view: memoryview) -> None:
            # Straight into the slot: no staging copy of the rank's bytes.
            self._read_into(np.frombuffer(view, dtype=np.uint8, count=used), job, meta, owner,
                            lay, int(entry["off"]), alive)

        self.store.install(job, world_size, local_ranks, rank, entry["slot_bytes"], record, fill)
        self.store.metrics.rebuilt(job, used)

    def survey(self, meta: dict[str, Any]) -> Survey:
        """Ask the job's daemons (current nodes and the step's old addresses) which old
        node's pieces of the meta's step each holds; count this daemon too."""
        step = int(meta["step"])
        old = Topology.from_doc(meta["topology"])
        me = self.topo.node_index
        own = self._own_holder(meta)
        alive: dict[int, str] = {} if own is None else {own: LOCAL}
        # Current addresses first: a daemon found at both keeps its current data address.
        candidates = dict.fromkeys(a for i, a in enumerate(self.topo.nodes) if i != me)
        candidates.update((a, None) for a in old.nodes
                          if a != self.topo.nodes[me] and a not in candidates)
        replies = self._step_infos(meta["job"], (c for c, _ in candidates))
        holds: dict[tuple[str, str], int] = {}
        for control, data in candidates:
            reply = replies.get(control)
            if (reply is not None and reply.HasField("step") and reply.step == step
                    and reply.HasField("holder") and reply.holder < len(old.nodes)):
                holds[(control, data)] = reply.holder
                alive.setdefault(reply.holder, data)
        new = tuple(i for i, a in enumerate(self.topo.nodes)
                    if (i == me and own is None) or (i != me and a not in holds))
        return Survey(alive, new, own)

    def _own_holder(self, meta: dict[str, Any]) -> int | None:
        """The old node whose pieces of the meta's step this daemon holds, if any.

        What it recorded for that step; else, when its address is in the step's
        topology and its store holds that node's ranks sealed at the step (it
        stored the step but missed the announcement), that node.
        """
        step = int(meta["step"])
        mine = self.p.meta(meta["job"])
        if mine is not None and int(mine["step"]) == step:
            return self.p.holder(meta["job"])
        old_nodes = [list(n) for n in meta["topology"]["nodes"]]
        here = list(self.topo.nodes[self.topo.node_index])
        if here not in old_nodes:
            return None
        i = old_nodes.index(here)
        lay = meta["layouts"].get(str(i))
        if lay is None or not all(self._holds(meta["job"], int(r["rank"]), step)
                                  for r in lay["ranks"]):
            return None
        return i

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
            if alive[node] == LOCAL:
                got = self._read_local(job, meta, group, stripe, index, out)
            else:
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

    def _read_local(self, job: str, meta: dict[str, Any], group: int, stripe: int, index: int,
                    out: np.ndarray) -> int:
        """A piece this daemon holds, copied into ``out``; returns its length."""
        try:
            bufs = self.p.local_piece(job, int(meta["step"]), group, stripe, index, meta)
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

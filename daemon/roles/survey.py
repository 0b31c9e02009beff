"""Who in the job holds what of a step: asked of the daemons, never inferred from node numbers.

A relaunch numbers nodes as its launcher likes (torchrun's c10d rendezvous orders them
by host name and pid), so a survivor may now run a lost node's ranks and a
replacement a survivor's. Every daemon says which node of the step's topology it holds
the pieces of (peer ``StepInfo.holder``: itself as numbered when the step was
protected, or the lost node it rebuilt); this daemon counts itself too. A new daemon
that holds nothing stands in for one lost node: new daemons and lost nodes are paired
in a fixed order (a new daemon at a lost node's old address takes that node), so that
the new daemons of one relaunch, each deciding alone, choose different lost nodes.

A node that does not answer is unknown, never empty (:meth:`Surveyor.newest`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from typing import Any, Callable, Iterable

from shardguard.daemon.base.stalls import cause_of_error
from shardguard.daemon.errors import AuthenticationError, PeerUnavailableError
from shardguard.daemon.storage.stepmeta import StepMetas
from shardguard.daemon.transport.peer_client import PeerClients
from shardguard.proto import peer_pb2 as ppb
from shardguard.proto.meta import StepMeta, Topology

logger = logging.getLogger(__name__)
#: In ``Survey.alive``: the pieces are this daemon's own (read in place, not fetched).
LOCAL = ""
PROBE_TIMEOUT_S = 3.0
#: Nodes asked at once for their step (StepInfo) when a node catches up.
PROBE_THREADS = 32


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

    def stand_in(self, old_count: int, old_addresses: dict[int, tuple[str, str]],
                 cur_nodes: list[tuple[str, str]], me: int) -> int | None:
        """The lost old node that current node ``me`` (a new daemon) stands in for, if any.

        ``old_addresses``: the old nodes' addresses as far as known (their groups'
        metadata)."""
        lost = [i for i in range(old_count) if i not in self.alive]
        by_address = {a: i for i, a in old_addresses.items()}
        pairs: dict[int, int] = {}
        for c in self.new:  # at a lost node's old address: that node
            i = by_address.get(cur_nodes[c])
            if i is not None and i in lost:
                pairs[c] = i
                lost.remove(i)
        for c, i in zip([c for c in self.new if c not in pairs], lost):
            pairs[c] = i
        return pairs.get(me)


class Surveyor:
    """Asks the job's daemons for their step and what they hold (peer ``StepInfo``)."""

    def __init__(self, peers: PeerClients, metas: StepMetas, topo: Topology, timeout_s: float,
                 holds: Callable[[str, int, int], bool]) -> None:
        self.peers, self.metas, self.topo, self.timeout_s = peers, metas, topo, timeout_s
        self._holds = holds  # (job, rank, step): this node holds the rank's sealed slot

    def step_infos(self, job: str, controls: Iterable[str],
                   errors: dict[str, Exception] | None = None) -> dict[str, Any]:
        """StepInfo of ``job`` from each control address, asked all at once (a dead
        node costs one PROBE_TIMEOUT_S, not one each); unreachable ones are left out
        (and their errors put in ``errors``)."""
        def ask(control: str) -> Any:
            return self.peers.stub(control).StepInfo(ppb.StepInfoRequest(job=job),
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

    def newest(self, job: str) -> "Newest | None":
        """The newest restorable step this node or any other node of the job holds, and the
        metadata of each of its groups that a node answered with.

        A node that does not answer is unknown, not empty: it is asked again until
        ``peer_timeout_s`` has passed (a network blip, a peer still starting), and if
        it still has not answered while this node holds nothing, the job is not
        taken for empty: PeerUnavailableError (or the error that names clock skew or
        a secret mismatch) goes to every rank's restore, instead of a job that starts
        again from step 0 while other nodes hold its snapshots.
        """
        mine, mine_holder = self.metas.current(job)
        found: dict[int, list[tuple[StepMeta, int | None, str | None]]] = {}
        if mine is not None:
            found.setdefault(mine.step, []).append((mine, mine_holder, None))
        pending = [c for i, (c, _) in enumerate(self.topo.nodes) if i != self.topo.node_index]
        deadline = time.monotonic() + self.timeout_s
        errors: dict[str, Exception] = {}
        while pending:
            errors.clear()
            for control, reply in self.step_infos(job, pending, errors).items():
                if reply.HasField("step"):
                    meta = StepMeta.decode(reply.meta, job, reply.step)
                    found.setdefault(reply.step, []).append(
                        (meta, reply.holder if reply.HasField("holder") else None, control))
            pending = list(errors)
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        if errors and not found:
            first = next(iter(errors.values()))
            cause = cause_of_error(first)
            names = ", ".join(sorted(errors))
            text = (f"job {job}: nodes {names} of the job did not answer in "
                    f"{self.timeout_s:.0f}s ({cause.value}: {first}); they may "
                    f"hold a restorable step, so the job is not started from step 0")
            if isinstance(first, AuthenticationError):
                raise AuthenticationError(text)
            raise PeerUnavailableError(text)
        if not found:
            return None
        step = max(found)
        metas = {m.group: m for m, _, _ in found[step]}
        holders = {control: holder for m, holder, control in found[step]
                   if control is not None and holder is not None}
        return Newest(step, metas, holders, mine_holder if mine is not None
                      and mine.step == step else None)

    def survey(self, newest: "Newest") -> Survey:
        """Which old node's pieces of the step each daemon holds, this one counted: from the
        answers :meth:`newest` collected, and the old members' addresses of each known group
        (the daemons there that did not answer yet)."""
        me = self.topo.node_index
        own = self.own_holder(newest)
        alive: dict[int, str] = {} if own is None else {own: LOCAL}
        datas = {c: d for c, d in self.topo.nodes}
        extra = {a for m in newest.metas.values() for a in m.members.values()
                 if a[0] not in newest.holders and a != self.topo.me and a[0] not in datas}
        replies = self.step_infos(newest.metas[next(iter(newest.metas))].job,
                                  (c for c, _ in extra)) if extra else {}
        holds = dict(newest.holders)
        for control, reply in replies.items():
            if (reply.HasField("step") and reply.step == newest.step
                    and reply.HasField("holder")):
                holds[control] = reply.holder
        for control, holder in holds.items():
            data = datas.get(control) or next((a[1] for m in newest.metas.values()
                                               for a in m.members.values() if a[0] == control),
                                              None)
            if data is not None:
                alive.setdefault(holder, data)
        new = tuple(i for i, (c, _) in enumerate(self.topo.nodes)
                    if (i == me and own is None) or (i != me and c not in holds))
        return Survey(alive, new, own)

    def own_holder(self, newest: "Newest") -> int | None:
        """The old node whose pieces of the step this daemon holds, if any.

        What it recorded for that step; else, when its address is among a group's
        members and its store holds that node's ranks sealed at the step (it stored
        the step but missed the announcement), that node.
        """
        if newest.own is not None:
            return newest.own
        for meta in newest.metas.values():
            i = next((n for n, a in meta.members.items() if a == self.topo.me), None)
            if i is None:
                continue
            lay = meta.layouts.get(i)
            if lay is not None and all(self._holds(meta.job, r.rank, meta.step)
                                       for r in lay.ranks):
                return i
        return None


@dataclasses.dataclass(frozen=True)
class Newest:
    """The job's newest restorable step as the daemons answered: each known group's
    metadata, which daemon (control address) holds which old node's pieces, and the
    old node this daemon itself holds (None: none)."""

    step: int
    metas: dict[int, StepMeta]
    holders: dict[str, int]
    own: int | None

    def meta_of_node(self, node: int, code_groups: Any) -> StepMeta | None:
        """The metadata of old node ``node``'s group, if a daemon answered with it."""
        for grp in code_groups:
            if node in grp.nodes:
                return self.metas.get(grp.group)
        return None

    def owner_of(self, rank: int) -> tuple[StepMeta, int, Any]:
        """The group metadata, old node and entry of ``rank`` (LookupError if no group's
        metadata that a daemon answered with lists it)."""
        for meta in self.metas.values():
            try:
                node, entry = meta.owner_of(rank)
                return meta, node, entry
            except LookupError:
                continue
        raise LookupError(rank)

"""Who in the job holds what of a step: asked of the daemons, never inferred from node numbers.

A relaunch numbers nodes as its launcher likes (torchrun's c10d rendezvous orders them
by host name and pid), so a survivor may now run a lost node's ranks and a
replacement a survivor's. Every daemon says which node of the step's topology it holds
the pieces of (peer ``StepInfo.holder``: itself as numbered when the step was
protected, or the lost node it rebuilt); this daemon counts itself too. A new daemon
that holds nothing stands in for one lost node: new daemons and lost nodes are paired
in a fixed order (a new daemon at a lost node's old address takes that node), so that
the new daemons of one relaunch, each deciding alone, choose different lost nodes.

A node that does not answer is unknown, never empty (:meth:`Surveyor.newest_meta`).
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

    def newest_meta(self, job: str) -> StepMeta | None:
        """The newest step metadata this node or any other node of the job holds.

        A node that does not answer is unknown, not empty: it is asked again until
        ``peer_timeout_s`` has passed (a network blip, a peer still starting), and if
        it still has not answered while this node holds nothing, the job is not
        taken for empty: PeerUnavailableError (or the error that names clock skew or
        a secret mismatch) goes to every rank's restore, instead of a job that starts
        again from step 0 while other nodes hold its snapshots.
        """
        best = self.metas.get(job)
        pending = [c for i, (c, _) in enumerate(self.topo.nodes) if i != self.topo.node_index]
        deadline = time.monotonic() + self.timeout_s
        errors: dict[str, Exception] = {}
        while pending:
            errors.clear()
            for reply in self.step_infos(job, pending, errors).values():
                if reply.HasField("step") and (best is None or reply.step > best.step):
                    best = StepMeta.decode(reply.meta, job, reply.step)
            pending = list(errors)
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        if errors and best is None:
            first = next(iter(errors.values()))
            cause = cause_of_error(first)
            names = ", ".join(sorted(errors))
            text = (f"job {job}: nodes {names} of the job did not answer in "
                    f"{self.timeout_s:.0f}s ({cause.value}: {first}); they may "
                    f"hold a restorable step, so the job is not started from step 0")
            if isinstance(first, AuthenticationError):
                raise AuthenticationError(text)
            raise PeerUnavailableError(text)
        return best

    def survey(self, meta: StepMeta) -> Survey:
        """Ask the job's daemons (current nodes and the step's old addresses) which old
        node's pieces of the meta's step each holds; count this daemon too."""
        old, me = meta.topology, self.topo.node_index
        own = self.own_holder(meta)
        alive: dict[int, str] = {} if own is None else {own: LOCAL}
        # Current addresses first: a daemon found at both keeps its current data address.
        candidates = dict.fromkeys(a for i, a in enumerate(self.topo.nodes) if i != me)
        candidates.update((a, None) for a in old.nodes
                          if a != self.topo.me and a not in candidates)
        replies = self.step_infos(meta.job, (c for c, _ in candidates))
        holds: dict[tuple[str, str], int] = {}
        for control, data in candidates:
            reply = replies.get(control)
            if (reply is not None and reply.HasField("step") and reply.step == meta.step
                    and reply.HasField("holder") and reply.holder < len(old.nodes)):
                holds[(control, data)] = reply.holder
                alive.setdefault(reply.holder, data)
        new = tuple(i for i, a in enumerate(self.topo.nodes)
                    if (i == me and own is None) or (i != me and a not in holds))
        return Survey(alive, new, own)

    def own_holder(self, meta: StepMeta) -> int | None:
        """The old node whose pieces of the meta's step this daemon holds, if any.

        What it recorded for that step; else, when its address is in the step's
        topology and its store holds that node's ranks sealed at the step (it
        stored the step but missed the announcement), that node.
        """
        mine, holder = self.metas.current(meta.job)
        if mine is not None and mine.step == meta.step:
            return holder
        if self.topo.me not in meta.topology.nodes:
            return None
        i = meta.topology.nodes.index(self.topo.me)
        lay = meta.layouts.get(i)
        if lay is None or not all(self._holds(meta.job, r.rank, meta.step) for r in lay.ranks):
            return None
        return i

"""What ``shardguard status`` shows of a node and its jobs (the Agent's ``Status`` reply)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from shardguard.daemon.base.stalls import Cause, Stalls
from shardguard.daemon.coding import placement
from shardguard.daemon.service.boundary import version
from shardguard.daemon.service.wiring import Roles
from shardguard.daemon.storage.store import JobRecord, Store
from shardguard.daemon.transport.auth import WINDOW_S
from shardguard.proto import agent_pb2 as pb


@dataclass(frozen=True)
class NodeInfo:
    """What a node says of itself besides its jobs."""

    socket_path: str
    control_address: str
    defaults: tuple[int, int]
    metrics_address: str
    started: float  # time.monotonic() at start


def status(store: Store, roles: Roles | None, stalls: Stalls, probe: Any, info: NodeInfo,
           job: str = "") -> pb.StatusReply:
    jobs = [store.job(job)] if job else store.jobs()
    reply = pb.StatusReply(version=version(), pid=os.getpid(), socket=info.socket_path,
                           memory_budget_bytes=store.budget_bytes,
                           memory_used_bytes=store.used_bytes(),
                           uptime_s=time.monotonic() - info.started,
                           metrics_address=info.metrics_address,
                           default_group_size=info.defaults[0], default_parity=info.defaults[1],
                           time_unix=time.time(), token_window_s=WINDOW_S)
    if roles is not None:
        reply.address.control = info.control_address
        reply.address.data = roles.plane.address
        reply.secret_fingerprint = roles.reach.fingerprint
        reply.peer_tls = roles.reach.tls
    for rec in jobs:
        js = reply.jobs.add(job=rec.job, world_size=rec.world_size,
                            local_ranks=list(rec.local_ranks), epoch=rec.epoch)
        if rec.restorable_step is not None:
            js.restorable_step = rec.restorable_step
        stall = stalls.get(rec.job)
        if stall is not None:
            js.stall_cause, js.stall_detail = stall.cause.value, stall.detail
        if rec.topology is not None:
            _parity_status(js, rec, roles, probe)
        for rank in sorted(rec.ranks):
            rr = rec.ranks[rank]
            rs = js.ranks.add(rank=rank, arena_path=rr.arena.path, arena_bytes=rr.arena.size,
                              claimed=rr.claimed_by_live_process(), pid=rr.pid)
            for i, s in enumerate(rr.slots):
                rs.slots.add(index=i, state=s.state.name.lower(), step=s.step,
                             data_bytes=s.data_bytes)
    return reply


def _parity_status(js: pb.JobStatus, rec: JobRecord, roles: Roles | None, probe: Any) -> None:
    """Group, parity pieces held, step in flight and peers reachable of a multi-node job."""
    topo = rec.topology
    assert topo is not None
    js.nodes, js.node_index = len(topo.nodes), topo.node_index
    js.group_size, js.parity = topo.group_size, topo.parity
    pl = placement.placement_of(topo)
    grp = pl.group_of(topo.node_index)
    js.group = grp.group
    js.group_nodes.extend(grp.nodes)
    steps = [s.step for rr in rec.ranks.values() for s in rr.slots
             if s.state.name in ("WRITING", "SEALED")]
    newer = [s for s in steps if rec.restorable_step is None or s > rec.restorable_step]
    if newer:
        js.in_flight_step = max(newer)
    meta, held = roles.metas.current(rec.job) if roles is not None else (None, None)
    if meta is not None and meta.step == rec.restorable_step and held is not None:
        groups = placement.placement_of(meta.code).groups
        js.parity_pieces = sum(1 for (g, _), st in meta.stripes.items()
                               for idx, piece in st.pieces.items()
                               if piece.node == held and idx >= groups[g].k)
    if probe is not None:
        js.peers, js.peers_up = probe.counts(topo)
        if not js.stall_cause and (down := probe.down(topo)):
            data_only = all(d.endswith("(data port)") for d in down)
            js.stall_cause = (Cause.DATA_UNREACHABLE if data_only
                              else Cause.PEER_UNREACHABLE).value
            js.stall_detail = "peers not answering: " + ", ".join(down)

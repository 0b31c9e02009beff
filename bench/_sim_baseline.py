"""bench/sim_scale.py's harness over an earlier design's roles (run by sim_scale in a subprocess
whose ``shardguard`` is a checkout of that revision): every report to node 0, the whole job's
metadata announced to every node. Prints the rows as JSON on its last line."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sim_scale  # noqa: E402
from sim_scale import now  # noqa: E402


def design() -> SimpleNamespace:
    from shardguard.daemon.coding.placement import placement_of
    from shardguard.daemon.errors import InvalidRequestError
    from shardguard.daemon.roles.coordinator import Coordinator, Reporter
    from shardguard.daemon.roles.encoder import Encoder
    from shardguard.daemon.roles.follower import Follower
    from shardguard.daemon.roles.holder import Holder
    from shardguard.daemon.roles.state import ProtectionState
    from shardguard.daemon.transport.delivery import Delivery
    from shardguard.proto import peer_pb2 as ppb
    from shardguard.proto.arena import SlotDesc, SlotState
    from shardguard.proto.meta import (NodeLayout, RankEntry, StepMeta, Topology,
                                       decode_report)

    restored_at: dict[int, float] = {}

    def build_roles(store, state, pieces, codecs, plane, peers, pool, metas, stalls):
        coordinator = Coordinator(store, state, peers, pool, 10.0)
        reporter = Reporter(coordinator, peers, 10.0)
        follower = Follower(store, state, metas, pieces, stalls)
        me = store.rec.topology.node_index

        def announce(job, step, meta, _f=follower.announce):
            _f(job, step, meta)
            restored_at[me] = now()

        coordinator.announce_here = announce
        delivery = Delivery(peers, 10.0, stalls)
        encoder = Encoder(store, state, pieces, codecs, plane, delivery, reporter, pool,
                          stalls, 10.0)
        holder = Holder(store, state, pieces, reporter, pool, stalls)
        return SimpleNamespace(encoder=encoder, holder=holder, coordinator=coordinator,
                               follower=follower, reporter=reporter, plane=plane,
                               announce=announce)

    def handle(node, method, req):
        if method == "Report":
            node.coordinator.report(req.job, req.step, req.node, decode_report(req.report))
            return ppb.ReportReply()
        if method == "Announce":
            node.announce(req.job, req.step, StepMeta.decode(req.meta, req.job, req.step))
            return ppb.AnnounceReply()
        if method == "Received":
            return ppb.ReceivedReply(got=req.want)
        raise NotImplementedError(method)

    def layout(i, step):
        rpn, rb = sim_scale.RANKS_PER_NODE, sim_scale.RANK_BYTES
        ranks = tuple(RankEntry(r, (r % rpn) * rb, rb, rb,
                                SlotDesc(SlotState.SEALED, step, rb - 4096, rb - 4096, 4096,
                                         0xDEADBEEF, 0xFEEDF00D, step + 1))
                      for r in range(i * rpn, (i + 1) * rpn))
        return NodeLayout(rpn * rb, 0, ranks)

    def offer_request(job, step, grp, stripe, q, node, lay):
        plen = -(-lay.bytes // grp.k) // 4096 * 4096 + 4096
        lay = NodeLayout(lay.bytes, plen, lay.ranks)
        return ppb.OfferRequest(job=job, step=step, stripe=stripe, group=grp.group, index=q,
                                node=node.topo.node_index, piece_bytes=0, real_bytes=0,
                                crc=0, layout=lay.encode(), topology=node.topo.describe())

    return SimpleNamespace(
        Topology=Topology, ProtectionState=ProtectionState, placement_of=placement_of,
        InvalidRequestError=InvalidRequestError, build_roles=build_roles, handle=handle,
        layout=layout, offer_request=offer_request,
        seal_token=lambda raw: 0,  # data frames carry no seal before the current tree
        mark_time=lambda world, fn: restored_at.clear(),
        restorable_everywhere=lambda world, step: all(
            nd.follower.store.rec.restorable_step == step for nd in world.nodes),
        last_restorable_time=lambda world: max(restored_at.values()) if restored_at
        else float("nan"))


if __name__ == "__main__":
    import argparse
    import json

    p = argparse.ArgumentParser()
    for a in ("--nodes", "--configs"):
        p.add_argument(a)
    p.add_argument("--steps", type=int)
    p.add_argument("--latency-us", type=float)
    p.add_argument("--gbps", type=float)
    p.add_argument("--ranks-per-node", type=int)
    p.add_argument("--rank-bytes", type=int)
    a = p.parse_args()
    sim_scale.configure(a.ranks_per_node, a.rank_bytes)
    ns = design()
    rows = []
    for n in map(int, a.nodes.split(",")):
        for g, m in (map(int, c.split(":")) for c in a.configs.split(",")):
            if m < g <= n:
                rows.append(sim_scale.run(ns, n, g, m, a.latency_us, a.gbps, a.steps))
                print(f"baseline {n} g={g} m={m} done", file=sys.stderr, flush=True)
    print(json.dumps(rows))

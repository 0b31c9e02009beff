"""Restore after lost nodes, whatever node ranks the relaunch hands out.

A launcher numbers nodes as it likes on a relaunch (torchrun's c10d
rendezvous orders them by host name and pid), so a replacement node rarely
takes the lost node's ranks: a survivor may run the lost node's ranks and the
replacement the survivor's. For small clusters, every pattern of at most
``parity`` lost nodes per group is crossed with shifted, swapped and random
rank placements; every rank must restore exactly its own state, and the job
must be protected again afterwards. Real daemons (``shardguard cluster``), the
real client, one thread per rank (tests/integration/_ranks.py).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import grpc
import pytest

from shardguard.daemon.service import cluster
from shardguard.daemon.coding import placement
from shardguard.proto import agent_pb2 as pb
from shardguard.proto import agent_pb2_grpc as pb_grpc
from shardguard.proto.paths import grpc_target
from _ranks import (
    assert_restored,
    close_all,
    connect_all,
    placements,
    restore_all,
    snapshot_all,
)

FAULT_CATEGORY = "lost nodes x relaunch rank placements (shifted, swapped, random)"
FAULT_OUTCOME = "every rank restores its own state; protection resumes"


def loss_patterns(nodes: int, group_size: int, parity: int) -> list[tuple[int, ...]]:
    """Every non-empty set of nodes that loses at most ``parity`` nodes of each group."""
    groups = placement.split_groups(nodes, group_size)
    out = []
    for r in range(1, nodes + 1):
        for lost in itertools.combinations(range(nodes), r):
            if all(len(set(lost) & set(g)) <= parity for g in groups):
                out.append(lost)
    return out


def drop_everywhere(socket: str, job: str) -> None:
    with grpc.insecure_channel(grpc_target(socket)) as ch:
        pb_grpc.AgentStub(ch).Drop(pb.DropRequest(job=job, everywhere=True), timeout=60)


def run_case(root: Path, socks: list[str], ranks_per_node: int, lost: tuple[int, ...],
             kind: str, where: list[int], job: str) -> None:
    nodes = len(socks)
    first = [socks[r // ranks_per_node] for r in range(nodes * ranks_per_node)]
    clients = connect_all(first, job)
    try:
        snapshot_all(clients, 0)
        snapshot_all(clients, 1)
    finally:
        close_all(clients)
    for node in lost:
        cluster.kill(str(root), node)
    for node in lost:
        cluster.start(str(root), node)
    again = [socks[n] for n in where]
    clients = connect_all(again, job)
    try:
        assert_restored(restore_all(clients), job, 1)
        # Protected again in the new placement: a step after the restore becomes restorable.
        snapshot_all(clients, 2)
    finally:
        close_all(clients)
    drop_everywhere(socks[0], job)


CASES = [  # (nodes, group_size, parity, ranks per node), fast ones in make test
    (2, 2, 1, 2),
    (3, 3, 1, 1),
    pytest.param(4, 2, 1, 1, marks=pytest.mark.slow),
    pytest.param(4, 4, 1, 2, marks=pytest.mark.slow),
    pytest.param(5, 5, 2, 1, marks=pytest.mark.slow),
    pytest.param(6, 3, 1, 1, marks=pytest.mark.slow),
    pytest.param(6, 6, 2, 1, marks=pytest.mark.slow),
]


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("nodes,group_size,parity,per_node", CASES,
                         ids=lambda v: str(v))
def test_every_loss_pattern_with_every_rank_placement(tmp_path: Path, nodes: int,
                                                      group_size: int, parity: int,
                                                      per_node: int) -> None:
    root = tmp_path / "c"
    cluster.up(str(root), nodes, group_size, parity)
    try:
        socks = cluster.sockets(str(root))
        case = 0
        for lost in loss_patterns(nodes, group_size, parity):
            for kind, where in placements(nodes, per_node, seed=hash(lost) & 0xFFFF).items():
                case += 1
                try:
                    run_case(root, socks, per_node, lost, kind, where, f"p{case}")
                except Exception as exc:
                    raise AssertionError(f"lost nodes {lost}, {kind} placement {where}: "
                                         f"{type(exc).__name__}: {exc}") from exc
    finally:
        cluster.down(str(root))

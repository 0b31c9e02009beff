"""Ranks as threads of the test process: the real client against real daemons, any placement.

A real trainer agrees on take/skip and on the restored step through
torch.distributed; here every rank is a :class:`~shardguard.client.Client`
built with the node list and node index a launcher's placement gives it
(exactly what ``connect()`` computes from the gathered daemon addresses), driven
in lockstep by the test: every rank snapshots, every rank waits until the step
is restorable, every rank restores. No collective is needed because the test
itself is the barrier. This makes one placement case cost well under a second,
so that every loss pattern can be crossed with every kind of rank placement.
"""

from __future__ import annotations

import concurrent.futures
import random
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import torch

import shardguard.client as sg
from shardguard.client.client import Client
from shardguard.proto import agent_pb2 as pb
from shardguard.proto import agent_pb2_grpc as pb_grpc
from shardguard.proto.paths import grpc_target

TIMEOUT_S = 60.0


def addresses(socket: str) -> tuple[str, str]:
    """(control, data) of the daemon behind ``socket``."""
    with grpc.insecure_channel(grpc_target(socket)) as ch:
        st = pb_grpc.AgentStub(ch).Status(pb.StatusRequest(), timeout=10)
    return st.address.control, st.address.data


def rank_state(job: str, rank: int, step: int, numel: int = 50_000) -> dict[str, Any]:
    """A state that differs per job, rank and step (so a mixed-up resume shows)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{job}/{rank}/{step}".encode()))
    return {"w": torch.randn(numel, generator=g), "b": torch.randint(0, 1 << 30, (17,),
                                                                     generator=g),
            "step": step, "rank": rank, "job": job}


def placement_nodes(placement: Sequence[str]) -> list[str]:
    """The nodes (sockets) in the order of their first rank, as ``connect()`` orders them."""
    return list(dict.fromkeys(placement))


def connect_all(placement: Sequence[str], job: str, *, group_size: int = 0, parity: int = 0
                ) -> list[Client]:
    """One client per rank; rank r runs on the node whose socket is ``placement[r]``.

    Every rank registers at once, as the ranks of a relaunched job do: a replacement
    node's rebuild may need pieces from nodes whose ranks are registering too.
    """
    world = len(placement)
    order = placement_nodes(placement)
    addrs = {s: addresses(s) for s in order}
    nodes = [addrs[s] for s in order] if len(order) > 1 else []

    def one(rank: int) -> Client:
        sock = placement[rank]
        local = [r for r in range(world) if placement[r] == sock]
        return Client(sock, job, rank, world, group=None, local_ranks=local,
                      nodes=nodes, node_index=order.index(sock) if nodes else 0,
                      group_size=group_size, parity=parity, timeout_s=TIMEOUT_S)

    return _each(one, range(world))


def snapshot_all(clients: Sequence[Client], step: int) -> None:
    """Every rank snapshots ``step`` and waits until it is restorable on every node."""
    handles = [c.snapshot(step, rank_state(c.job, c.rank, step)) for c in clients]
    assert not any(h.skipped for h in handles), f"step {step} skipped"
    _each(lambda c: c.wait(restorable=True, timeout=TIMEOUT_S), clients)


def restore_all(clients: Sequence[Client]) -> list[tuple[int, Any]]:
    return _each(lambda c: c.restore(), clients)


def close_all(clients: Sequence[Client]) -> None:
    for c in clients:
        c.close()


def _each(fn: Callable[[Any], Any], items: Any) -> list[Any]:
    items = list(items)
    with concurrent.futures.ThreadPoolExecutor(max(1, len(items))) as pool:
        return list(pool.map(fn, items))


def placements(nodes: int, ranks_per_node: int, seed: int) -> dict[str, list[int]]:
    """Node of each rank for the relaunch: shifted by one node, two nodes swapped, random.

    The original placement puts rank r on node r // ranks_per_node.
    """
    base = [r // ranks_per_node for r in range(nodes * ranks_per_node)]
    rng = random.Random(seed)
    shuffled = list(range(nodes))
    while nodes > 1 and shuffled == list(range(nodes)):
        rng.shuffle(shuffled)
    swap = list(range(nodes))
    if nodes > 1:
        swap[0], swap[-1] = swap[-1], swap[0]
    return {
        "shifted": [(n + 1) % nodes for n in base],
        "swapped": [swap[n] for n in base],
        "random": [shuffled[n] for n in base],
    }


def assert_restored(results: list[tuple[int, Any]], job: str, step: int) -> None:
    for rank, (got_step, state) in enumerate(results):
        assert got_step == step, f"rank {rank} restored step {got_step}, not {step}"
        want = rank_state(job, rank, step)
        assert state["rank"] == rank and state["job"] == job and state["step"] == step, (
            rank, state["rank"], state["job"], state["step"])
        assert torch.equal(state["w"], want["w"]) and torch.equal(state["b"], want["b"]), rank


__all__ = ["sg", "addresses", "assert_restored", "close_all", "connect_all", "placements",
           "rank_state", "restore_all", "snapshot_all"]

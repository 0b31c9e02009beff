"""Which new rank restores which old rank of a job saved at another world size, and those
restores: every new rank asks its daemon which old ranks it holds; a node's old ranks
are spread over the new ranks on that node, which register as those ranks (with the old
job's world size, node list and erasure code, so the daemon's record of the job is
unchanged), restore the agreed step and let go."""

from __future__ import annotations

import os
from dataclasses import dataclass
from socket import gethostname
from typing import Any

from shardguard.client.agreement import all_gather, error_words, group_rank, raise_any
from shardguard.client.client import Client
from shardguard.client.dcp.connect import job_status
from shardguard.proto.errors import (
    NotRestorableError,
    RankClaimedError,
    RestoreError,
    ShardguardError,
    UnknownJobError,
)


@dataclass
class Held:
    """What this rank restored for a load: old rank -> its snapshot, all at ``step``."""

    step: int
    world: int
    states: dict[int, dict[str, Any]]


@dataclass(frozen=True)
class Holding:
    """What one new rank's daemon holds of the old job (gathered from every new rank)."""

    daemon: tuple[str, str]             # (host, socket): ranks with the same one share it
    address: tuple[str, str]            # its (control, data) peer addresses
    world: int                          # the old job's world size
    local: list[int]                    # the old job's ranks on this node
    ranks: dict[int, tuple[bool, int]]  # old rank -> (claimed by a live process, its pid)
    nodes: int                          # how many nodes the old job had
    node_index: int
    group_size: int
    parity: int
    step: int                           # its restorable step (-1: none)


@dataclass
class Assignment:
    """Which new rank restores which old rank, at which step, with which node list."""

    world: int
    step: int
    ranks_of: dict[int, list[int]]            # new rank -> old ranks it restores
    info_of: dict[int, Holding]               # old rank -> its daemon's holding
    nodes: list[tuple[str, str]]              # the old job's node list ([] for one node)


def restore_foreign(job: str, socket: str, group: Any, step: int | None, *,
                    allow_pickle: bool, timeout_s: float
                    ) -> tuple[Held | None, BaseException | None]:
    """Restore the old ranks that fall to this rank: those of its node's daemon, spread
    over the new ranks on that node. Errors before the restores (the same on every
    rank: they come from gathered facts) are raised; a failed restore is returned."""
    info, error = None, None
    try:
        info = holding(socket, job)
    except ShardguardError as exc:
        error = exc
    infos = all_gather({"error": error_words(error), "info": info}, group)
    raise_any([m["error"] for m in infos], f"job {job}: a daemon could not be asked", error)
    plan = assign(job, [m["info"] for m in infos], step)
    states: dict[int, dict[str, Any]] = {}
    try:
        for q in plan.ranks_of[group_rank(group)]:
            states[q] = _restore_rank(socket, job, q, plan, allow_pickle, timeout_s)
    except (ShardguardError, ValueError, TypeError, RuntimeError) as exc:
        return None, exc
    return Held(plan.step, plan.world, states), None


def holding(socket: str, job: str) -> Holding | None:
    """What this rank's daemon holds of the job (None: nothing)."""
    try:
        reply = job_status(socket, job)
    except UnknownJobError:
        return None
    js = next(j for j in reply.jobs if j.job == job)
    return Holding(daemon=(gethostname(), os.path.realpath(socket)),
                   address=(reply.address.control, reply.address.data),
                   world=js.world_size, local=list(js.local_ranks),
                   ranks={r.rank: (r.claimed, r.pid) for r in js.ranks},
                   nodes=js.nodes, node_index=js.node_index, group_size=js.group_size,
                   parity=js.parity,
                   step=js.restorable_step if js.HasField("restorable_step") else -1)


def _restore_rank(socket: str, job: str, q: int, plan: Assignment, allow_pickle: bool,
                  timeout_s: float) -> dict[str, Any]:
    """Register as old rank ``q`` on this node's daemon, exactly as the old job did,
    restore the agreed step, and let the rank go."""
    info = plan.info_of[q]
    client = Client(socket, job, q, plan.world, group=None, local_ranks=info.local,
                    allow_pickle=allow_pickle, timeout_s=timeout_s, nodes=plan.nodes,
                    node_index=info.node_index, group_size=info.group_size,
                    parity=info.parity)
    try:
        _, state = client.restore(plan.step, map_location="cpu", allow_pickle=allow_pickle)
    finally:
        client.close()
    return state


def assign(job: str, infos: list[Holding | None], step: int | None) -> Assignment:
    """The same plan on every rank, from every rank's daemon holding."""
    daemons: dict[tuple[str, str], tuple[Holding, list[int]]] = {}
    for r, info in enumerate(infos):
        if info is not None:
            daemons.setdefault(info.daemon, (info, []))[1].append(r)
    if not daemons:
        raise NotRestorableError(f"job {job} is held by none of the ranks' daemons")
    worlds = {info.world for info, _ in daemons.values()}
    if len(worlds) != 1:
        raise RestoreError(f"job {job}: daemons disagree on its world size ({sorted(worlds)})")
    world = worlds.pop()
    restorable = min(info.step for info, _ in daemons.values())
    if restorable < 0:
        raise NotRestorableError(f"job {job} has no restorable step on every node")
    ranks_of: dict[int, list[int]] = {r: [] for r in range(len(infos))}
    info_of: dict[int, Holding] = {}
    for info, new_ranks in daemons.values():
        held = sorted(q for q in info.ranks if q not in info_of and 0 <= q < world)
        for i, q in enumerate(held):
            claimed, pid = info.ranks[q]
            if claimed:
                hint = " (this process: pass its Client to ShardguardReader)" \
                    if pid == os.getpid() else ""
                raise RankClaimedError(f"job {job} rank {q} is held by live process {pid}"
                                       f"{hint}")
            ranks_of[new_ranks[i % len(new_ranks)]].append(q)
            info_of[q] = info
    missing = sorted(set(range(world)) - set(info_of))
    if missing:
        raise RestoreError(f"job {job}: old ranks {missing} are on no daemon of this world's "
                           "ranks (every old node needs a rank of the new world)")
    return Assignment(world, restorable if step is None else step, ranks_of, info_of,
                      _node_list(job, [info for info, _ in daemons.values()]))


def _node_list(job: str, holdings: list[Holding]) -> list[tuple[str, str]]:
    """The old job's node list, from its daemons' addresses ([] for one node)."""
    count = max(info.nodes for info in holdings)
    if count <= 1:
        return []
    by_index = {info.node_index: info.address for info in holdings}
    lost = sorted(set(range(count)) - set(by_index))
    if lost:
        raise RestoreError(f"job {job}: nodes {lost} of its {count} have no rank of this world")
    return [by_index[i] for i in range(count)]

"""What every piece-handling role checks of a peer's request before it touches anything."""

from __future__ import annotations

from shardguard.daemon.coding import placement
from shardguard.daemon.errors import InvalidRequestError, StepOrderError, UnknownJobError
from shardguard.daemon.storage.store import Store
from shardguard.proto.meta import Topology


def topology_of(store: Store, job: str) -> Topology:
    """The job's topology here (UnknownJobError for a job this node does not hold as a
    multi-node job)."""
    topo = store.job(job).topology
    if topo is None:
        raise UnknownJobError(f"job {job} is not a multi-node job on this daemon")
    return topo


def in_flight(store: Store, job: str, step: int) -> None:
    """Pieces are taken only for a step after the restorable one (never overwrite it).

    No upper bound: a source may offer a step before this node's own ranks have
    begun it (a small state seals fast), and steps between snapshots are the
    trainer's choice. A far-future step from an authenticated peer keeps its file
    until the job is dropped.
    """
    latest = store.latest(job)
    if step < 0 or (latest is not None and step <= latest):
        raise StepOrderError(f"job {job}: step {step} is not after the restorable step "
                             f"{latest}; its pieces are not taken")


def group_of(topo: Topology, group: int, stripe: int, index: int) -> placement.GroupLayout:
    """The group a piece belongs to, with its stripe and index in range."""
    groups = placement.placement_of(topo).groups
    if not 0 <= group < len(groups):
        raise InvalidRequestError(f"group {group}: the job has groups 0..{len(groups) - 1}")
    grp = groups[group]
    if not 0 <= stripe < grp.g or not 0 <= index < grp.k + grp.m:
        raise InvalidRequestError(f"group {group} has stripes 0..{grp.g - 1} of pieces "
                                  f"0..{grp.k + grp.m - 1}; got stripe {stripe} piece {index}")
    return grp


def piece_size(nbytes: int, budget: int, what: str) -> None:
    """A piece size a peer names: within the memory budget, whole pages."""
    if not 0 <= nbytes <= budget or nbytes % placement.PIECE_ALIGN_BYTES:
        raise InvalidRequestError(f"{what} {nbytes}: a piece is 0..{budget} bytes (the memory "
                                  f"budget), a multiple of {placement.PIECE_ALIGN_BYTES}")

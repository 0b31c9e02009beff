"""Connecting for DCP: a client that agrees on a gloo group of its own, the gloo group the
readers use, and the job-level calls around a resize (find the newest job, drop one)."""

from __future__ import annotations

import logging
from typing import Any

from shardguard.client.agreement import all_gather
from shardguard.client.client import Client, connect_with
from shardguard.client.membership import control_group, new_gloo_group
from shardguard.client.session import DEFAULT_TIMEOUT_S, ask
from shardguard.proto import agent_pb2 as pb
from shardguard.proto.errors import ShardguardError
from shardguard.proto.paths import default_socket_path

logger = logging.getLogger(__name__)


def connect_dcp(socket: str | None = None, job: str | None = None, *, group: Any = None,
                allow_pickle: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S,
                group_size: int = 0, parity: int = 0) -> Client:
    """:func:`shardguard.client.connect`, with the client agreeing on ``group``.

    ``group`` (default: a new gloo group of every rank) must not be used by the
    training loop while a ``dcp.async_save`` runs; pass the same group as
    ``async_save``'s ``process_group``. Collective, like ``connect``.
    """
    return connect_with(lambda: new_gloo_group() if group is None else group, socket, job,
                        allow_pickle=allow_pickle, timeout_s=timeout_s,
                        group_size=group_size, parity=parity)


def reader_group(group: Any) -> Any:
    """``group``, else the default group if it is gloo, else one new gloo group per process."""
    return group if group is not None else control_group(shared=True)


def job_status(socket_path: str, job: str) -> pb.StatusReply:
    """The daemon's status of ``job`` ("": of every job)."""
    return ask(socket_path, "Status", pb.StatusRequest(job=job))


def newest_job(prefix: str, socket: str | None = None, *, group: Any = None) -> str | None:
    """The job named ``prefix...`` with the newest restorable step on the ranks' daemons.

    A job counts when every daemon that holds it has a restorable step; its step is the
    oldest of theirs. The same answer on every rank (collective over ``group``,
    default: the gloo group the readers use).
    """
    mine: dict[str, int] = {}
    try:
        reply = job_status(socket or default_socket_path(), "")
        for js in reply.jobs:
            if js.job.startswith(prefix):
                mine[js.job] = js.restorable_step if js.HasField("restorable_step") else -1
    except ShardguardError as exc:
        logger.warning("newest_job(%s): daemon not reachable: %s", prefix, exc)
    steps: dict[str, int] = {}
    for seen in all_gather(mine, reader_group(group)):
        for job, step in seen.items():
            steps[job] = min(step, steps.get(job, step))
    found = [(step, job) for job, step in steps.items() if step >= 0]
    return max(found)[1] if found else None


def drop_job(job: str, socket: str | None = None) -> int:
    """Free ``job`` on every node that holds it (``shardguard drop``); returns arenas freed."""
    reply = ask(socket or default_socket_path(), "Drop", pb.DropRequest(job=job, everywhere=True))
    return reply.arenas_freed

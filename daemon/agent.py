"""The local client service: gRPC handlers over the store, on the node's Unix socket.

Every handler validates through the store and maps the project's errors to a
gRPC status in one place (:func:`_handler`); an unexpected exception is logged
and answered as INTERNAL, and the daemon keeps serving.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from importlib import metadata
from typing import Any, Callable, TypeVar

import grpc

from shardguard.daemon.store import Store
from shardguard.proto import agent_pb2 as pb
from shardguard.proto import agent_pb2_grpc as pb_grpc
from shardguard.proto.errors import ERROR_METADATA_KEY, ShardguardError, status_of

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def _handler(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(self: "AgentService", request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except ShardguardError as exc:
            logger.warning("%s refused: %s: %s", fn.__name__, type(exc).__name__, exc)
            context.set_trailing_metadata(((ERROR_METADATA_KEY, type(exc).__name__),))
            context.abort(status_of(exc), str(exc))
        except Exception as exc:  # noqa: BLE001 - the daemon must outlive any one request
            logger.exception("%s failed", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
    return wrapper  # type: ignore[return-value]


def _opt(value: int | None) -> dict[str, int]:
    return {} if value is None else {"step": value}


class AgentService(pb_grpc.AgentServicer):
    def __init__(self, store: Store, socket_path: str) -> None:
        self.store = store
        self.socket_path = socket_path
        self.started = time.monotonic()

    @_handler
    def Register(self, req: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterReply:
        r = self.store.register(req.job, req.rank, req.world_size, req.slot_bytes, req.pid,
                                list(req.local_ranks), req.force)
        reply = pb.RegisterReply(arena_path=r.arena_path, arena_bytes=r.arena_bytes,
                                 slot_bytes=r.slot_bytes, lease=r.lease)
        if r.restorable_step is not None:
            reply.restorable_step = r.restorable_step
        return reply

    @_handler
    def Begin(self, req: pb.BeginRequest, context: grpc.ServicerContext) -> pb.BeginReply:
        return pb.BeginReply(slot=self.store.begin(req.job, req.rank, req.lease, req.step))

    @_handler
    def Seal(self, req: pb.SealRequest, context: grpc.ServicerContext) -> pb.SealReply:
        step = self.store.seal(req.job, req.rank, req.lease, req.step, req.slot, req.data_bytes,
                               req.manifest_offset, req.manifest_bytes)
        return pb.SealReply() if step is None else pb.SealReply(restorable_step=step)

    @_handler
    def Latest(self, req: pb.LatestRequest, context: grpc.ServicerContext) -> pb.LatestReply:
        return pb.LatestReply(**_opt(self.store.latest(req.job)))

    @_handler
    def OpenForRestore(self, req: pb.OpenRequest, context: grpc.ServicerContext) -> pb.OpenReply:
        step = req.step if req.step >= 0 else None
        o = self.store.open_for_restore(req.job, req.rank, req.lease, step)
        return pb.OpenReply(slot=o.slot, step=o.step, data_bytes=o.data_bytes,
                            manifest_offset=o.manifest_offset, manifest_bytes=o.manifest_bytes)

    @_handler
    def Release(self, req: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.ReleaseReply:
        self.store.release(req.job, req.rank, req.lease, req.step)
        return pb.ReleaseReply()

    @_handler
    def Unregister(self, req: pb.UnregisterRequest,
                   context: grpc.ServicerContext) -> pb.UnregisterReply:
        self.store.unregister(req.job, req.rank, req.lease)
        return pb.UnregisterReply()

    @_handler
    def Drop(self, req: pb.DropRequest, context: grpc.ServicerContext) -> pb.DropReply:
        arenas, freed = self.store.drop(req.job)
        return pb.DropReply(arenas_freed=arenas, bytes_freed=freed)

    @_handler
    def Status(self, req: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        jobs = [self.store.job(req.job)] if req.job else self.store.jobs()
        reply = pb.StatusReply(version=_version(), pid=os.getpid(), socket=self.socket_path,
                               memory_budget_bytes=self.store.budget_bytes,
                               memory_used_bytes=self.store.used_bytes(),
                               uptime_s=time.monotonic() - self.started)
        for rec in jobs:
            js = reply.jobs.add(job=rec.job, world_size=rec.world_size,
                                local_ranks=list(rec.local_ranks))
            if rec.restorable_step is not None:
                js.restorable_step = rec.restorable_step
            for rank in sorted(rec.ranks):
                rr = rec.ranks[rank]
                rs = js.ranks.add(rank=rank, arena_path=rr.arena.path, arena_bytes=rr.arena.size,
                                  claimed=rr.claimed_by_live_process(), pid=rr.pid)
                for i, s in enumerate(rr.slots):
                    rs.slots.add(index=i, state=s.state.name.lower(), step=s.step,
                                 data_bytes=s.data_bytes)
        return reply


def _version() -> str:
    try:
        return metadata.version("shardguard")
    except metadata.PackageNotFoundError:
        return "0+unknown"

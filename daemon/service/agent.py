"""The local client service: gRPC handlers over the store, on the node's Unix socket.

Every handler validates through the store and maps the project's errors to a
gRPC status in one place (:func:`handler`); an unexpected exception is logged
and answered as INTERNAL, and the daemon keeps serving.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import threading
import time
from importlib import metadata
from typing import Any, Callable, TypeVar

import grpc

from shardguard.daemon.errors import (
    CorruptionError,
    InvalidRequestError,
    NoSpaceError,
    UnknownJobError,
)
from shardguard.daemon import doctor
from shardguard.daemon.auth import WINDOW_S
from shardguard.daemon.protect import Protector, Topology
from shardguard.daemon.stalls import Cause, Stalls
from shardguard.daemon.store import Store
from shardguard.proto import agent_pb2 as pb
from shardguard.proto import agent_pb2_grpc as pb_grpc
from shardguard.proto.errors import ERROR_METADATA_KEY, ShardguardError, status_of

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def handler(fn: F) -> F:
    """Map the project's errors to gRPC statuses (the one place that does)."""
    @functools.wraps(fn)
    def wrapper(self: "AgentService", request: Any, context: grpc.ServicerContext) -> Any:
        try:
            try:
                return fn(self, request, context)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # The shm directory is full (a neighbour's files, a small tmpfs): typed,
                # named as the stall cause; what was stored before stays intact.
                full = NoSpaceError(f"{fn.__name__}: no space left in the shared-memory "
                                    f"directory ({exc.filename or 'shm'}): {exc.strerror}")
                job = getattr(request, "job", "")
                if job:
                    self.stalls.record(job, Cause.NO_SPACE, str(full))
                raise full from None
        except ShardguardError as exc:
            logger.warning("%s refused: %s: %s", fn.__name__, type(exc).__name__, exc,
                           extra=_log_context(request))
            context.set_trailing_metadata(((ERROR_METADATA_KEY, type(exc).__name__),))
            context.abort(status_of(exc), str(exc))
        except Exception as exc:  # noqa: BLE001 - the daemon must outlive any one request
            logger.exception("%s failed", fn.__name__, extra=_log_context(request))
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
    return wrapper  # type: ignore[return-value]


def _log_context(request: Any) -> dict[str, Any]:
    """The job, step and rank a request names (and the calling node of a peer call)."""
    out = {key: getattr(request, key) for key in ("job", "step", "rank")
           if getattr(request, key, "") not in ("", -1)}  # -1: no step (the restorable one)
    if getattr(request, "node", None) is not None:
        out["peer"] = request.node
    return out


def _opt(value: int | None) -> dict[str, int]:
    return {} if value is None else {"step": value}


class AgentService(pb_grpc.AgentServicer):
    def __init__(self, store: Store, socket_path: str, protector: "Protector | None" = None,
                 control_address: str = "", defaults: tuple[int, int] = (4, 1),
                 metrics_address: str = "", probe: Any = None, budget_why: str = "") -> None:
        self.store = store
        self.budget_why = budget_why  # which limit the memory budget comes from
        self.socket_path = socket_path
        self.protector = protector
        self.control_address = control_address
        self.defaults = defaults
        self.metrics_address = metrics_address
        self.probe = probe  # observe.PeerProbe: which peers answer
        # Why protection is stalled, per job: the protection layer's, or this node's own.
        self.stalls = protector.stalls if protector is not None else Stalls()
        self.started = time.monotonic()
        self._sync_lock = threading.Lock()

    @handler
    def Register(self, req: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterReply:
        topology = self._topology(req)
        r = self.store.register(req.job, req.rank, req.world_size, req.slot_bytes, req.pid,
                                list(req.local_ranks), req.force, topology)
        reply = pb.RegisterReply(arena_path=r.arena_path, arena_bytes=r.arena_bytes,
                                 slot_bytes=r.slot_bytes, lease=r.lease)
        if r.restorable_step is not None:
            reply.restorable_step = r.restorable_step
        return reply

    def _topology(self, req: pb.RegisterRequest) -> dict[str, Any] | None:
        """Validate a multi-node job's node list; on a new one, catch up with the survivors."""
        if len(req.nodes) <= 1:
            return None
        if self.protector is None:
            raise InvalidRequestError("this daemon serves one-node jobs only (no peer service)")
        if req.node_index >= len(req.nodes):
            raise InvalidRequestError(
                f"node_index {req.node_index} outside the {len(req.nodes)}-node list")
        if req.nodes[req.node_index].control != self.control_address:
            raise InvalidRequestError(
                f"node {req.node_index} of the list is {req.nodes[req.node_index].control}, "
                f"not this daemon ({self.control_address})")
        # Nothing is rebuilt for a request the store would refuse.
        self.store.check_register(req.job, req.rank, req.world_size, req.slot_bytes, req.pid,
                                  list(req.local_ranks), req.force)
        group_size = req.group_size or self.defaults[0]
        parity = req.parity or self.defaults[1]
        topo = Topology(tuple((n.control, n.data) for n in req.nodes), req.node_index,
                        group_size, parity)
        topo.placement  # noqa: B018 - raises ConfigError for an impossible code
        with self._sync_lock:
            known = None
            try:
                known = self.store.job(req.job).topology
            except UnknownJobError:
                pass
            # A new node list, a catch-up that failed (a peer was down), or nothing
            # restorable here (a node restarted before it had caught up): (re)build.
            if (known != topo.to_doc() or self.protector.failure(req.job) is not None
                    or self.store.latest(req.job) is None):
                self.protector.sync(req.job, topo, req.world_size, list(req.local_ranks))
        return topo.to_doc()

    @handler
    def Begin(self, req: pb.BeginRequest, context: grpc.ServicerContext) -> pb.BeginReply:
        slot = self.store.begin(req.job, req.rank, req.lease, req.step)
        if req.skipped:
            self.store.metrics.skipped(req.job, req.skipped)
        return pb.BeginReply(slot=slot)

    @handler
    def Seal(self, req: pb.SealRequest, context: grpc.ServicerContext) -> pb.SealReply:
        step = self.store.seal(req.job, req.rank, req.lease, req.step, req.slot, req.data_bytes,
                               req.manifest_offset, req.manifest_bytes)
        if step is None:
            return pb.SealReply()
        self.stalls.clear(req.job)  # a step became restorable: protection works here
        return pb.SealReply(restorable_step=step)

    @handler
    def Latest(self, req: pb.LatestRequest, context: grpc.ServicerContext) -> pb.LatestReply:
        self._raise_failure(req.job)
        return pb.LatestReply(**_opt(self.store.latest(req.job)))

    @handler
    def OpenForRestore(self, req: pb.OpenRequest, context: grpc.ServicerContext) -> pb.OpenReply:
        step = req.step if req.step >= 0 else None
        self._raise_failure(req.job)
        try:
            o = self.store.open_for_restore(req.job, req.rank, req.lease, step)
        except CorruptionError:
            if self.protector is None or self.store.job(req.job).topology is None:
                raise
            # Corruption is repaired from the stripe, not returned.
            self.protector.repair(req.job, req.rank)
            o = self.store.open_for_restore(req.job, req.rank, req.lease, step)
        return pb.OpenReply(slot=o.slot, step=o.step, data_bytes=o.data_bytes,
                            manifest_offset=o.manifest_offset, manifest_bytes=o.manifest_bytes)

    @handler
    def Release(self, req: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.ReleaseReply:
        self.store.release(req.job, req.rank, req.lease, req.step)
        return pb.ReleaseReply()

    @handler
    def Unregister(self, req: pb.UnregisterRequest,
                   context: grpc.ServicerContext) -> pb.UnregisterReply:
        self.store.unregister(req.job, req.rank, req.lease)
        return pb.UnregisterReply()

    @handler
    def Drop(self, req: pb.DropRequest, context: grpc.ServicerContext) -> pb.DropReply:
        if self.protector is None:
            arenas, freed = self.store.drop(req.job)
            return pb.DropReply(arenas_freed=arenas, bytes_freed=freed, nodes=1)
        if req.everywhere:
            arenas, freed, nodes, unreachable = self.protector.drop_everywhere(req.job)
            return pb.DropReply(arenas_freed=arenas, bytes_freed=freed, nodes=nodes,
                                unreachable=unreachable)
        arenas, freed = self.protector.drop(req.job)
        return pb.DropReply(arenas_freed=arenas, bytes_freed=freed, nodes=1)

    @handler
    def Verify(self, req: pb.VerifyRequest, context: grpc.ServicerContext) -> pb.VerifyReply:
        from shardguard.daemon.verify import summarize, verify_job

        report = verify_job(self.protector, self.store, req.job,
                            req.step if req.HasField("step") else None)
        return pb.VerifyReply(**summarize(report), report=json.dumps(report).encode())

    @handler
    def Doctor(self, req: pb.DoctorRequest, context: grpc.ServicerContext) -> pb.DoctorReply:
        found = doctor.examine(self.store, self.protector, self.stalls, self.socket_path,
                               self.budget_why, self.defaults, req.job)
        return pb.DoctorReply(findings=[pb.Finding(check=f.check, level=f.level,
                                                   detail=f.detail, where=f.where)
                                        for f in found])

    @handler
    def Status(self, req: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        jobs = [self.store.job(req.job)] if req.job else self.store.jobs()
        reply = pb.StatusReply(version=_version(), pid=os.getpid(), socket=self.socket_path,
                               memory_budget_bytes=self.store.budget_bytes,
                               memory_used_bytes=self.store.used_bytes(),
                               uptime_s=time.monotonic() - self.started,
                               metrics_address=self.metrics_address,
                               default_group_size=self.defaults[0],
                               default_parity=self.defaults[1], time_unix=time.time(),
                               token_window_s=WINDOW_S)
        if self.protector is not None:
            reply.address.control = self.control_address
            reply.address.data = self.protector.plane.address
            reply.secret_fingerprint = self.protector.auth.fingerprint()
            reply.peer_tls = self.protector.tls is not None
        for rec in jobs:
            js = reply.jobs.add(job=rec.job, world_size=rec.world_size,
                                local_ranks=list(rec.local_ranks))
            if rec.restorable_step is not None:
                js.restorable_step = rec.restorable_step
            stall = self.stalls.get(rec.job)
            if stall is not None:
                js.stall_cause, js.stall_detail = stall.cause.value, stall.detail
            if rec.topology:
                js.nodes = len(rec.topology["nodes"])
                js.node_index = rec.topology["node_index"]
                js.group_size = rec.topology["group_size"]
                js.parity = rec.topology["parity"]
                self._parity_status(js, rec)
            for rank in sorted(rec.ranks):
                rr = rec.ranks[rank]
                rs = js.ranks.add(rank=rank, arena_path=rr.arena.path, arena_bytes=rr.arena.size,
                                  claimed=rr.claimed_by_live_process(), pid=rr.pid)
                for i, s in enumerate(rr.slots):
                    rs.slots.add(index=i, state=s.state.name.lower(), step=s.step,
                                 data_bytes=s.data_bytes)
        return reply


    def _parity_status(self, js: pb.JobStatus, rec: Any) -> None:
        """Group, parity pieces held, step in flight and peers reachable of a multi-node job."""
        topo = Topology.from_doc(rec.topology)
        grp = topo.placement.group_of(topo.node_index)
        js.group = grp.group
        js.group_nodes.extend(grp.nodes)
        steps = [s.step for rr in rec.ranks.values() for s in rr.slots
                 if s.state.name in ("WRITING", "SEALED")]
        newer = [s for s in steps if rec.restorable_step is None or s > rec.restorable_step]
        if newer:
            js.in_flight_step = max(newer)
        meta = self.protector.meta(rec.job) if self.protector is not None else None
        if meta is not None and meta["step"] == rec.restorable_step:
            js.parity_pieces = sum(
                1 for where, st in meta["stripes"].items()
                for idx, piece in st["pieces"].items()
                if int(piece["node"]) == topo.node_index
                and int(idx) >= topo.placement.groups[int(where.split("/")[0])].k)
        if self.probe is not None:
            js.peers, js.peers_up = self.probe.counts(rec.topology)
        if not js.stall_cause and self.probe is not None and (
                down := self.probe.down(rec.topology)):
            data_only = all(d.endswith("(data port)") for d in down)
            js.stall_cause = (Cause.DATA_UNREACHABLE if data_only
                              else Cause.PEER_UNREACHABLE).value
            js.stall_detail = "peers not answering: " + ", ".join(down)

    def _raise_failure(self, job: str) -> None:
        failure = self.protector.failure(job) if self.protector is not None else None
        if failure is not None:
            raise failure


def _version() -> str:
    try:
        return metadata.version("shardguard")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class _Undecodable:
    """What a request that does not parse becomes, so that the handler can refuse it typed."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


class DecodeGuard(grpc.ServerInterceptor):
    """Requests that do not parse get InvalidRequestError (typed), not grpc's own error.

    Outermost interceptor: it parses the request itself and answers before any
    other interceptor or handler (authentication included) sees it.
    """

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        parse, inner, method = handler.request_deserializer, handler.unary_unary, details.method

        def tolerant(raw: bytes) -> Any:
            try:
                return parse(raw)
            except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's fault
                return _Undecodable(exc)

        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                exc = InvalidRequestError(f"{method}: the request does not parse "
                                          f"({type(request.exc).__name__})")
                logger.warning("refused: %s", exc)
                context.set_trailing_metadata(((ERROR_METADATA_KEY, type(exc).__name__),))
                context.abort(status_of(exc), str(exc))
            return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=tolerant,
            response_serializer=handler.response_serializer)

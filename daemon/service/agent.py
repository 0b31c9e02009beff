"""The local client service: the trainers' gRPC calls on the node's Unix socket.

Each handler validates through the store (and, for a multi-node job, the catch-up and
the roles) and maps errors to gRPC statuses at the boundary (service/boundary.py).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import grpc

from shardguard.daemon.base.stalls import Stalls
from shardguard.daemon.coding import placement
from shardguard.daemon.errors import CorruptionError, InvalidRequestError, UnknownJobError
from shardguard.daemon.roles import doctor
from shardguard.daemon.roles.verify import Verifier, summarize
from shardguard.daemon.service.boundary import handler
from shardguard.daemon.service.status import NodeInfo, status
from shardguard.daemon.service.wiring import Roles
from shardguard.daemon.storage.slot_checks import ClientBlocks
from shardguard.daemon.storage.store import Store
from shardguard.proto import agent_pb2 as pb
from shardguard.proto import agent_pb2_grpc as pb_grpc
from shardguard.proto.meta import Topology


def _opt(value: int | None) -> dict[str, int]:
    return {} if value is None else {"step": value}


class AgentService(pb_grpc.AgentServicer):
    """The Agent service over a node's store and (multi-node jobs) its roles."""

    def __init__(self, store: Store, socket_path: str, roles: Roles | None = None,
                 control_address: str = "", defaults: tuple[int, int, str] = (4, 1, "contiguous"),
                 metrics_address: str = "", probe: Any = None, budget_why: str = "") -> None:
        self.store, self.roles, self.probe = store, roles, probe
        self.defaults = defaults
        self.budget_why = budget_why  # which limit the memory budget comes from
        self.info = NodeInfo(socket_path, control_address, defaults[:2], metrics_address,
                             time.monotonic())
        # Why protection is stalled, per job: the roles', or this node's own.
        self.stalls = roles.stalls if roles is not None else Stalls()
        self.verifier = roles.verifier if roles is not None else \
            Verifier(store, None, None, None, None, self.stalls, 10.0)
        self._sync_lock = threading.Lock()

    @handler
    def Register(self, req: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterReply:
        topology = self._topology(req)
        r = self.store.register(req.job, req.rank, req.world_size, req.slot_bytes, req.pid,
                                list(req.local_ranks), req.force, topology, req.epoch)
        if self.roles is not None and self.roles.exit_flush is not None:
            self.roles.exit_flush.saw_trainer(req.job)
        reply = pb.RegisterReply(arena_path=r.arena_path, arena_bytes=r.arena_bytes,
                                 slot_bytes=r.slot_bytes, lease=r.lease,
                                 lazy_slots=r.lazy_slots)
        if r.restorable_step is not None:
            reply.restorable_step = r.restorable_step
        return reply

    def _topology(self, req: pb.RegisterRequest) -> Topology | None:
        """Validate a multi-node job's node list; on a new one, catch up with the survivors."""
        if len(req.nodes) <= 1:
            return None
        if self.roles is None:
            raise InvalidRequestError("this daemon serves one-node jobs only (no peer service)")
        if req.node_index >= len(req.nodes):
            raise InvalidRequestError(
                f"node_index {req.node_index} outside the {len(req.nodes)}-node list")
        if req.nodes[req.node_index].control != self.info.control_address:
            raise InvalidRequestError(
                f"node {req.node_index} of the list is {req.nodes[req.node_index].control}, "
                f"not this daemon ({self.info.control_address})")
        # Nothing is rebuilt for a request the store would refuse.
        self.store.check_register(req.job, req.rank, req.world_size, req.slot_bytes, req.pid,
                                  list(req.local_ranks), req.force)
        topo = Topology(tuple((n.control, n.data) for n in req.nodes), req.node_index,
                        req.group_size or self.defaults[0], req.parity or self.defaults[1],
                        self.defaults[2])
        placement.placement_of(topo)  # raises ConfigError for an impossible code
        with self._sync_lock:
            known = None
            try:
                known = self.store.job(req.job).topology
            except UnknownJobError:
                pass
            # A new node list, a catch-up that failed (a peer was down), or nothing
            # restorable here (a node restarted before it had caught up): (re)build.
            if (known != topo or self.roles.catchup.failure(req.job) is not None
                    or self.store.latest(req.job) is None):
                self.roles.catchup.sync(req.job, topo, req.world_size, list(req.local_ranks))
        return topo

    @handler
    def Begin(self, req: pb.BeginRequest, context: grpc.ServicerContext) -> pb.BeginReply:
        slot = self.store.begin(req.job, req.rank, req.lease, req.step)
        if req.skipped:
            self.store.metrics.skipped(req.job, req.skipped)
        return pb.BeginReply(slot=slot)

    @handler
    def Seal(self, req: pb.SealRequest, context: grpc.ServicerContext) -> pb.SealReply:
        given = ClientBlocks(req.block_bytes, req.block_crcs) if req.block_bytes else None
        step = self.store.seal(req.job, req.rank, req.lease, req.step, req.slot, req.data_bytes,
                               req.manifest_offset, req.manifest_bytes, given)
        if step is None:
            return pb.SealReply()
        if step == req.step:
            # This seal made its step restorable (a one-node job): protection works here.
            # (A multi-node job's seal answers the previous restorable step: that says
            # nothing of a stall still going on.)
            self.stalls.clear(req.job)
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
            o = self.store.open_for_restore(req.job, req.rank, req.lease, step,
                                            req.client_checks)
        except CorruptionError:
            if self.roles is None or self.store.job(req.job).topology is None:
                raise
            # Corruption is repaired from the stripe, not returned.
            self.roles.catchup.repair(req.job, req.rank)
            o = self.store.open_for_restore(req.job, req.rank, req.lease, step,
                                            req.client_checks)
        r = o.record
        return pb.OpenReply(slot=o.slot, step=r.step, data_bytes=r.data_bytes,
                            manifest_offset=r.manifest_offset, manifest_bytes=r.manifest_bytes,
                            data_crc=r.data_crc, manifest_crc=r.manifest_crc, check=o.check)

    @handler
    def Release(self, req: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.ReleaseReply:
        self.store.release(req.job, req.rank, req.lease, req.step, req.corrupt)
        return pb.ReleaseReply()

    @handler
    def Unregister(self, req: pb.UnregisterRequest,
                   context: grpc.ServicerContext) -> pb.UnregisterReply:
        self.store.unregister(req.job, req.rank, req.lease)
        return pb.UnregisterReply()

    @handler
    def Drop(self, req: pb.DropRequest, context: grpc.ServicerContext) -> pb.DropReply:
        if self.roles is None:
            arenas, freed = self.store.drop(req.job)
            return pb.DropReply(arenas_freed=arenas, bytes_freed=freed, nodes=1)
        if req.everywhere:
            arenas, freed, nodes, unreachable = self.roles.dropper.drop_everywhere(req.job)
            return pb.DropReply(arenas_freed=arenas, bytes_freed=freed, nodes=nodes,
                                unreachable=unreachable)
        arenas, freed = self.roles.dropper.drop(req.job)
        return pb.DropReply(arenas_freed=arenas, bytes_freed=freed, nodes=1)

    @handler
    def Verify(self, req: pb.VerifyRequest, context: grpc.ServicerContext) -> pb.VerifyReply:
        report = self.verifier.verify_job(req.job, req.step if req.HasField("step") else None)
        return pb.VerifyReply(**summarize(report), report=json.dumps(report.to_doc()).encode())

    @handler
    def Doctor(self, req: pb.DoctorRequest, context: grpc.ServicerContext) -> pb.DoctorReply:
        found = doctor.examine(self.store, self.stalls,
                               self.roles.reach if self.roles is not None else None,
                               self.info.socket_path, self.budget_why, req.job)
        return pb.DoctorReply(findings=[pb.Finding(check=f.check, level=f.level,
                                                   detail=f.detail, where=f.where)
                                        for f in found])

    @handler
    def Status(self, req: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        return status(self.store, self.roles, self.stalls, self.probe, self.info, req.job)

    def _raise_failure(self, job: str) -> None:
        failure = self.roles.catchup.failure(job) if self.roles is not None else None
        if failure is not None:
            raise failure

"""The peer service: daemon-to-daemon control over gRPC on TCP, each call handed to its role.

Documents arrive as bytes (JSON) and are parsed here, once, into the typed contracts of
proto/meta.py; a document that does not parse is refused typed (InvalidRequestError).
"""

from __future__ import annotations

import grpc

from shardguard.daemon.errors import InvalidRequestError
from shardguard.daemon.roles import doctor
from shardguard.daemon.roles.state import ProtectionState
from shardguard.daemon.service.boundary import handler, version
from shardguard.daemon.service.wiring import Roles
from shardguard.daemon.transport.delivery import RECEIVED_WAIT_MS
from shardguard.proto import peer_pb2 as ppb
from shardguard.proto import peer_pb2_grpc as ppb_grpc
from shardguard.proto.meta import StepMeta, decode_report


class PeerService(ppb_grpc.PeerServicer):
    def __init__(self, roles: Roles) -> None:
        self.roles = roles
        self.stalls = roles.stalls

    @handler
    def Offer(self, req: ppb.OfferRequest, context: grpc.ServicerContext) -> ppb.OfferReply:
        return ppb.OfferReply(piece_bytes=self.roles.encoder.offer(req))

    @handler
    def Report(self, req: ppb.ReportRequest, context: grpc.ServicerContext) -> ppb.ReportReply:
        assert self.roles.reporter.local is not None
        self.roles.reporter.local(req.job, req.step, req.node, decode_report(req.report))
        return ppb.ReportReply()

    @handler
    def Commit(self, req: ppb.CommitRequest, context: grpc.ServicerContext) -> ppb.CommitReply:
        self.roles.leader.commit(req.job, req.step, req.tier)
        return ppb.CommitReply()

    @handler
    def Announce(self, req: ppb.AnnounceRequest,
                 context: grpc.ServicerContext) -> ppb.AnnounceReply:
        self.roles.store.job(req.job)  # UnknownJobError before the document is parsed
        self.roles.follower.announce(req.job, req.step,
                                     StepMeta.decode(req.meta, req.job, req.step))
        return ppb.AnnounceReply()

    @handler
    def StepInfo(self, req: ppb.StepInfoRequest,
                 context: grpc.ServicerContext) -> ppb.StepInfoReply:
        meta, holder = self.roles.metas.current(req.job)
        reply = ppb.StepInfoReply()
        if meta is not None:
            reply.step, reply.meta = meta.step, meta.encode()
        if holder is not None:
            reply.holder = holder
        return reply

    @handler
    def DropJob(self, req: ppb.DropJobRequest, context: grpc.ServicerContext) -> ppb.DropJobReply:
        arenas, freed = self.roles.dropper.drop(req.job)
        return ppb.DropJobReply(arenas_freed=arenas, bytes_freed=freed)

    @handler
    def VerifyLocal(self, req: ppb.VerifyLocalRequest,
                    context: grpc.ServicerContext) -> ppb.VerifyLocalReply:
        return ppb.VerifyLocalReply(report=self.roles.verifier.check_node(req.job,
                                                                         req.step).encode())

    @handler
    def Received(self, req: ppb.ReceivedRequest,
                 context: grpc.ServicerContext) -> ppb.ReceivedReply:
        state: ProtectionState = self.roles.state
        return ppb.ReceivedReply(got=state.wait_received(
            req.job, req.step, req.group, req.stripe, req.index, req.want,
            min(req.wait_ms, RECEIVED_WAIT_MS) / 1000, req.seal))

    @handler
    def Flush(self, req: ppb.FlushRequest, context: grpc.ServicerContext) -> ppb.FlushReply:
        if self.roles.exit_flush is None:
            raise InvalidRequestError("this daemon has no persistent tier")
        self.roles.exit_flush.flush(req.job, req.step, req.tier)
        return ppb.FlushReply()

    @handler
    def Facts(self, req: ppb.FactsRequest, context: grpc.ServicerContext) -> ppb.FactsReply:
        return doctor.facts(self.roles.store, self.roles.reach, req.job, version())

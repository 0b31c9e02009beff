"""The peer service: daemon-to-daemon control over gRPC on TCP (handlers over the protector)."""

from __future__ import annotations

import json
import logging

import grpc

from shardguard.daemon import doctor
from shardguard.daemon.agent import _version, handler
from shardguard.daemon.errors import InvalidRequestError
from shardguard.daemon.protect import Protector
from shardguard.proto import peer_pb2 as ppb
from shardguard.proto import peer_pb2_grpc as ppb_grpc

logger = logging.getLogger(__name__)


class PeerService(ppb_grpc.PeerServicer):
    def __init__(self, protector: Protector) -> None:
        self.p = protector

    @handler
    def Offer(self, req: ppb.OfferRequest, context: grpc.ServicerContext) -> ppb.OfferReply:
        return ppb.OfferReply(piece_bytes=self.p.offer(req))

    @handler
    def Report(self, req: ppb.ReportRequest, context: grpc.ServicerContext) -> ppb.ReportReply:
        try:
            report = json.loads(req.report)
        except (ValueError, RecursionError) as exc:
            raise InvalidRequestError(f"report is not JSON: {exc}") from None
        self.p.report(req.job, req.step, req.node, report)
        return ppb.ReportReply()

    @handler
    def Announce(self, req: ppb.AnnounceRequest,
                 context: grpc.ServicerContext) -> ppb.AnnounceReply:
        self.p.announce(req.job, req.step, req.meta)
        return ppb.AnnounceReply()

    @handler
    def StepInfo(self, req: ppb.StepInfoRequest,
                 context: grpc.ServicerContext) -> ppb.StepInfoReply:
        step, meta, holder = self.p.step_info(req.job)
        reply = ppb.StepInfoReply(meta=meta)
        if step is not None:
            reply.step = step
        if holder is not None:
            reply.holder = holder
        return reply

    @handler
    def DropJob(self, req: ppb.DropJobRequest, context: grpc.ServicerContext) -> ppb.DropJobReply:
        arenas, freed = self.p.drop(req.job)
        return ppb.DropJobReply(arenas_freed=arenas, bytes_freed=freed)

    @handler
    def Facts(self, req: ppb.FactsRequest, context: grpc.ServicerContext) -> ppb.FactsReply:
        return doctor.facts(self.p, req.job, (self.p.config.group_size, self.p.config.parity),
                            _version())

    @handler
    def Received(self, req: ppb.ReceivedRequest,
                 context: grpc.ServicerContext) -> ppb.ReceivedReply:
        return ppb.ReceivedReply(got=self.p.received(req))

    @handler
    def VerifyLocal(self, req: ppb.VerifyLocalRequest,
                    context: grpc.ServicerContext) -> ppb.VerifyLocalReply:
        from shardguard.daemon.verify import check_node

        return ppb.VerifyLocalReply(report=json.dumps(check_node(self.p, req.job,
                                                                 req.step)).encode())

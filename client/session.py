"""A rank's gRPC session with its node daemon: the channel, the registration and its lease,
the rank's arena as the daemon handed it out, each call the client makes, and the one
place where a failed call becomes the typed error the daemon raised.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import grpc

from shardguard.client.arena_map import ArenaMap, map_arena
from shardguard.proto import agent_pb2 as pb
from shardguard.proto import agent_pb2_grpc as pb_grpc
from shardguard.proto.errors import (
    DaemonUnavailableError,
    LeaseError,
    ShardguardError,
    error_from_rpc,
)
from shardguard.proto.crc32c import SEAL_BLOCK_BYTES
from shardguard.proto.paths import grpc_target

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0


def invoke(stub: pb_grpc.AgentStub, method: str, request: Any, timeout_s: float) -> Any:
    """``stub.<method>(request)``; a failed call raises the typed error the daemon raised
    (:func:`shardguard.proto.errors.error_from_rpc`)."""
    try:
        return getattr(stub, method)(request, timeout=timeout_s)
    except grpc.RpcError as exc:
        raise error_from_rpc(exc) from None


def ask(socket_path: str, method: str, request: Any,
        timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """One call on a channel of its own (connect-time checks, job listing, drop)."""
    with grpc.insecure_channel(grpc_target(socket_path)) as ch:
        return invoke(pb_grpc.AgentStub(ch), method, request, timeout_s)


@dataclass(frozen=True)
class Registration:
    """Who a rank registers as: its job, rank and world, its node's local ranks, the job's
    node list and its node's index in it, the erasure code (0: the daemon's default)."""

    job: str
    rank: int
    world_size: int
    local_ranks: list[int]
    nodes: list[tuple[str, str]] = field(default_factory=list)
    node_index: int = 0
    group_size: int = 0
    parity: int = 0
    force: bool = False
    epoch: int = 0  # the launch (client/membership.py)


class Session:
    """The rank's registration with its node daemon and the calls made under its lease."""

    def __init__(self, socket_path: str, reg: Registration, timeout_s: float) -> None:
        self.reg = reg
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(
            grpc_target(socket_path), options=[("grpc.enable_retries", 0)])
        self._stub = pb_grpc.AgentStub(self._channel)
        self.lease = ""
        #: A call found the daemon gone or our lease unknown (a restarted daemon adopts
        #: the arena, not the lease): the next snapshot registers again.
        self.lost = False
        self.arena: ArenaMap | None = None

    def call(self, method: str, request: Any) -> Any:
        try:
            return invoke(self._stub, method, request, self.timeout_s)
        except (DaemonUnavailableError, LeaseError):
            self.lost = True
            raise

    def register(self, slot_bytes: int) -> ArenaMap:
        """Register (again) with slots of ``slot_bytes``; maps the arena the daemon hands out."""
        r = self.reg
        reply = self.call("Register", pb.RegisterRequest(
            job=r.job, rank=r.rank, world_size=r.world_size, slot_bytes=slot_bytes,
            pid=os.getpid(), local_ranks=r.local_ranks, force=r.force,
            nodes=[pb.NodeAddress(control=c, data=d) for c, d in r.nodes],
            node_index=r.node_index, group_size=r.group_size, parity=r.parity,
            epoch=r.epoch))
        self.lease = reply.lease
        self.lost = False
        if self.arena is not None:
            self.arena.close()
        self.arena = map_arena(reply.arena_path, reply.arena_bytes, reply.slot_bytes,
                               reply.lazy_slots)
        return self.arena

    def begin(self, step: int, skipped: int) -> int:
        """Claim the free slot for ``step``; returns the slot."""
        return self.call("Begin", pb.BeginRequest(
            job=self.reg.job, rank=self.reg.rank, lease=self.lease, step=step,
            skipped=min(skipped, 2**32 - 1))).slot

    def seal(self, lease: str, step: int, slot: int, data_bytes: int, manifest_offset: int,
             manifest_bytes: int, blocks: list[int] | None = None) -> int | None:
        """Seal ``slot`` (begun under ``lease``), with the CRC32C of each block of its data
        (``SEAL_BLOCK_BYTES``; None: the daemon reads the data to make them); returns
        the restorable step, if known."""
        reply = self.call("Seal", pb.SealRequest(
            job=self.reg.job, rank=self.reg.rank, lease=lease, step=step, slot=slot,
            data_bytes=data_bytes, manifest_offset=manifest_offset,
            manifest_bytes=manifest_bytes, block_bytes=SEAL_BLOCK_BYTES if blocks is not None
            else 0, block_crcs=blocks or ()))
        return reply.restorable_step if reply.HasField("restorable_step") else None

    def latest(self) -> int:
        """The daemon's restorable step of the job (-1: none)."""
        reply = self.call("Latest", pb.LatestRequest(job=self.reg.job))
        return reply.step if reply.HasField("step") else -1

    def open_for_restore(self, step: int) -> Any:
        """Pin the slot of ``step``; the reply names it and the checksums the client checks
        what it reads against (``client_checks``: the daemon does not read it again)."""
        return self.call("OpenForRestore", pb.OpenRequest(
            job=self.reg.job, rank=self.reg.rank, lease=self.lease, step=step,
            client_checks=True))

    def release(self, step: int, corrupt: bool = False) -> None:
        """Unpin the slot of ``step``; ``corrupt``: what we read failed its checksum (the
        daemon re-checks the slot and raises CorruptionError if its bytes are bad)."""
        self.call("Release", pb.ReleaseRequest(job=self.reg.job, rank=self.reg.rank,
                                               lease=self.lease, step=step, corrupt=corrupt))

    def stall(self) -> str:
        """Why the daemon says protection is stalled ("" when it does not, or is only slow);
        a daemon that does not answer is a stall too (and the session is lost: the next
        snapshot registers again), so nobody waits ``protect_timeout_s`` for a step that
        died with it."""
        try:
            st = invoke(self._stub, "Status", pb.StatusRequest(job=self.reg.job), self.timeout_s)
        except DaemonUnavailableError as exc:
            self.lost = True
            return f"daemon_unavailable: the node's daemon does not answer ({exc})"
        except ShardguardError:
            return ""
        for js in st.jobs:
            if js.job == self.reg.job and js.stall_cause and js.stall_cause != "too_slow":
                return f"{js.stall_cause}: {js.stall_detail}"
        return ""

    def close(self) -> None:
        """Give up the rank's claim (snapshots stay stored), unmap the arena, close."""
        try:
            self.call("Unregister", pb.UnregisterRequest(job=self.reg.job, rank=self.reg.rank,
                                                         lease=self.lease))
        except ShardguardError as exc:
            logger.warning("job=%s rank=%d unregister failed: %s", self.reg.job, self.reg.rank,
                           exc)
        if self.arena is not None:
            self.arena.close()
            self.arena = None
        self._channel.close()

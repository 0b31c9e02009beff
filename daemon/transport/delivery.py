"""Knowing that a pushed piece arrived: the receiver counts the bytes, the sender asks.

ZeroMQ takes frames without saying whether they arrive: a blocked data port or a link
that drops them would lose a piece silently, and closing the socket drops what is still
queued. So a sender keeps the socket open and asks the receiver (peer ``Received``,
over the control port) how many bytes of the piece it has, until it has them all. As
long as bytes keep arriving it waits (a slow link is slow, not broken; past
``peer_timeout_s`` it is named ``too_slow``); no byte for ``peer_timeout_s`` raises
:class:`PeerUnavailableError` naming the data port.
"""

from __future__ import annotations

import time

from shardguard.daemon.base.stalls import Cause, Stalls
from shardguard.daemon.errors import PeerUnavailableError
from shardguard.daemon.transport.peer_client import PeerClients
from shardguard.proto import peer_pb2 as ppb

#: Longest one ``Received`` call waits for a piece's bytes before answering how many came.
RECEIVED_WAIT_MS = 1000


class Delivery:
    """Confirms pushed pieces with their receivers."""

    def __init__(self, peers: PeerClients, timeout_s: float, stalls: Stalls) -> None:
        self.peers, self.timeout_s, self.stalls = peers, timeout_s, stalls

    def confirm(self, where: ppb.ReceivedRequest, expected: int, node: int, control: str,
                data: str) -> None:
        """Block until ``expected`` bytes of the piece ``where`` names arrived at ``node``."""
        if expected == 0:
            return
        started = last_progress = time.monotonic()
        have, slow = 0, False
        req = ppb.ReceivedRequest()
        req.CopyFrom(where)
        req.wait_ms, req.want = RECEIVED_WAIT_MS, expected
        while True:
            got = self.peers.stub(control).Received(
                req, timeout=self.timeout_s + RECEIVED_WAIT_MS / 1000).got
            now = time.monotonic()
            if got >= expected:
                break
            if got > have:
                have, last_progress = got, now
            if not slow and now - started > self.timeout_s:
                slow = True  # named while it lasts, not only once the piece is in
                self.stalls.record(where.job, Cause.TOO_SLOW, (
                    f"step {where.step}: sending {expected / 1e6:.1f} MB to node {node} "
                    f"({data}): {got / 1e6:.1f} MB in {now - started:.0f}s "
                    f"({got / (now - started) / 1e6:.2f} MB/s); the trainers skip snapshots "
                    f"meanwhile"))
            elif now - last_progress > self.timeout_s:
                raise PeerUnavailableError(
                    f"data port {data} of node {node}: {got} of {expected} bytes of piece "
                    f"{where.index} of group {where.group} stripe {where.stripe} arrived, none "
                    f"for {now - last_progress:.0f}s: the data port is unreachable or the "
                    f"link dropped them")
        took = time.monotonic() - started
        if took > self.timeout_s:
            self.stalls.record(where.job, Cause.TOO_SLOW, (
                f"step {where.step}: {expected / 1e6:.1f} MB to node {node} ({data}) took "
                f"{took:.0f}s ({expected / took / 1e6:.2f} MB/s); the trainers skip snapshots "
                f"meanwhile"))
        else:
            self.stalls.clear(where.job, Cause.TOO_SLOW)  # fast again

"""Knowing that a pushed piece arrived: the receiver counts the bytes, the sender asks.

ZeroMQ takes frames without saying whether they arrive: a blocked data port or a link
that drops them would lose a piece silently, and closing the socket drops what is still
queued. So a sender keeps the socket open and asks the receiver (peer ``Received``,
over the control port) how many bytes of the piece it has, until it has them all. As
long as bytes keep arriving it waits (a slow link is slow, not broken; past
``peer_timeout_s`` it is named ``too_slow``); a data port that takes no byte for
``peer_timeout_s`` raises :class:`PeerUnavailableError` naming it.

The receiver counts whole ZeroMQ frames (up to 8 MiB), and pieces to one node share its
link: on a slow link a piece may see no frame for a while because another piece to the
same node is taking the bytes, or because one frame takes longer than the timeout. So
"no byte" is judged per destination and below the frame: any piece to it that grows
counts, and so does any byte the receiving kernel acknowledged on the piece's own
connection (TCP's count, transport/tcp_counts.py); where that count is unknown, the quiet
time allowed is the larger of ``peer_timeout_s`` and :data:`QUIET_FRAMES` times what
one frame to that node took lately. A cut link shows nothing new after the cut: no
frame and no acknowledged byte, named after ``peer_timeout_s``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from shardguard.daemon.base.stalls import Cause, Stalls
from shardguard.daemon.errors import PeerUnavailableError
from shardguard.daemon.transport.dataplane import FRAME_BYTES, Counted
from shardguard.daemon.transport.peer_client import PeerClients
from shardguard.proto import peer_pb2 as ppb

#: Longest one ``Received`` call waits for a piece's bytes before answering how many came.
RECEIVED_WAIT_MS = 1000
#: Frame times (as the link lately showed them) a piece may see no byte arrive.
QUIET_FRAMES = 3
#: Weight of a new sample in a link's running frame time.
SAMPLE_WEIGHT = 0.5


@dataclass
class _Link:
    """What the pieces sent to one data port saw of it."""
    last_progress: float = 0.0  # time.monotonic() a byte of any piece last arrived
    frame_s: float = 0.0        # seconds one frame took, a running mean; 0: not known


class Delivery:
    """Confirms pushed pieces with their receivers."""

    def __init__(self, peers: PeerClients, timeout_s: float, stalls: Stalls) -> None:
        self.peers, self.timeout_s, self.stalls = peers, timeout_s, stalls
        self._lock = threading.Lock()
        self._links: dict[str, _Link] = {}

    def _progress(self, data: str, now: float, got: int, took: float) -> None:
        """``got`` more bytes (whole frames) reached ``data``, ``took`` seconds after the
        piece's previous ones (or its start)."""
        sample = took / -(-got // FRAME_BYTES)
        with self._lock:
            link = self._moved(data, now)
            link.frame_s = sample if link.frame_s == 0 else (
                SAMPLE_WEIGHT * sample + (1 - SAMPLE_WEIGHT) * link.frame_s)

    def _moved(self, data: str, now: float) -> _Link:
        """The link to ``data`` carried bytes at ``now`` (a frame, or bytes its far kernel
        acknowledged); the caller holds the lock."""
        link = self._links.setdefault(data, _Link())
        link.last_progress = max(link.last_progress, now)
        return link

    def quiet(self, data: str, mine: float, now: float) -> tuple[float, float]:
        """(seconds since a byte of any piece reached ``data``, or of this piece at
        ``mine``; seconds allowed) as of ``now``."""
        with self._lock:
            link = self._links.get(data, _Link())
            return (now - max(mine, link.last_progress),
                    max(self.timeout_s, QUIET_FRAMES * link.frame_s))

    def confirm(self, where: ppb.ReceivedRequest, expected: int, node: int, control: str,
                data: str, acked: Counted = lambda: None) -> None:
        """Block until ``expected`` bytes of the piece ``where`` names arrived at ``node``;
        ``acked()`` is what its connection's far end acknowledged so far (None: unknown)."""
        if expected == 0:
            return
        started = last_progress = time.monotonic()
        have, slow, was_acked = 0, False, acked()
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
                self._progress(data, now, got - have, now - last_progress)
                have, last_progress = got, now
            now_acked = acked()
            if now_acked is not None and (was_acked is None or now_acked > was_acked):
                with self._lock:
                    self._moved(data, now)
                was_acked = now_acked
            if not slow and now - started > self.timeout_s:
                slow = True  # named while it lasts, not only once the piece is in
                self.stalls.record(where.job, Cause.TOO_SLOW, (
                    f"step {where.step}: sending {expected / 1e6:.1f} MB to node {node} "
                    f"({data}): {got / 1e6:.1f} MB in {now - started:.0f}s "
                    f"({got / (now - started) / 1e6:.2f} MB/s); the trainers skip snapshots "
                    f"meanwhile"))
            else:
                quiet, allowed = self.quiet(data, last_progress, now)
                if quiet > allowed:
                    raise PeerUnavailableError(
                        f"data port {data} of node {node}: {got} of {expected} bytes of "
                        f"piece {where.index} of group {where.group} stripe {where.stripe} "
                        f"arrived, and no byte of any piece for {quiet:.0f}s (no frame, nothing "
                        f"acknowledged): the data port is unreachable or the link dropped "
                        f"them")
        self._progress(data, now, expected - have, now - last_progress)
        took = now - started
        if took > self.timeout_s:
            self.stalls.record(where.job, Cause.TOO_SLOW, (
                f"step {where.step}: {expected / 1e6:.1f} MB to node {node} ({data}) took "
                f"{took:.0f}s ({expected / took / 1e6:.2f} MB/s); the trainers skip snapshots "
                f"meanwhile"))
        else:
            self.stalls.clear(where.job, Cause.TOO_SLOW)  # fast again

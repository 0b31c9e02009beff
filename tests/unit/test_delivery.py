"""Delivery's verdict on a pushed piece: slow is ``too_slow``, silent is unreachable.

Time and the peer's ``Received`` answers are faked: each ``Received`` call advances the
clock by one poll and answers from a script of (seconds, bytes arrived) per piece.
"""

from __future__ import annotations

from typing import Callable

import pytest

from shardguard.daemon.base.stalls import Cause, Stalls
from shardguard.daemon.errors import PeerUnavailableError
from shardguard.daemon.transport import delivery as delivery_mod
from shardguard.daemon.transport.dataplane import FRAME_BYTES
from shardguard.daemon.transport.delivery import Delivery
from shardguard.proto import peer_pb2 as ppb

POLL_S = 1.0
TIMEOUT_S = 3.0
DATA = "10.0.0.1:5000"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Answer:
    def __init__(self, got: int) -> None:
        self.got = got


class Peer:
    """A ``Received`` whose answer is ``arrived(piece index, seconds since start)``."""

    def __init__(self, clock: Clock, arrived: Callable[[int, float], int]) -> None:
        self.clock, self.arrived, self.start = clock, arrived, clock.now

    def stub(self, control: str) -> "Peer":
        return self

    def Received(self, req: ppb.ReceivedRequest, timeout: float) -> Answer:  # noqa: N802
        self.clock.now += POLL_S
        return Answer(self.arrived(req.index, self.clock.now - self.start))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(delivery_mod.time, "monotonic", c)
    return c


def confirm(d: Delivery, index: int, expected: int) -> None:
    d.confirm(ppb.ReceivedRequest(job="j", step=7, group=0, stripe=0, index=index),
              expected, 1, "ctl", DATA)


def test_a_fast_piece_clears_too_slow(clock: Clock) -> None:
    stalls = Stalls()
    stalls.record("j", Cause.TOO_SLOW, "earlier")
    confirm(Delivery(Peer(clock, lambda i, t: 10), TIMEOUT_S, stalls), 0, 10)
    assert stalls.get("j") is None


def test_bytes_that_keep_coming_are_slow_not_unreachable(clock: Clock) -> None:
    stalls = Stalls()
    # One frame a second, 10 frames: 10 s against a 3 s timeout.
    confirm(Delivery(Peer(clock, lambda i, t: int(t) * FRAME_BYTES), TIMEOUT_S, stalls),
            0, 10 * FRAME_BYTES)
    s = stalls.get("j")
    assert s is not None and s.cause == Cause.TOO_SLOW and "took 10s" in s.detail


def test_a_silent_data_port_is_named_after_the_timeout(clock: Clock) -> None:
    d = Delivery(Peer(clock, lambda i, t: 0), TIMEOUT_S, Stalls())
    with pytest.raises(PeerUnavailableError, match=f"data port {DATA}.*no byte of any piece"):
        confirm(d, 0, FRAME_BYTES)
    assert clock.now - 100.0 <= TIMEOUT_S + 2 * POLL_S


def test_a_link_that_was_fast_is_named_as_soon_as_it_goes_silent(clock: Clock) -> None:
    d = Delivery(Peer(clock, lambda i, t: FRAME_BYTES if i == 0 else 0), TIMEOUT_S, Stalls())
    confirm(d, 0, FRAME_BYTES)  # one frame in one poll: the link's frame time is 1 s
    before = clock.now
    with pytest.raises(PeerUnavailableError):
        confirm(d, 1, FRAME_BYTES)
    assert clock.now - before <= TIMEOUT_S + 2 * POLL_S


def test_a_piece_behind_another_to_the_same_node_is_not_unreachable(clock: Clock) -> None:
    """The CI failure of the 30 Mbit/s class: a piece that sees nothing for longer than the
    timeout while another piece to the same node takes the link's bytes. The other
    piece's confirm (another thread) is played by the answers: every 2 s a frame of it
    arrives, for 12 s; then this piece's frame arrives."""
    stalls = Stalls()
    d: Delivery

    def arrived(i: int, t: float) -> int:
        if t < 14:
            if int(t) % 2 == 0:
                d._progress(DATA, clock.now, FRAME_BYTES, 2.0)
            return 0
        return FRAME_BYTES
    d = Delivery(Peer(clock, arrived), TIMEOUT_S, stalls)
    confirm(d, 1, FRAME_BYTES)
    s = stalls.get("j")
    assert s is not None and s.cause == Cause.TOO_SLOW and "took 14s" in s.detail


def test_without_the_other_piece_the_same_wait_is_unreachable(clock: Clock) -> None:
    d = Delivery(Peer(clock, lambda i, t: 0 if t < 14 else FRAME_BYTES), TIMEOUT_S, Stalls())
    with pytest.raises(PeerUnavailableError):
        confirm(d, 1, FRAME_BYTES)


def test_a_slow_frame_time_stretches_the_quiet_allowed(clock: Clock) -> None:
    """A link whose frames take 2 s each may be quiet for 3 frames (6 s), not just 3 s."""
    d = Delivery(Peer(clock, lambda i, t: 0), TIMEOUT_S, Stalls())
    d._progress(DATA, clock.now, FRAME_BYTES, 2.0)
    quiet, allowed = d.quiet(DATA, clock.now, clock.now + 4)
    assert (quiet, allowed) == (4, delivery_mod.QUIET_FRAMES * 2.0)
    # Small pieces say nothing of a frame's time on this link: a tiny piece is quick.
    d2 = Delivery(Peer(clock, lambda i, t: 0), TIMEOUT_S, Stalls())
    d2._progress(DATA, clock.now, 1000, 0.001)
    assert d2.quiet(DATA, clock.now, clock.now + 4)[1] == TIMEOUT_S


def confirm_acked(d: Delivery, index: int, expected: int, acked: Callable[[], int | None]
                  ) -> None:
    d.confirm(ppb.ReceivedRequest(job="j", step=7, group=0, stripe=0, index=index),
              expected, 1, "ctl", DATA, acked)


def test_a_frame_slower_than_the_timeout_is_slow_while_its_bytes_are_acknowledged(
        clock: Clock) -> None:
    """The 30 Mbit/s class after 8 MiB frames: no frame for 8 s, a link that had been
    fast (its frame time says nothing of now), but the connection's far kernel keeps
    acknowledging bytes: slow, not unreachable."""
    d = Delivery(Peer(clock, lambda i, t: 0 if t < 8 else FRAME_BYTES), TIMEOUT_S, Stalls())
    d._progress(DATA, clock.now, FRAME_BYTES, 0.01)
    start = clock.now
    confirm_acked(d, 0, FRAME_BYTES, lambda: int((clock.now - start) * 1e6))
    s = d.stalls.get("j")
    assert s is not None and s.cause == Cause.TOO_SLOW and "took 8s" in s.detail


def test_acknowledged_bytes_that_stop_are_named_after_the_timeout(clock: Clock) -> None:
    """Bytes acknowledged for 2 s, then nothing (a cut, or every frame sent and none
    counted): named once nothing moved for the timeout."""
    d = Delivery(Peer(clock, lambda i, t: 0), TIMEOUT_S, Stalls())
    start = clock.now
    with pytest.raises(PeerUnavailableError, match="nothing acknowledged"):
        confirm_acked(d, 0, FRAME_BYTES, lambda: int(min(clock.now - start, 2.0) * 1e6))
    assert clock.now - start <= 2 + TIMEOUT_S + 2 * POLL_S


def test_an_unknown_acknowledged_count_judges_by_frames(clock: Clock) -> None:
    d = Delivery(Peer(clock, lambda i, t: 0), TIMEOUT_S, Stalls())
    start = clock.now
    with pytest.raises(PeerUnavailableError):
        confirm_acked(d, 0, FRAME_BYTES, lambda: None)
    assert clock.now - start <= TIMEOUT_S + 2 * POLL_S

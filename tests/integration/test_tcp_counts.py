"""What the kernel counted on a ZeroMQ socket's connection (daemon/transport/tcp_counts.py),
on real sockets over 127.0.0.1: the bytes the far end acknowledged grow with what reaches
the receiver, stop when the receiver stops taking them, survive a reconnection without
going back, and reach a push's ``delivered`` callback; the bytes received grow with a
reply before its frame is whole."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import zmq

from shardguard.daemon.transport.tcp_counts import TcpCounts
from shardguard.daemon.transport.dataplane import DataPlane

MIB = 1 << 20


def settle(count: Callable[[], int | None], seconds: float = 0.3) -> int | None:
    """The count once it stopped changing for ``seconds``."""
    last = count()
    while True:
        time.sleep(seconds)
        now = count()
        if now == last:
            return now
        last = now


@dataclass
class Pair:
    """A ROUTER bound on 127.0.0.1 and a DEALER for it, its connection's counts watched."""

    ctx: zmq.Context
    router: zmq.Socket
    dealer: zmq.Socket
    counts: TcpCounts
    port: int

    def connect(self) -> None:
        self.dealer.connect(f"tcp://127.0.0.1:{self.port}")


@contextlib.contextmanager
def pair(router_opts: dict[int, int] | None = None, dealer_opts: dict[int, int] | None = None,
         connect: bool = True) -> Iterator[Pair]:
    """The two sockets (options set before bind and connect), closed afterwards, the
    ROUTER that :attr:`Pair.router` names then (a test may replace it)."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    for opt, val in (router_opts or {}).items():
        router.setsockopt(opt, val)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    for opt, val in (dealer_opts or {}).items():
        dealer.setsockopt(opt, val)
    p = Pair(ctx, router, dealer, TcpCounts(dealer), port)
    if connect:
        p.connect()
    try:
        yield p
    finally:
        p.counts.close()
        p.dealer.close(linger=0)
        p.router.close(linger=0)
        ctx.term()


def test_unknown_before_the_connection_then_every_byte_that_was_taken() -> None:
    with pair(connect=False) as p:
        assert p.counts.acked() is None  # not connected: nothing can be said
        p.connect()
        payload = bytes(8 * MIB)
        for _ in range(4):
            p.dealer.send(payload, copy=False)
        for _ in range(4):
            assert len(p.router.recv_multipart()[1]) == 8 * MIB
        got = settle(p.counts.acked)
        # Every payload byte, and ZeroMQ's greeting and frame headers (a few hundred bytes).
        assert got is not None and 32 * MIB <= got < 32 * MIB + 4096


def test_a_receiver_that_stops_taking_bytes_stops_the_count() -> None:
    """A receiver whose queue is full stops reading its socket: TCP's window closes and
    the count stands still far below what was sent."""
    with pair({zmq.RCVHWM: 1, zmq.RCVBUF: 1 * MIB}, {zmq.SNDHWM: 0}) as p:
        payload = bytes(8 * MIB)
        for _ in range(32):
            p.dealer.send(payload, copy=False)
        stood = settle(p.counts.acked)
        assert stood is not None and 8 * MIB < stood < 128 * MIB
        time.sleep(1.0)
        assert p.counts.acked() == stood
        for _ in range(32):  # taken now: it moves again, up to all of it
            p.router.recv_multipart()
        final = settle(p.counts.acked)
        assert final is not None and final >= 256 * MIB


def test_a_new_connection_keeps_what_the_old_one_had_acknowledged() -> None:
    with pair({zmq.LINGER: 0}, {zmq.RECONNECT_IVL: 50}) as p:
        p.dealer.send(bytes(4 * MIB), copy=False)
        p.router.recv_multipart()
        first = settle(p.counts.acked)
        assert first is not None and first >= 4 * MIB
        p.router.close(linger=0)  # the receiver goes; ZeroMQ reconnects to its successor
        p.router = p.ctx.socket(zmq.ROUTER)
        p.router.setsockopt(zmq.LINGER, 0)
        deadline = time.monotonic() + 30
        while True:  # the old socket lets its port go in the background
            try:
                p.router.bind(f"tcp://127.0.0.1:{p.port}")
                break
            except zmq.ZMQError:
                assert time.monotonic() < deadline, f"port {p.port} never freed"
                time.sleep(0.05)
        second: int | None = None
        while time.monotonic() < deadline:
            p.dealer.send(bytes(4 * MIB), copy=False)
            if p.router.poll(200):
                p.router.recv_multipart()
                second = settle(p.counts.acked)
                break
        assert second is not None and second >= first + 4 * MIB


def test_a_push_hands_its_acknowledged_count_to_delivered() -> None:
    """The data plane's own push: ``delivered`` gets the count of the piece's connection,
    and it covers the piece once the receiver has it and its kernel's last
    acknowledgements are back (a delayed ACK can trail the bytes by tens of ms: a CI run
    read 20911061 of 20971520 at the instant the receiver had all of them)."""
    arrived: list[int] = []
    plane = DataPlane("127.0.0.1", 0, lambda kind, hdr, payload: arrived.append(
        len(payload or b"")) or None, timeout_s=5.0)
    sender = DataPlane("127.0.0.1", 0, lambda *a: None, timeout_s=5.0)
    piece = np.arange(20 * MIB, dtype=np.uint8)
    seen: list[int | None] = []

    def delivered(acked) -> None:
        deadline = time.monotonic() + 30
        while sum(arrived) < piece.nbytes and time.monotonic() < deadline:
            time.sleep(0.05)
        while (acked() or 0) < piece.nbytes and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(acked())

    try:
        sender.push(plane.address, b"data", {"job": "j"}, [memoryview(piece)],
                    delivered=delivered)
        assert sum(arrived) == piece.nbytes
        assert seen[0] is not None and seen[0] >= piece.nbytes
    finally:
        sender.close()
        plane.close()


def test_a_reply_counts_as_received_before_its_frame_is_whole() -> None:
    """A fetch's side: the far end sends one 128 MiB frame that the sender's kernel lets
    out slowly (a small send buffer, a receiver that reads in bursts); the bytes received
    grow while no frame is there yet."""
    with pair({zmq.SNDBUF: 256 << 10}, {zmq.RCVBUF: 256 << 10}) as p:
        p.dealer.send(b"hello")
        ident, _ = p.router.recv_multipart()
        assert p.counts.received() is not None
        sender = threading.Thread(target=p.router.send_multipart,
                                  args=([ident, bytes(128 * MIB)],), kwargs={"copy": False})
        sender.start()
        seen = []
        while not p.dealer.poll(0):
            got = p.counts.received()
            if got is not None and 0 < got < 128 * MIB:
                seen.append(got)
            time.sleep(0.0005)
        assert len(p.dealer.recv_multipart()[0]) == 128 * MIB
        sender.join()
        assert seen, "the bytes of the frame were never seen before the frame"
        assert settle(p.counts.received) >= 128 * MIB


def test_a_fetch_hands_over_every_frame_with_its_counts_watched() -> None:
    """The data plane's own fetch (its wait watches the bytes received): a 20 MiB piece
    in frames, whole and in order."""
    piece = np.random.default_rng(1).integers(0, 255, 20 * MIB, dtype=np.uint8)
    from shardguard.daemon.transport.dataplane import reply_chunks

    def serve(kind, hdr, payload):
        return list(reply_chunks(hdr, [memoryview(piece)], piece.nbytes))
    plane = DataPlane("127.0.0.1", 0, serve, timeout_s=5.0)
    fetcher = DataPlane("127.0.0.1", 0, lambda *a: None, timeout_s=5.0)
    out = np.zeros_like(piece)
    try:
        assert fetcher.fetch(plane.address, {"job": "j"}, out) == piece.nbytes
        assert np.array_equal(out, piece)
    finally:
        fetcher.close()
        plane.close()

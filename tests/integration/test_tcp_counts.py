"""What the kernel counted on a ZeroMQ socket's connection (daemon/transport/tcp_counts.py),
on real sockets over 127.0.0.1: the bytes the far end acknowledged grow with what reaches
the receiver, stop when the receiver stops taking them, survive a reconnection without
going back, and reach a push's ``delivered`` callback; the bytes received grow with a
reply before its frame is whole."""

from __future__ import annotations

import threading
import time
from typing import Callable

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


def test_unknown_before_the_connection_then_every_byte_that_was_taken() -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    counts = TcpCounts(dealer)
    try:
        assert counts.acked() is None  # not connected: nothing can be said
        dealer.connect(f"tcp://127.0.0.1:{port}")
        payload = bytes(8 * MIB)
        for _ in range(4):
            dealer.send(payload, copy=False)
        for _ in range(4):
            assert len(router.recv_multipart()[1]) == 8 * MIB
        got = settle(counts.acked)
        # Every payload byte, and ZeroMQ's greeting and frame headers (a few hundred bytes).
        assert got is not None and 32 * MIB <= got < 32 * MIB + 4096
    finally:
        counts.close()
        dealer.close(linger=0)
        router.close(linger=0)
        ctx.term()


def test_a_receiver_that_stops_taking_bytes_stops_the_count() -> None:
    """A receiver whose queue is full stops reading its socket: TCP's window closes and
    the count stands still far below what was sent."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.RCVHWM, 1)
    router.setsockopt(zmq.RCVBUF, 1 * MIB)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.SNDHWM, 0)
    counts = TcpCounts(dealer)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    try:
        payload = bytes(8 * MIB)
        for _ in range(32):
            dealer.send(payload, copy=False)
        stood = settle(counts.acked)
        assert stood is not None and 8 * MIB < stood < 128 * MIB
        time.sleep(1.0)
        assert counts.acked() == stood
        for _ in range(32):  # taken now: it moves again, up to all of it
            router.recv_multipart()
        final = settle(counts.acked)
        assert final is not None and final >= 256 * MIB
    finally:
        counts.close()
        dealer.close(linger=0)
        router.close(linger=0)
        ctx.term()


def test_a_new_connection_keeps_what_the_old_one_had_acknowledged() -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RECONNECT_IVL, 50)
    counts = TcpCounts(dealer)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    try:
        dealer.send(bytes(4 * MIB), copy=False)
        router.recv_multipart()
        first = settle(counts.acked)
        assert first is not None and first >= 4 * MIB
        router.close(linger=0)  # the receiver goes; ZeroMQ reconnects to its successor
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        deadline = time.monotonic() + 30
        while True:  # the old socket lets its port go in the background
            try:
                router.bind(f"tcp://127.0.0.1:{port}")
                break
            except zmq.ZMQError:
                assert time.monotonic() < deadline, f"port {port} never freed"
                time.sleep(0.05)
        second: int | None = None
        while time.monotonic() < deadline:
            dealer.send(bytes(4 * MIB), copy=False)
            if router.poll(200):
                router.recv_multipart()
                second = settle(counts.acked)
                break
        assert second is not None and second >= first + 4 * MIB
    finally:
        counts.close()
        dealer.close(linger=0)
        router.close(linger=0)
        ctx.term()


def test_a_push_hands_its_acknowledged_count_to_delivered() -> None:
    """The data plane's own push: ``delivered`` gets the count of the piece's connection,
    and it covers the piece by the time the receiver has it."""
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
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.SNDBUF, 256 << 10)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVBUF, 256 << 10)
    counts = TcpCounts(dealer)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    try:
        dealer.send(b"hello")
        ident, _ = router.recv_multipart()
        assert counts.received() is not None
        sender = threading.Thread(target=router.send_multipart,
                                  args=([ident, bytes(128 * MIB)],), kwargs={"copy": False})
        sender.start()
        seen = []
        while not dealer.poll(0):
            got = counts.received()
            if got is not None and 0 < got < 128 * MIB:
                seen.append(got)
            time.sleep(0.0005)
        assert len(dealer.recv_multipart()[0]) == 128 * MIB
        sender.join()
        assert seen, "the bytes of the frame were never seen before the frame"
        assert settle(counts.received) >= 128 * MIB
    finally:
        counts.close()
        dealer.close(linger=0)
        router.close(linger=0)
        ctx.term()


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

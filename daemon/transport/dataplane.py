"""Bulk bytes between daemons over ZeroMQ: pieces in 8 MiB frames, never through gRPC.

Every daemon binds one ROUTER socket. A message is ``[kind, header, token,
payload?]`` with a JSON header; the token authenticates kind and header with
the job's secret (daemon/auth.py; empty without a secret), replies included. Kinds: ``data`` and ``parity`` (pieces pushed to their
encoder or holder), ``fetch`` (ask for a stored piece; answered with ``chunk``
messages, or ``error``). Incoming messages are handed to one handler on the
receiving thread, which owns the ROUTER socket; frames are received and sent
without copies (the payload of a received frame is read in place, a sent
chunk is a view of arena memory).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import zmq

from shardguard.daemon.base.allocator import keep_frame_memory
from shardguard.daemon.transport.auth import Authenticator, reply_from, zmq_context
from shardguard.daemon.transport.tcp_counts import TcpCounts
from shardguard.daemon.errors import AuthenticationError, PeerUnavailableError

logger = logging.getLogger(__name__)

# 8 MiB: the Python work on both sides (header, token, handler, metrics) is per frame,
# and the largest part of what a daemon spends beyond ZeroMQ's copies (perf, 4 MiB
# frames: ~0.1 of ~0.25 CPU-s per daemon and step; ISA-L ~0.08, CRC ~0.02): 1 -> 4
# MiB took a 4-node, 2-core run from 1.38 to 1.08 CPU-s per GB sent; 4 -> 8 MiB a
# daemon's CPU per step from 0.73-0.75 to 0.68-0.72 s and a lost node's rebuild from
# 3.5 to 3.0 s (bench/bench_cluster.py, 3 alternating runs each, 2026-12-05). ZeroMQ
# moves frames this size at full speed (it slows down only around 64 MiB).
FRAME_BYTES = 8 << 20
# Frames in flight per connection (256 MiB): flow control, so a slow receiver slows its
# senders instead of queueing whole pieces in memory, and a dead one is noticed.
WINDOW_FRAMES = 32
# Frames a fetch's socket queues before it stops reading (and TCP stops the sender): a
# caller that stops taking frames (a rebuild waiting for a slower piece) holds no more
# (16 MiB; coding/stream.py's AHEAD_BYTES says what 32 cost a rebuild).
FETCH_WINDOW_FRAMES = 2
# How often a socket waiting for room or for a frame looks at what its link counted.
WAIT_POLL_MS = 500
# A handler gets (kind, header, payload) and may return messages to send back to the caller.
Handler = Callable[[bytes, dict[str, Any], memoryview | None], Iterable[list[Any]] | None]
# Bytes the kernel counted on a connection so far, acknowledged by the far end or
# received from it (transport/tcp_counts.py; None: unknown).
Counted = Callable[[], "int | None"]


def _ready(sock: zmq.Socket, event: int, counted: Counted, timeout_s: float) -> bool:
    """Whether ``sock`` became ready for ``event`` before ``counted()`` stood still for
    ``timeout_s`` (an unknown count stands still)."""
    quiet_since = time.monotonic()
    if sock.poll(WAIT_POLL_MS, event):
        return True  # the usual case: the count is not read at all
    last = counted()
    while not sock.poll(WAIT_POLL_MS, event):
        now, seen = time.monotonic(), counted()
        if seen is not None and (last is None or seen > last):
            quiet_since, last = now, seen
        elif now - quiet_since > timeout_s:
            return False
    return True


def chunks(buffers: Iterable[memoryview], frame_bytes: int = FRAME_BYTES
           ) -> Iterator[tuple[int, memoryview]]:
    """(offset, view) frames of at most ``frame_bytes`` across consecutive buffers."""
    off = 0
    for buf in buffers:
        for start in range(0, len(buf), frame_bytes):
            part = buf[start:start + frame_bytes]
            yield off, part
            off += len(part)


class DataPlane:
    """The daemon's ZeroMQ endpoint: a receiving thread and senders made per call."""

    def __init__(self, host: str, port: int, handler: Handler, timeout_s: float,
                 auth: Authenticator | None = None) -> None:
        self.auth = auth or Authenticator(None)
        keep_frame_memory()  # received frames reuse freed buffers (daemon/base/allocator.py)
        self.ctx = zmq.Context()
        self.timeout_s = timeout_s
        self._handler = handler
        self._router = self.ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.SNDHWM, 0)  # fetch replies: bounded by the piece
        self._router.setsockopt(zmq.RCVHWM, WINDOW_FRAMES * 4)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.MAXMSGSIZE, 64 << 20)
        if port:
            self._router.bind(f"tcp://{host}:{port}")
        else:
            port = self._router.bind_to_random_port(f"tcp://{host}")
        self.address = f"{host}:{port}"
        self._stop_addr = f"inproc://sg-stop-{uuid.uuid4().hex}"
        self._stop_rx = self.ctx.socket(zmq.PAIR)
        self._stop_rx.bind(self._stop_addr)
        self._thread = threading.Thread(target=self._serve, name="sg-data", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._stop_rx, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._stop_rx in ready:
                return
            frames = self._router.recv_multipart(copy=False)
            self._dispatch(frames)

    def _dispatch(self, frames: list[zmq.Frame]) -> None:
        ident = frames[0].bytes
        try:
            if len(frames) not in (4, 5):
                raise ValueError(f"{len(frames) - 1} frames")
            kind, raw = frames[1].bytes, frames[2].bytes
            self.auth.check(frames[3].bytes, zmq_context(self.address, kind, raw))
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("header is not an object")
            payload = frames[4].buffer if len(frames) == 5 else None
            # Built here, inside the try: a reply that cannot be made is an error answer.
            replies = list(self._handler(kind, header, payload) or ())
        except Exception as exc:  # noqa: BLE001 - a bad message must not stop the plane
            logger.warning("data plane: refused a message: %s: %s", type(exc).__name__, exc)
            replies = [[b"error", json.dumps({"error": f"{type(exc).__name__}: "
                                                      f"{str(exc)[:500]}"}).encode()]]
        try:
            for msg in replies:
                self._router.send_multipart([ident, *self._signed(msg, reply_from(self.address))],
                                            copy=False)
        except Exception as exc:  # noqa: BLE001 - nor a reply that cannot be sent
            logger.warning("data plane: could not answer: %s: %s", type(exc).__name__, exc)

    def _signed(self, msg: list[Any], audience: str) -> list[Any]:
        """``[kind, header, payload?]`` -> ``[kind, header, token, payload?]``."""
        token = self.auth.sign(zmq_context(audience, msg[0], msg[1])).encode()
        return [msg[0], msg[1], token, *msg[2:]]

    def push(self, address: str, kind: bytes, header: dict[str, Any],
             buffers: Iterable[memoryview], on_frame: Callable[[], None] | None = None,
             delivered: Callable[[Counted], None] | None = None) -> None:
        """Send a piece as frames ``[kind, header+{off, n}, bytes]``.

        ``delivered(acked)`` (which blocks until the receiver says it has every byte, or
        raises) is called once every frame is handed to ZeroMQ, while the socket is
        still open to drain them: closing it would drop what is still queued. ``acked()``
        is how many bytes the receiving kernel acknowledged so far (transport/tcp_counts.py;
        None when that cannot be known). Without it, this returns once the frames are
        handed over and gives them the timeout to drain. An empty piece is sent as one
        empty frame so the receiver sees it. Handing a frame over waits while the window
        is full, as long as the link acknowledges bytes within the timeout.
        """
        sock, counts = self._watched(address, window=WINDOW_FRAMES)
        try:
            sent = False
            for off, part in chunks(buffers):
                hdr = json.dumps({**header, "off": off, "n": len(part)}).encode()
                self._send(sock, self._signed([kind, hdr, part], address), address, counts.acked)
                sent = True
                if on_frame is not None:
                    on_frame()
            if not sent:
                hdr = json.dumps({**header, "off": 0, "n": 0}).encode()
                self._send(sock, self._signed([kind, hdr, b""], address), address, counts.acked)
            if delivered is not None:
                delivered(counts.acked)
        finally:
            counts.close()
            # Delivered: nothing is left to drain. Else at most a window of frames is still
            # queued: they get the timeout to drain.
            sock.close(linger=0 if delivered is not None else int(self.timeout_s * 1000))

    def _send(self, sock: zmq.Socket, msg: list[Any], address: str, acked: Counted) -> None:
        """Hand ``msg`` to ZeroMQ, waiting while the window is full (it drains a frame at
        a time: a slow link's frame may take longer than the timeout)."""
        if not _ready(sock, zmq.POLLOUT, acked, self.timeout_s):
            raise PeerUnavailableError(
                f"peer {address} took no data for {self.timeout_s:.0f}s")
        sock.send_multipart(msg, copy=False)

    def fetch(self, address: str, header: dict[str, Any], out: np.ndarray) -> int:
        """Ask ``address`` for a piece; its bytes land in ``out``. Returns the bytes received.

        Raises:
            PeerUnavailableError: no answer within the timeout, or the peer refused.
        """
        def land(off: int, part: memoryview, total: int) -> None:
            if off + len(part) > len(out):
                raise PeerUnavailableError(f"peer {address} sent bytes past the piece")
            out[off:off + len(part)] = np.frombuffer(part, dtype=np.uint8)

        return self.fetch_frames(address, header, land)

    def fetch_frames(self, address: str, header: dict[str, Any],
                     on_frame: Callable[[int, memoryview, int], None]) -> int:
        """Ask ``address`` for a piece and hand each frame to ``on_frame(off, bytes, total)``
        as it arrives, without copying it (``bytes`` is a view of the received frame, valid
        as long as it is referenced). Returns the bytes received. An exception raised by
        ``on_frame`` ends the fetch and propagates.

        Raises:
            PeerUnavailableError: no answer within the timeout, or the peer refused.
        """
        sock, counts = self._watched(address, rcv_window=FETCH_WINDOW_FRAMES)
        try:
            sock.send_multipart(self._signed([b"fetch", json.dumps(header).encode()], address))
            got, total = 0, None
            while total is None or got < total:
                # A frame may take longer than the timeout on a slow link: the wait goes
                # on while bytes come in.
                if not _ready(sock, zmq.POLLIN, counts.received, self.timeout_s):
                    raise PeerUnavailableError(f"peer {address} did not answer a fetch in "
                                               f"{self.timeout_s}s ({header})")
                frames = sock.recv_multipart(copy=False)
                if len(frames) not in (3, 4):
                    raise PeerUnavailableError(f"peer {address} answered {len(frames)} frames")
                kind, raw = frames[0].bytes, frames[1].bytes
                try:
                    self.auth.check(frames[2].bytes, zmq_context(reply_from(address), kind, raw))
                except AuthenticationError as exc:
                    raise PeerUnavailableError(f"peer {address}: {exc}") from None
                hdr = json.loads(raw)
                if kind == b"error":
                    raise PeerUnavailableError(f"peer {address} refused fetch: {hdr['error']}")
                total = hdr["total"]
                n, off = hdr["n"], hdr["off"]
                part = frames[3].buffer if len(frames) == 4 else memoryview(b"")
                if len(part) != n or off < 0 or off + n > total:
                    raise PeerUnavailableError(f"peer {address} sent a frame of {len(part)} "
                                               f"bytes as {n} at {off} of {total}")
                on_frame(off, part, total)
                got += n
            return got
        finally:
            counts.close()
            sock.close(linger=0)

    def ping(self, address: str, timeout_s: float) -> bool:
        """Whether the data port at ``address`` answers (and authenticates) within the timeout."""
        sock = self._dealer(address)
        try:
            sock.send_multipart(self._signed([b"ping", b"{}"], address))
            if not sock.poll(int(timeout_s * 1000)):
                return False
            frames = sock.recv_multipart()
            if len(frames) != 3 or frames[0] != b"pong":
                return False
            self.auth.check(frames[2], zmq_context(reply_from(address), frames[0], frames[1]))
            return True
        except (zmq.ZMQError, AuthenticationError):
            return False
        finally:
            sock.close(linger=0)

    def _dealer(self, address: str, window: int = 0, rcv_window: int = 0) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.SNDHWM, window)
        sock.setsockopt(zmq.RCVHWM, rcv_window)
        if address:
            sock.connect(f"tcp://{address}")
        return sock

    def _watched(self, address: str, window: int = 0, rcv_window: int = 0
                 ) -> tuple[zmq.Socket, TcpCounts]:
        """A DEALER to ``address`` with its connection's TCP counts (watched from before
        it connects: the monitor sees only later events)."""
        sock = self._dealer("", window, rcv_window)
        counts = TcpCounts(sock)
        sock.connect(f"tcp://{address}")
        return sock, counts

    def close(self) -> None:
        with self.ctx.socket(zmq.PAIR) as stop:
            stop.connect(self._stop_addr)
            stop.send(b"stop")
            self._thread.join(timeout=5)
        self._router.close(linger=0)
        self._stop_rx.close(linger=0)
        self.ctx.term()


def reply_chunks(req: Any, buffers: list[memoryview], total: int) -> Iterator[list[Any]]:
    """The ``chunk`` messages answering a fetch: the real bytes; the peer zero-fills the rest."""
    any_sent = False
    for off, part in chunks(buffers):
        any_sent = True
        yield [b"chunk", json.dumps({"req": req, "off": off, "n": len(part), "total": total}
                                    ).encode(), part]
    if not any_sent:
        yield [b"chunk", json.dumps({"req": req, "off": 0, "n": 0, "total": 0}).encode(), b""]

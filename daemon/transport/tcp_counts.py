"""What the kernel counted on a ZeroMQ socket's TCP connection: bytes the far end
acknowledged, bytes that came in.

A receiver counts what arrived in whole frames (8 MiB), and a fetch sees its reply a
frame at a time: on a link that carries less than a frame in a peer timeout, or whose
bytes several pieces share, nothing shows for a while although the link works. TCP
knows better: ``tcpi_bytes_acked`` grows with every byte the far kernel acknowledged,
``tcpi_bytes_received`` with every byte that came in (Linux 4.1+). :class:`TcpCounts`
follows one DEALER socket's connection through ZeroMQ's socket monitor (``CONNECTED``
names the file descriptor) and reads ``TCP_INFO`` from a duplicate of it, closed at
once, so ZeroMQ alone owns the connection. A descriptor whose local address is no
longer the connection's is a connection that ended; what it had counted stays counted.

Where it cannot tell (not connected yet, a kernel without the fields, a descriptor that
is no longer a TCP socket) it answers ``None`` and the caller judges by frames alone.
Used on the socket's own thread only (ZeroMQ sockets are not thread-safe).
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

# struct tcp_info (include/uapi/linux/tcp.h): 8 one-byte fields, 24 u32 (rto ...
# total_retrans), u64 pacing_rate, u64 max_pacing_rate, u64 bytes_acked,
# u64 bytes_received.
_BYTES_ACKED_AT = 8 + 24 * 4 + 2 * 8
_BYTES_RECEIVED_AT = _BYTES_ACKED_AT + 8
_TCP_INFO_BYTES = 256
_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED


def _tcp(fd: int) -> socket.socket | None:
    """A duplicate of ``fd`` as a TCP socket (the caller closes it), or None."""
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    if s.type != socket.SOCK_STREAM or s.family not in (socket.AF_INET, socket.AF_INET6):
        s.close()
        return None
    return s


class TcpCounts:
    """Bytes acknowledged by the far end, and received from it, over every connection
    one DEALER socket made.

    Make it before the socket connects (the monitor sees only later events) and
    :meth:`close` it before the socket.
    """

    def __init__(self, sock: zmq.Socket) -> None:
        self._sock = sock
        self._monitor: zmq.Socket = sock.get_monitor_socket(_EVENTS)
        self._fd: int | None = None      # the current connection's descriptor (ZeroMQ's)
        self._local: Any = None          # its local address, to know it is still that one
        self._last = (0, 0)              # (acked, received) of it at the last look
        self._before = (0, 0)            # what ended connections had counted

    def acked(self) -> int | None:
        """Bytes the far end acknowledged so far, or None when that cannot be known now."""
        counts = self._read()
        return None if counts is None else counts[0]

    def received(self) -> int | None:
        """Bytes received so far, or None when that cannot be known now."""
        counts = self._read()
        return None if counts is None else counts[1]

    def _read(self) -> tuple[int, int] | None:
        self._events()
        if self._fd is None:
            return None
        s = _tcp(self._fd)
        if s is None:
            self._end()
            return None
        with s:
            try:
                if s.getsockname() != self._local:
                    self._end()  # the descriptor was closed and its number reused
                    return None
                info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
            except OSError:
                self._end()
                return None
        if len(info) < _BYTES_RECEIVED_AT + 8:
            return None
        now = struct.unpack_from("=QQ", info, _BYTES_ACKED_AT)
        self._last = (max(self._last[0], now[0]), max(self._last[1], now[1]))
        return (self._before[0] + self._last[0], self._before[1] + self._last[1])

    def _events(self) -> None:
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            if event["event"] == zmq.EVENT_CONNECTED:
                self._end()
                s = _tcp(event["value"])
                if s is not None:
                    with s:
                        try:
                            self._fd, self._local = event["value"], s.getsockname()
                        except OSError:
                            self._fd = None
            elif event["event"] == zmq.EVENT_DISCONNECTED and event["value"] == self._fd:
                self._end()

    def _end(self) -> None:
        self._before = (self._before[0] + self._last[0], self._before[1] + self._last[1])
        self._fd, self._local, self._last = None, None, (0, 0)

    def close(self) -> None:
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)
